//! Command line of `loadgen`.

use std::time::Duration;

use clap::Parser;

/// SMTP load generator: sends messages to any SMTP server over concurrent
/// sessions and reports throughput, latency and (optionally) Maildir delivery.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
pub struct Cli {
    /// SMTP server to load, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub server: String,

    /// Number of concurrent SMTP sessions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub sessions: u64,

    /// Total number of messages, shared by all sessions.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,

    /// Approximate size of each message in bytes, headers included.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub size: u64,

    /// Messages sent per connection before QUIT and reconnecting.
    #[arg(long, value_name = "K", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub per_session: u64,

    /// Send MAIL, RCPT and DATA in one write when the server advertises PIPELINING.
    #[arg(long)]
    pub pipelining: bool,

    /// Envelope sender and From: address.
    #[arg(long, value_name = "ADDR", default_value = "loadgen@localhost", value_parser = parse_address)]
    pub from: String,

    /// Envelope recipient (repeat for several recipients per message).
    #[arg(long, value_name = "ADDR", required = true, value_parser = parse_address)]
    pub to: Vec<String>,

    /// Glob of Maildir directories (e.g. 'DIR/mail/example.test/*/new') in
    /// which to count the delivered files after sending.
    #[arg(long, value_name = "GLOB")]
    pub maildir_glob: Option<String>,

    /// Number of new files expected under --maildir-glob. Default: one per
    /// accepted recipient of each accepted message.
    #[arg(long, value_name = "N", requires = "maildir_glob")]
    pub expect_files: Option<u64>,

    /// Seconds to wait for the delivered files once sending is over.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,

    /// Seconds allowed for each network connect, read and write.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub io_timeout: u64,

    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    pub json: bool,
}

impl Cli {
    /// The per-operation network timeout.
    pub fn io_timeout(&self) -> Duration {
        Duration::from_secs(self.io_timeout)
    }

    /// How long to wait for deliveries after sending.
    pub fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }
}

/// Accepts an address that can be put between `<` and `>` in an SMTP
/// command and in a header: printable ASCII, no spaces or angle brackets.
fn parse_address(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 254 {
        return Err("address must be 1 to 254 characters".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
    {
        return Err("address may only contain printable ASCII, without spaces or <>".into());
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_address("a@b.test").as_deref(), Ok("a@b.test"));
        assert!(parse_address("").is_err());
        assert!(parse_address("a b@c").is_err());
        assert!(parse_address("a@b>\r\nRCPT TO:<x@y").is_err());
    }

    #[test]
    fn command_line() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "--server",
            "127.0.0.1:10025",
            "--sessions",
            "4",
            "--messages",
            "100",
            "--size",
            "2048",
            "--to",
            "a@x.test",
            "--to",
            "b@x.test",
        ])
        .expect("valid command line");
        assert_eq!(cli.to, ["a@x.test", "b@x.test"]);
        assert_eq!(cli.per_session, 10);
        assert_eq!(cli.timeout, 120);
        assert!(!cli.pipelining);
        let missing_to = Cli::try_parse_from([
            "loadgen",
            "--server",
            "h:25",
            "--sessions",
            "1",
            "--messages",
            "1",
            "--size",
            "1",
        ]);
        assert!(missing_to.is_err());
    }
}
