//! The generated test messages.
//!
//! The body is made once per run; each message gets its own headers
//! (Message-ID and Subject carry the run id and the message number).

/// Length of a full body line, CRLF excluded (RFC 5322 recommends at most 78).
const LINE_LEN: usize = 76;

/// Every this many lines a body line starts with a dot, so that the server's
/// dot-unstuffing is exercised.
const DOT_EVERY: usize = 10;

/// Text the body lines are cut from.
const FILLER: &[u8] = b"The quick brown fox jumps over the lazy dog; \
    PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS. 0123456789 -- ";

/// What the messages of a run have in common.
pub struct MessageTemplate {
    run_id: String,
    from: String,
    /// Value of the To: header (folded when there are several recipients).
    to: String,
    date: String,
    /// The body, dot-stuffed, followed by the end-of-data line.
    wire_body: Vec<u8>,
    /// Length of the body before dot-stuffing.
    body_len: usize,
}

/// One message ready to go after DATA.
pub struct Message {
    /// Headers, dot-stuffed body and the final `.` line.
    pub wire: Vec<u8>,
    /// Size of the message itself (headers and body, CRLF line ends, no
    /// dot-stuffing): the SIZE= parameter and what throughput counts.
    pub size: u64,
}

impl MessageTemplate {
    /// Prepares messages of about `size` bytes, headers included.
    pub fn new(run_id: &str, from: &str, to: &[String], unix_time: u64, size: usize) -> Self {
        let to = to
            .iter()
            .map(|addr| format!("<{addr}>"))
            .collect::<Vec<_>>()
            .join(",\r\n ");
        let mut template = MessageTemplate {
            run_id: run_id.to_owned(),
            from: from.to_owned(),
            to,
            date: rfc5322_date(unix_time),
            wire_body: Vec::new(),
            body_len: 0,
        };
        let header_len = template.headers(0).len();
        let body = body_text(size.saturating_sub(header_len));
        template.body_len = body.len();
        template.wire_body = dot_stuff(&body);
        template.wire_body.extend_from_slice(b".\r\n");
        template
    }

    /// Message number `n` of the run.
    pub fn render(&self, n: u64) -> Message {
        let headers = self.headers(n);
        let mut wire = Vec::with_capacity(headers.len() + self.wire_body.len());
        wire.extend_from_slice(headers.as_bytes());
        wire.extend_from_slice(&self.wire_body);
        let size = (headers.len() + self.body_len) as u64;
        Message { wire, size }
    }

    /// The header block of message `n`, blank line included.
    fn headers(&self, n: u64) -> String {
        let MessageTemplate {
            run_id,
            from,
            to,
            date,
            ..
        } = self;
        format!(
            "Date: {date}\r\n\
             From: <{from}>\r\n\
             To: {to}\r\n\
             Subject: loadgen {run_id} {n}\r\n\
             Message-ID: <{run_id}.{n}@loadgen.invalid>\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\
             \r\n"
        )
    }
}

/// A body of about `len` bytes (at least one line): CRLF-terminated lines of
/// [`LINE_LEN`] characters, the last one shorter; every [`DOT_EVERY`]th line
/// starts with a dot. Not dot-stuffed.
fn body_text(len: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(len + LINE_LEN + 2);
    let mut line = 0;
    while body.is_empty() || body.len() + 2 < len {
        let chars = len.saturating_sub(body.len() + 2).clamp(1, LINE_LEN);
        let start = body.len();
        body.extend((0..chars).map(|i| FILLER[(line * 7 + i) % FILLER.len()]));
        if line % DOT_EVERY == DOT_EVERY - 1 {
            body[start] = b'.';
        }
        body.extend_from_slice(b"\r\n");
        line += 1;
    }
    body
}

/// Dot-stuffs CRLF text for DATA (RFC 5321 section 4.5.2): a dot starting a
/// line is doubled.
fn dot_stuff(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / LINE_LEN + 1);
    for (i, &b) in text.iter().enumerate() {
        if b == b'.' && (i == 0 || text[i - 1] == b'\n') {
            out.push(b'.');
        }
        out.push(b);
    }
    out
}

