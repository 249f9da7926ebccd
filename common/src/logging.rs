//! Log lines in Postfix's shape, `<time> <program>[<pid>]: <text>`, to
//! stderr. Lines about a message start with its queue id, so
//! `grep QUEUEID` shows the message's whole life.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

struct PostfixFormat {
    program: &'static str,
    pid: u32,
}

impl<S, N> FormatEvent<S, N> for PostfixFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = time::OffsetDateTime::now_utc();
        let stamp = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        write!(writer, "{stamp} {}[{}]: ", self.program, self.pid)?;
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            Level::DEBUG | Level::TRACE => write!(writer, "debug: ")?,
            Level::INFO => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Send this process's log to stderr at `level` (error, warn, info, debug,
/// trace), each line tagged with `program` and the pid.
pub fn init(program: &'static str, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILSRV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(PostfixFormat {
            program,
            pid: std::process::id(),
        })
        .try_init();
}
