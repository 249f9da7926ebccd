//! The final report, for humans or as one JSON object.

use std::fmt::Write as _;
use std::time::Duration;

use crate::cli::{Cli, TlsMode};
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
    /// Connect to ready for MAIL, over the established connections.
    pub setup: Option<Percentiles>,
    /// The TLS handshakes.
    pub tls_handshake: Option<Percentiles>,
    /// AUTH to 235.
    pub auth: Option<Percentiles>,
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

    /// How the connections were secured and logged in, for the first line
    /// of the human report (empty for plain TCP without AUTH).
    fn security(&self) -> String {
        let mut out = match self.cli.tls {
            TlsMode::None => String::new(),
            TlsMode::Starttls => ", STARTTLS".to_owned(),
            TlsMode::Implicit => ", implicit TLS".to_owned(),
        };
        if self.cli.tls != TlsMode::None && self.cli.tls_insecure {
            out.push_str(" (certificate not verified)");
        }
        if let Some(user) = &self.cli.auth_user {
            let _ = write!(out, ", AUTH PLAIN as {user}");
        }
        out
    }

    /// The steps of connection setup, for the human report.
    fn setup_steps(&self) -> &'static str {
        match (self.cli.tls, self.cli.auth_user.is_some()) {
            (TlsMode::None, false) => "connect, greeting, EHLO",
            (TlsMode::None, true) => "connect, greeting, EHLO, AUTH",
            (TlsMode::Starttls, false) => "connect, greeting, EHLO, STARTTLS, TLS, EHLO",
            (TlsMode::Starttls, true) => "connect, greeting, EHLO, STARTTLS, TLS, EHLO, AUTH",
            (TlsMode::Implicit, false) => "connect, TLS, greeting, EHLO",
            (TlsMode::Implicit, true) => "connect, TLS, greeting, EHLO, AUTH",
        }
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
            "loadgen {} -> {}: {} sessions, {} messages of ~{} bytes, {} per connection, {pipelining}{}",
            self.run_id,
            cli.server,
            cli.sessions,
            cli.messages,
            cli.size,
            cli.per_session,
            self.security()
        );
        let auth_refused = if cli.auth_user.is_some() {
            format!(", {} of them AUTH refused", s.auth_failures)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "connections:  {} ({} failed to set up{auth_refused})",
            s.connections, s.connect_failures
        );
        if let Some(p) = &self.setup {
            let _ = writeln!(
                out,
                "setup:        {} per connection ({})",
                human_percentiles(p),
                self.setup_steps()
            );
        }
        if let Some(p) = &self.tls_handshake {
            let _ = writeln!(
                out,
                "TLS:          {} per handshake ({})",
                human_percentiles(p),
                s.tls_session.as_deref().unwrap_or("?")
            );
        }
        if let Some(p) = &self.auth {
            let _ = writeln!(
                out,
                "AUTH:         {} (AUTH PLAIN -> 235)",
                human_percentiles(p)
            );
        }
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
                "latency:      {} (end of data -> 250)",
                human_percentiles(p)
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
        let tls = match cli.tls {
            TlsMode::None => "null",
            TlsMode::Starttls => r#""starttls""#,
            TlsMode::Implicit => r#""implicit""#,
        };
        let optional = |text: Option<&str>| text.map_or("null".to_owned(), json_string);
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
                r#""per_session":{},"pipelining":{},"tls":{},"auth_user":{},"#,
                r#""connections":{},"pipelined_connections":{},"connect_failures":{},"auth_failures":{},"#,
                r#""setup_ms":{},"tls_handshake_ms":{},"auth_ms":{},"tls_session":{},"#,
                r#""accepted":{},"refused":{},"rcpt_refused":{},"failed":{},"#,
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
            tls,
            optional(cli.auth_user.as_deref()),
            s.connections,
            s.pipelined_connections,
            s.connect_failures,
            s.auth_failures,
            json_percentiles(self.setup.as_ref()),
            json_percentiles(self.tls_handshake.as_ref()),
            json_percentiles(self.auth.as_ref()),
            optional(s.tls_session.as_deref()),
            s.accepted,
            s.refused,
            s.rcpt_refused,
            s.failed,
            self.not_sent(),
            self.mean_size(),
            self.elapsed.as_secs_f64(),
            self.accepted_per_sec(),
            self.mb_per_sec(),
            json_percentiles(self.latency.as_ref()),
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

/// `p` in milliseconds for the human report.
fn human_percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.max)
    )
}

