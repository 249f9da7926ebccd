//! Command line of `loadgen`.

use std::time::Duration;

use clap::{Parser, ValueEnum};

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

    /// TLS: `starttls` sends STARTTLS after EHLO and EHLO again (RFC 3207,
    /// port 587), `implicit` talks TLS from the connect (RFC 8314, port 465).
    /// Needs --tls-insecure: loadgen has no trust store to verify with.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = TlsMode::None,
        requires_ifs = [("starttls", "tls_insecure"), ("implicit", "tls_insecure")])]
    pub tls: TlsMode,

    /// Accept any server certificate (self-signed test installations); the
    /// handshake signatures are still verified. Required with --tls.
    #[arg(long)]
    pub tls_insecure: bool,

    /// Log in with AUTH PLAIN (RFC 4954, 4616) as USER once per connection,
    /// after EHLO (after the second EHLO with STARTTLS). The server may
    /// insist that --from is an address of USER.
    #[arg(long, value_name = "USER", requires = "auth_password", value_parser = parse_credential)]
    pub auth_user: Option<String>,

    /// Password of --auth-user (or from the environment, which keeps it off
    /// the process list).
    #[arg(long, value_name = "PASS", env = "LOADGEN_AUTH_PASSWORD", hide_env_values = true,
        value_parser = parse_credential)]
    pub auth_password: Option<String>,

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

/// How the connections use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsMode {
    /// Plain TCP.
    None,
    /// STARTTLS after the first EHLO.
    Starttls,
    /// TLS from the connect.
    Implicit,
}

impl Cli {
    /// User and password for AUTH, when given.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        Some((self.auth_user.as_deref()?, self.auth_password.as_deref()?))
    }

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

/// Accepts a SASL PLAIN user name or password: not empty, no NUL (the
/// separator of the PLAIN message).
fn parse_credential(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains('\0') {
        return Err("must not contain NUL".into());
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
        assert_eq!(cli.tls, TlsMode::None);
        assert_eq!(cli.credentials(), None);
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

    /// The arguments every command line of the tests shares.
    const BASE: [&str; 11] = [
        "loadgen",
        "--server",
        "127.0.0.1:10587",
        "--sessions",
        "1",
        "--messages",
        "1",
        "--size",
        "1",
        "--to",
        "a@x.test",
    ];

    fn parse(extra: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(BASE.iter().chain(extra))
    }

    #[test]
    fn tls_and_auth_options() {
        let cli = parse(&[
            "--tls",
            "starttls",
            "--tls-insecure",
            "--auth-user",
            "u@x.test",
            "--auth-password",
            "pw",
        ])
        .expect("valid");
        assert_eq!(cli.tls, TlsMode::Starttls);
        assert!(cli.tls_insecure);
        assert_eq!(cli.credentials(), Some(("u@x.test", "pw")));
        let cli = parse(&["--tls", "implicit", "--tls-insecure"]).expect("valid");
        assert_eq!(cli.tls, TlsMode::Implicit);
        assert_eq!(parse(&["--tls", "none"]).expect("valid").tls, TlsMode::None);
        assert!(
            parse(&["--tls", "starttls"]).is_err(),
            "no trust store: --tls-insecure is required"
        );
        assert!(parse(&["--tls", "implicit"]).is_err());
        assert!(parse(&["--tls", "ssl", "--tls-insecure"]).is_err());
        if std::env::var_os("LOADGEN_AUTH_PASSWORD").is_none() {
            assert!(
                parse(&["--auth-user", "u@x.test"]).is_err(),
                "--auth-user needs a password"
            );
        }
        assert!(parse(&["--auth-user", "", "--auth-password", "pw"]).is_err());
        assert!(parse(&["--auth-user", "u", "--auth-password", "p\0w"]).is_err());
    }

    #[test]
    fn credentials() {
        assert_eq!(parse_credential("pässword 1").as_deref(), Ok("pässword 1"));
        assert!(parse_credential("").is_err());
        assert!(parse_credential("a\0b").is_err());
    }
}