/// Formats a Unix time as an RFC 5322 date in UTC.
fn rfc5322_date(unix_time: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_time / 86_400;
    let secs = unix_time % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Year, month (1-12) and day of the month of a count of days since
/// 1970-01-01 (H. Hinnant's algorithm, for dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Undoes [`dot_stuff`], as a server does.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in wire.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }

    fn lines(text: &[u8]) -> Vec<&[u8]> {
        text.split_inclusive(|&b| b == b'\n').collect()
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".\r\n"), b"..\r\n");
        assert_eq!(
            dot_stuff(b".a\r\nb.c\r\n.\r\n..d\r\n"),
            b"..a\r\nb.c\r\n..\r\n...d\r\n"
        );
        assert_eq!(dot_stuff(b"no dots\r\n"), b"no dots\r\n");
    }

    #[test]
    fn body_lines() {
        let body = body_text(10_000);
        assert!(body.len().abs_diff(10_000) <= 2, "len {}", body.len());
        let lines = lines(&body);
        assert!(lines.len() > DOT_EVERY);
        for line in &lines {
            let text = line.strip_suffix(b"\r\n").expect("CRLF line end");
            assert!(!text.is_empty() && text.len() <= LINE_LEN);
            assert!(!text.contains(&b'\r') && !text.contains(&b'\n'));
        }
        assert!(lines[..lines.len() - 1]
            .iter()
            .all(|l| l.len() == LINE_LEN + 2));
        assert!(lines.iter().filter(|l| l.starts_with(b".")).count() >= 10);
        assert_eq!(body_text(0), b"T\r\n", "at least one line");
        assert_eq!(body_text(3), b"T\r\n");
    }

    #[test]
    fn generated_body_is_dot_stuffed() {
        let body = body_text(5_000);
        let wire = dot_stuff(&body);
        for (plain, stuffed) in lines(&body).iter().zip(lines(&wire)) {
            if plain.starts_with(b".") {
                assert_eq!(&stuffed[1..], *plain);
                assert!(stuffed.starts_with(b".."));
            } else {
                assert_eq!(stuffed, *plain);
            }
        }
        assert_eq!(unstuff(&wire), body);
    }

    #[test]
    fn rendered_message() {
        let to = vec!["a@x.test".to_owned(), "b@x.test".to_owned()];
        let template = MessageTemplate::new("run1", "s@y.test", &to, 1_700_000_000, 4096);
        let msg = template.render(42);
        let wire = &msg.wire;
        assert!(msg.size.abs_diff(4096) <= 2, "size {}", msg.size);
        assert!(wire.ends_with(b"\r\n.\r\n"));
        let text = String::from_utf8(wire.clone()).expect("ASCII");
        assert!(text.contains("\r\nSubject: loadgen run1 42\r\n"));
        assert!(text.contains("\r\nMessage-ID: <run1.42@loadgen.invalid>\r\n"));
        assert!(text.contains("\r\nTo: <a@x.test>,\r\n <b@x.test>\r\n"));
        assert!(text.starts_with("Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
        // Only the final line is a lone dot; every LF follows a CR.
        let all = lines(wire);
        assert_eq!(all.iter().filter(|l| **l == b".\r\n").count(), 1);
        assert!(all.iter().all(|l| l.ends_with(b"\r\n")));
        assert_eq!(text.matches('\n').count(), text.matches("\r\n").count());
        // Without the end line and unstuffed, it is the message of `size` bytes.
        let message = unstuff(&wire[..wire.len() - 3]);
        assert_eq!(message.len() as u64, msg.size);
    }

    #[test]
    fn tiny_size_still_makes_a_message() {
        let template = MessageTemplate::new("r", "s@y", &["a@x".to_owned()], 0, 1);
        let msg = template.render(0);
        assert!(msg.wire.ends_with(b"\r\n\r\nT\r\n.\r\n"));
        assert!(msg.size > 1);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_709_251_199),
            "Thu, 29 Feb 2024 23:59:59 +0000"
        );
        assert_eq!(
            rfc5322_date(4_102_444_800),
            "Fri, 01 Jan 2100 00:00:00 +0000"
        );
    }
}