/// `p` in milliseconds as a JSON object, or null.
fn json_percentiles(p: Option<&Percentiles>) -> String {
    match p {
        Some(p) => format!(
            r#"{{"p50":{:.3},"p90":{:.3},"p99":{:.3},"max":{:.3}}}"#,
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.max)
        ),
        None => "null".to_owned(),
    }
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
            setup_times: vec![Duration::from_micros(300); 2],
            ..Stats::default()
        };
        stats.errors.add("550 5.1.1 \"no\"".to_owned(), 1);
        let report = Report {
            cli: &cli,
            run_id: "r1",
            stats: &stats,
            elapsed: Duration::from_secs(2),
            latency: Percentiles::of(&mut stats.latencies.clone()),
            setup: Percentiles::of(&mut stats.setup_times.clone()),
            tls_handshake: None,
            auth: None,
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
        assert!(json.contains(concat!(
            r#""pipelining":false,"tls":null,"auth_user":null,"connections":2,"#,
            r#""pipelined_connections":0,"connect_failures":0,"auth_failures":0,"#,
            r#""setup_ms":{"p50":0.300,"p90":0.300,"p99":0.300,"max":0.300},"#,
            r#""tls_handshake_ms":null,"auth_ms":null,"tls_session":null,"#
        )));
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(parsed["accepted"], 3);
        let human = report.human();
        assert!(human.contains(" per connection, no pipelining\n"));
        assert!(human.contains("connections:  2 (0 failed to set up)\n"));
        assert!(human.contains(
            "setup:        p50 0.30 ms, p90 0.30 ms, p99 0.30 ms, max 0.30 ms per connection (connect, greeting, EHLO)\n"
        ));
        assert!(!human.contains("TLS:"));
        assert!(!human.contains("AUTH"));
        assert!(human.contains("accepted:     3\n"));
        assert!(human.contains("  1 x 550 5.1.1 \"no\"\n"));
        assert!(human.ends_with("result:       FAILED\n"));
    }

    #[test]
    fn report_with_tls_and_auth() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "--server",
            "127.0.0.1:10587",
            "--sessions",
            "1",
            "--messages",
            "2",
            "--size",
            "1000",
            "--to",
            "a@x",
            "--tls",
            "starttls",
            "--tls-insecure",
            "--auth-user",
            "u@x",
            "--auth-password",
            "secret",
        ])
        .expect("valid command line");
        let mut stats = Stats {
            accepted: 2,
            deliveries: 2,
            accepted_bytes: 2000,
            connections: 1,
            connect_failures: 1,
            auth_failures: 1,
            latencies: vec![Duration::from_millis(2); 2],
            setup_times: vec![Duration::from_millis(25)],
            tls_handshakes: vec![Duration::from_millis(3)],
            auth_times: vec![Duration::from_millis(20)],
            tls_session: Some("TLSv1_3, TLS13_AES_256_GCM_SHA384, X25519".to_owned()),
            ..Stats::default()
        };
        stats.errors.add(
            "AUTH refused: 535 5.7.8 Authentication credentials invalid".to_owned(),
            1,
        );
        let report = Report {
            cli: &cli,
            run_id: "r2",
            stats: &stats,
            elapsed: Duration::from_secs(1),
            latency: Percentiles::of(&mut stats.latencies.clone()),
            setup: Percentiles::of(&mut stats.setup_times.clone()),
            tls_handshake: Percentiles::of(&mut stats.tls_handshakes.clone()),
            auth: Percentiles::of(&mut stats.auth_times.clone()),
            delivery: None,
        };
        assert!(report.success(), "every message was accepted");
        let json = report.json();
        assert!(json.contains(concat!(
            r#""tls":"starttls","auth_user":"u@x","connections":1,"pipelined_connections":0,"#,
            r#""connect_failures":1,"auth_failures":1,"#,
            r#""setup_ms":{"p50":25.000,"p90":25.000,"p99":25.000,"max":25.000},"#,
            r#""tls_handshake_ms":{"p50":3.000,"#
        )));
        assert!(json.contains(
            r#""auth_ms":{"p50":20.000,"p90":20.000,"p99":20.000,"max":20.000},"tls_session":"TLSv1_3, TLS13_AES_256_GCM_SHA384, X25519","#
        ));
        assert!(!json.contains("secret"), "no password in the report");
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(parsed["setup_ms"]["p99"], 25.0);
        let human = report.human();
        assert!(!human.contains("secret"));
        assert!(human
            .contains("no pipelining, STARTTLS (certificate not verified), AUTH PLAIN as u@x\n"));
        assert!(human.contains("connections:  1 (1 failed to set up, 1 of them AUTH refused)\n"));
        assert!(human.contains(
            "setup:        p50 25.00 ms, p90 25.00 ms, p99 25.00 ms, max 25.00 ms per connection (connect, greeting, EHLO, STARTTLS, TLS, EHLO, AUTH)\n"
        ));
        assert!(human.contains(
            "TLS:          p50 3.00 ms, p90 3.00 ms, p99 3.00 ms, max 3.00 ms per handshake (TLSv1_3, TLS13_AES_256_GCM_SHA384, X25519)\n"
        ));
        assert!(human.contains("AUTH:         p50 20.00 ms, p90 20.00 ms, p99 20.00 ms, max 20.00 ms (AUTH PLAIN -> 235)\n"));
        assert!(
            human.contains("  1 x AUTH refused: 535 5.7.8 Authentication credentials invalid\n")
        );
        assert!(human.ends_with("result:       OK\n"));
    }
}
