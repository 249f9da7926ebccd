//! The final report, for humans or as one JSON object.

use std::fmt::Write as _;
use std::time::Duration;

use crate::cli::Cli;
use crate::stats::{Percentiles, Stats};

/// What the Maildir watcher found.
pub struct Delivery {
    /// Files expected.
    pub expected: u64,
    /// New files seen.
    pub delivered: u64,
    /// First connect to the last new file seen, if one was.
    pub elapsed: Option<Duration>,
}

/// Everything the report shows.
pub struct Report<'a> {
    pub cli: &'a Cli,
    pub run_id: &'a str,
    /// The merged numbers of all sessions.
    pub stats: &'a Stats,
    /// First connect to the last reply.
    pub elapsed: Duration,
    /// End of data to 250, over the accepted messages.
    pub latency: Option<Percentiles>,
    /// Present with --maildir-glob.
    pub delivery: Option<Delivery>,
}

impl Report<'_> {
    /// Whether every message was accepted (with all recipients) and, when
    /// watched, delivered.
    pub fn success(&self) -> bool {
        let s = self.stats;
        s.accepted == self.cli.messages
            && s.rcpt_refused == 0
            && self
                .delivery
                .as_ref()
                .is_none_or(|d| d.delivered >= d.expected)
    }

    /// Messages never tried: their session could not connect.
    fn not_sent(&self) -> u64 {
        let s = self.stats;
        self.cli
            .messages
            .saturating_sub(s.accepted + s.refused + s.failed)
    }

    fn accepted_per_sec(&self) -> f64 {
        per_sec(self.stats.accepted as f64, self.elapsed)
    }

    /// Mean size of the accepted messages (the size asked for if none was).
    fn mean_size(&self) -> u64 {
        let s = self.stats;
        s.accepted_bytes
            .checked_div(s.accepted)
            .unwrap_or(self.cli.size)
    }

    /// Megabytes (10^6 bytes) of accepted messages per second.
    fn mb_per_sec(&self) -> f64 {
        per_sec(self.stats.accepted_bytes as f64 / 1e6, self.elapsed)
    }

    /// The human-readable report, one item per line.
    pub fn human(&self) -> String {
        let (cli, s) = (self.cli, self.stats);
        let mut out = String::new();
        let pipelining = if cli.pipelining {
            format!(
                "pipelining on {} of {} connections",
                s.pipelined_connections, s.connections
            )
        } else {
            "no pipelining".to_owned()
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "loadgen {} -> {}: {} sessions, {} messages of ~{} bytes, {} per connection, {pipelining}",
            self.run_id, cli.server, cli.sessions, cli.messages, cli.size, cli.per_session
        );
        let _ = writeln!(
            out,
            "connections:  {} ({} failed to connect)",
            s.connections, s.connect_failures
        );
        let _ = writeln!(out, "accepted:     {}", s.accepted);
        let _ = writeln!(out, "refused:      {}", s.refused);
        if s.rcpt_refused > 0 {
            let _ = writeln!(
                out,
                "refused rcpt: {} (of otherwise accepted messages)",
                s.rcpt_refused
            );
        }
        let _ = writeln!(
            out,
            "failed:       {} (timeouts, lost connections)",
            s.failed
        );
        let _ = writeln!(out, "not sent:     {}", self.not_sent());
        let _ = writeln!(out, "elapsed:      {:.3} s", self.elapsed.as_secs_f64());
        let _ = writeln!(
            out,
            "throughput:   {:.1} msg/s, {:.2} MB/s (messages of {} bytes on average)",
            self.accepted_per_sec(),
            self.mb_per_sec(),
            self.mean_size()
        );
        if let Some(p) = &self.latency {
            let _ = writeln!(
                out,
                "latency:      p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (end of data -> 250)",
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.max)
            );
        }
        if let Some(d) = &self.delivery {
            let _ = write!(out, "delivered:    {} of {} files", d.delivered, d.expected);
            if let Some(elapsed) = d.elapsed {
                let _ = write!(
                    out,
                    ", last after {:.3} s, {:.1} files/s end to end",
                    elapsed.as_secs_f64(),
                    per_sec(d.delivered as f64, elapsed)
                );
            }
            out.push('\n');
        }
        if !s.errors.distinct.is_empty() {
            out.push_str("errors:\n");
            for (text, count) in &s.errors.distinct {
                let _ = writeln!(out, "  {count} x {text}");
            }
            if s.errors.others > 0 {
                let _ = writeln!(out, "  {} more of other kinds", s.errors.others);
            }
        }
        let verdict = if self.success() { "OK" } else { "FAILED" };
        let _ = writeln!(out, "result:       {verdict}");
        out
    }

    /// The report as one JSON object (one line).
    pub fn json(&self) -> String {
        let (cli, s) = (self.cli, self.stats);
        let latency = match &self.latency {
            Some(p) => format!(
                r#"{{"p50":{:.3},"p90":{:.3},"p99":{:.3},"max":{:.3}}}"#,
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.max)
            ),
            None => "null".to_owned(),
        };
        let delivery = match &self.delivery {
            Some(d) => format!(
                r#"{{"expected":{},"delivered":{},"elapsed_s":{},"delivered_per_s":{:.1}}}"#,
                d.expected,
                d.delivered,
                d.elapsed
                    .map_or("null".to_owned(), |e| format!("{:.3}", e.as_secs_f64())),
                d.elapsed.map_or(0.0, |e| per_sec(d.delivered as f64, e))
            ),
            None => "null".to_owned(),
        };
        let errors = s
            .errors
            .distinct
            .iter()
            .map(|(text, count)| format!(r#"{{"count":{count},"error":{}}}"#, json_string(text)))
            .collect::<Vec<_>>()
            .join(",");
        format!(
            concat!(
                r#"{{"run_id":{},"server":{},"sessions":{},"messages":{},"size":{},"#,
                r#""per_session":{},"pipelining":{},"connections":{},"pipelined_connections":{},"#,
                r#""connect_failures":{},"accepted":{},"refused":{},"rcpt_refused":{},"failed":{},"#,
                r#""not_sent":{},"mean_size":{},"elapsed_s":{:.3},"accepted_per_s":{:.1},"mb_per_s":{:.3},"#,
                r#""latency_ms":{},"delivery":{},"errors":[{}],"other_errors":{},"ok":{}}}"#
            ),
            json_string(self.run_id),
            json_string(&cli.server),
            cli.sessions,
            cli.messages,
            cli.size,
            cli.per_session,
            cli.pipelining,
            s.connections,
            s.pipelined_connections,
            s.connect_failures,
            s.accepted,
            s.refused,
            s.rcpt_refused,
            s.failed,
            self.not_sent(),
            self.mean_size(),
            self.elapsed.as_secs_f64(),
            self.accepted_per_sec(),
            self.mb_per_sec(),
            latency,
            delivery,
            errors,
            s.errors.others,
            self.success()
        )
    }
}

