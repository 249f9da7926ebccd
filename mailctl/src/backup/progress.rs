//! Progress of a backup or restore: a bar with bytes, messages and ETA on a
//! terminal, a plain line every few seconds otherwise (logs, cron mail).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain progress line is printed.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    verb: &'static str,
    bar: Option<ProgressBar>,
    total_bytes: u64,
    total_messages: u64,
    bytes: u64,
    messages: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Progress of `verb` ("backup", "restore") over `total_bytes` in
    /// `total_messages` messages.
    pub fn new(verb: &'static str, total_bytes: u64, total_messages: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg} ({bytes_per_sec}, ETA {eta})",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_prefix(verb);
            bar
        });
        Progress {
            verb,
            bar,
            total_bytes,
            total_messages,
            bytes: 0,
            messages: 0,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    /// `bytes` more done, in `messages` more messages.
    pub fn add(&mut self, bytes: u64, messages: u64) {
        self.bytes += bytes;
        self.messages += messages;
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.bytes.min(self.total_bytes));
                bar.set_message(format!(
                    "{}/{} messages",
                    self.messages, self.total_messages
                ));
            }
            None if self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if self.bytes > 0 && self.total_bytes > self.bytes {
            let rate = self.bytes as f64 / elapsed.max(0.001);
            format!(
                ", ETA {:.0} s",
                (self.total_bytes - self.bytes) as f64 / rate
            )
        } else {
            String::new()
        };
        format!(
            "{}: {}/{} messages, {}/{} bytes{eta}",
            self.verb, self.messages, self.total_messages, self.bytes, self.total_bytes
        )
    }

    /// Done: clear the bar, or print the last line.
    pub fn finish(self) {
        match self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => eprintln!("{}", self.line()),
        }
    }
}
