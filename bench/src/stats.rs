//! Counters each session keeps, and the latency percentiles.

use std::time::Duration;

use crate::smtp::Connection;

/// How many distinct error texts are kept; later ones are only counted.
const MAX_DISTINCT_ERRORS: usize = 5;

/// What one session (or, merged, the whole run) saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages answered 250 after the data.
    pub accepted: u64,
    /// Messages refused by a negative reply (MAIL, all RCPTs, DATA or after the data).
    pub refused: u64,
    /// Messages whose fate is unknown: timeout, lost connection, garbled reply.
    pub failed: u64,
    /// Refused recipients of otherwise accepted messages.
    pub rcpt_refused: u64,
    /// Accepted recipients of accepted messages: the deliveries to expect.
    pub deliveries: u64,
    /// Sum of the sizes of the accepted messages.
    pub accepted_bytes: u64,
    /// SMTP sessions established (greeting and EHLO done, and TLS and AUTH
    /// when asked for).
    pub connections: u64,
    /// Of those, the ones that used PIPELINING.
    pub pipelined_connections: u64,
    /// Connections that could not be established.
    pub connect_failures: u64,
    /// Of those, the ones whose AUTH the server refused.
    pub auth_failures: u64,
    /// Per established connection: start of the connect to ready for MAIL.
    pub setup_times: Vec<Duration>,
    /// Per TLS connection: the handshake.
    pub tls_handshakes: Vec<Duration>,
    /// Per logged-in connection: AUTH to 235.
    pub auth_times: Vec<Duration>,
    /// What the first TLS connection negotiated.
    pub tls_session: Option<String>,
    /// End of data to the 250 reply, per accepted message.
    pub latencies: Vec<Duration>,
    /// The first few distinct errors.
    pub errors: ErrorLog,
}

impl Stats {
    /// Counts the established connection `conn`, which took `setup`.
    pub fn add_connection(&mut self, conn: &Connection, setup: Duration) {
        self.connections += 1;
        self.setup_times.push(setup);
        self.tls_handshakes.extend(conn.tls_handshake);
        self.auth_times.extend(conn.auth);
        if self.tls_session.is_none() {
            self.tls_session.clone_from(&conn.tls_session);
        }
    }

    /// Adds another session's numbers to these.
    pub fn merge(&mut self, other: Stats) {
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.failed += other.failed;
        self.rcpt_refused += other.rcpt_refused;
        self.deliveries += other.deliveries;
        self.accepted_bytes += other.accepted_bytes;
        self.connections += other.connections;
        self.pipelined_connections += other.pipelined_connections;
        self.connect_failures += other.connect_failures;
        self.auth_failures += other.auth_failures;
        self.setup_times.extend(other.setup_times);
        self.tls_handshakes.extend(other.tls_handshakes);
        self.auth_times.extend(other.auth_times);
        if self.tls_session.is_none() {
            self.tls_session = other.tls_session;
        }
        self.latencies.extend(other.latencies);
        for (text, count) in other.errors.distinct {
            self.errors.add(text, count);
        }
        self.errors.others += other.errors.others;
    }
}

/// Distinct error texts in order of first appearance, with how often each
/// occurred, up to [`MAX_DISTINCT_ERRORS`] of them.
#[derive(Debug, Default)]
pub struct ErrorLog {
    /// Error text and count.
    pub distinct: Vec<(String, u64)>,
    /// Errors beyond the distinct ones kept.
    pub others: u64,
}

impl ErrorLog {
    /// Records `count` occurrences of the error `text`.
    pub fn add(&mut self, text: String, count: u64) {
        if let Some(entry) = self.distinct.iter_mut().find(|(t, _)| *t == text) {
            entry.1 += count;
        } else if self.distinct.len() < MAX_DISTINCT_ERRORS {
            self.distinct.push((text, count));
        } else {
            self.others += count;
        }
    }
}

/// Latency summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Percentiles {
    /// Summarises `samples` (sorted in place); `None` if there are none.
    pub fn of(samples: &mut [Duration]) -> Option<Self> {
        samples.sort_unstable();
        Some(Percentiles {
            p50: percentile(samples, 50)?,
            p90: percentile(samples, 90)?,
            p99: percentile(samples, 99)?,
            max: *samples.last()?,
        })
    }
}

/// The `p`th percentile (0 < p <= 100) of sorted samples, nearest-rank
/// method: the smallest sample with at least p% of the samples at or below it.
fn percentile(sorted: &[Duration], p: u64) -> Option<Duration> {
    let n = sorted.len() as u64;
    let rank = (p * n).div_ceil(100).max(1);
    sorted.get(usize::try_from(rank - 1).ok()?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn nearest_rank() {
        let samples: Vec<_> = (1..=10).map(ms).collect();
        assert_eq!(percentile(&samples, 50), Some(ms(5)));
        assert_eq!(percentile(&samples, 90), Some(ms(9)));
        assert_eq!(percentile(&samples, 99), Some(ms(10)));
        assert_eq!(percentile(&samples, 100), Some(ms(10)));
        assert_eq!(percentile(&samples, 1), Some(ms(1)));
        let hundred: Vec<_> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&hundred, 50), Some(ms(50)));
        assert_eq!(percentile(&hundred, 99), Some(ms(99)));
        let thousand: Vec<_> = (1..=1000).map(ms).collect();
        assert_eq!(percentile(&thousand, 99), Some(ms(990)));
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[ms(7)], 99), Some(ms(7)));
    }

    #[test]
    fn summary_sorts() {
        let mut samples = vec![ms(30), ms(10), ms(20), ms(40)];
        let p = Percentiles::of(&mut samples).expect("samples");
        assert_eq!(p.p50, ms(20));
        assert_eq!(p.p90, ms(40));
        assert_eq!(p.p99, ms(40));
        assert_eq!(p.max, ms(40));
        assert_eq!(Percentiles::of(&mut []), None);
    }

    #[test]
    fn errors_are_bounded_and_merged() {
        let mut a = Stats::default();
        for i in 0..8 {
            a.errors.add(format!("550 err {}", i % 7), 1);
        }
        assert_eq!(a.errors.distinct.len(), MAX_DISTINCT_ERRORS);
        assert_eq!(a.errors.distinct[0], ("550 err 0".to_owned(), 2));
        assert_eq!(a.errors.others, 2);
        let mut b = Stats {
            accepted: 3,
            latencies: vec![ms(1)],
            connections: 2,
            connect_failures: 2,
            auth_failures: 1,
            setup_times: vec![ms(20), ms(30)],
            tls_handshakes: vec![ms(2), ms(3)],
            auth_times: vec![ms(15), ms(25)],
            tls_session: Some("TLSv1_3".to_owned()),
            ..Stats::default()
        };
        b.errors.add("550 err 1".to_owned(), 4);
        b.errors.add("451 new".to_owned(), 1);
        a.merge(b);
        assert_eq!(a.accepted, 3);
        assert_eq!(a.latencies, [ms(1)]);
        assert_eq!(
            (a.connections, a.connect_failures, a.auth_failures),
            (2, 2, 1)
        );
        assert_eq!(a.setup_times, [ms(20), ms(30)]);
        assert_eq!(a.tls_handshakes, [ms(2), ms(3)]);
        assert_eq!(a.auth_times, [ms(15), ms(25)]);
        assert_eq!(a.tls_session.as_deref(), Some("TLSv1_3"));
        assert_eq!(a.errors.distinct[1], ("550 err 1".to_owned(), 5));
        assert_eq!(a.errors.others, 3);
    }
}