/// `amount` per second over `elapsed`; 0 when nothing elapsed.
fn per_sec(amount: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn json_strings() {
        assert_eq!(json_string("plain"), r#""plain""#);
        assert_eq!(
            json_string("a \"q\" \\ \r\n\u{1}é"),
            r#""a \"q\" \\ \r\n\u0001é""#
        );
    }

    #[test]
    fn report_shapes() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "--server",
            "h:25",
            "--sessions",
            "2",
            "--messages",
            "4",
            "--size",
            "1000",
            "--to",
            "a@x",
            "--maildir-glob",
            "/nowhere/*/new",
        ])
        .expect("valid command line");
        let mut stats = Stats {
            accepted: 3,
            refused: 1,
            deliveries: 3,
            accepted_bytes: 3000,
            connections: 2,
            latencies: vec![Duration::from_millis(2); 3],
            ..Stats::default()
        };
        stats.errors.add("550 5.1.1 \"no\"".to_owned(), 1);
        let report = Report {
            cli: &cli,
            run_id: "r1",
            stats: &stats,
            elapsed: Duration::from_secs(2),
            latency: Percentiles::of(&mut stats.latencies.clone()),
            delivery: Some(Delivery {
                expected: 3,
                delivered: 3,
                elapsed: Some(Duration::from_secs(3)),
            }),
        };
        assert!(!report.success(), "one message was refused");
        let json = report.json();
        assert!(json.starts_with(r#"{"run_id":"r1","server":"h:25","#));
        assert!(json.contains(r#""accepted":3,"refused":1,"#));
        assert!(json.contains(
            r#""mean_size":1000,"elapsed_s":2.000,"accepted_per_s":1.5,"mb_per_s":0.002,"#
        ));
        assert!(json.contains(r#""latency_ms":{"p50":2.000,"#));
        assert!(json.contains(
            r#""delivery":{"expected":3,"delivered":3,"elapsed_s":3.000,"delivered_per_s":1.0}"#
        ));
        assert!(json.contains(r#""errors":[{"count":1,"error":"550 5.1.1 \"no\""}]"#));
        assert!(json.ends_with(r#""ok":false}"#));
        let human = report.human();
        assert!(human.contains("accepted:     3\n"));
        assert!(human.contains("  1 x 550 5.1.1 \"no\"\n"));
        assert!(human.ends_with("result:       FAILED\n"));
    }
}
