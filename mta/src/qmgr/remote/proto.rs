//! The pure parts of the SMTP client: command lines, the DATA encoder,
//! and what a reply means for a recipient.

use smtp_proto::Response;

/// Server capabilities from the EHLO reply that the client uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub auth_plain: bool,
    pub auth_login: bool,
    /// SIZE was announced (RFC 1870).
    pub size_offered: bool,
    /// Its limit; 0 when none was given.
    pub size_limit: u64,
}

impl Capabilities {
    /// From the raw bytes of a 250 reply to EHLO (all lines).
    pub fn parse(raw: &[u8]) -> Capabilities {
        let Ok(ehlo) = smtp_proto::EhloResponse::<String>::parse(&mut raw.iter()) else {
            // Unparsable extension lines: use none of them, as after HELO.
            return Capabilities::default();
        };
        let has = |ext: u32| ehlo.capabilities & ext != 0;
        let auth = |m: u64| ehlo.auth_mechanisms & m != 0;
        Capabilities {
            pipelining: has(smtp_proto::EXT_PIPELINING),
            starttls: has(smtp_proto::EXT_START_TLS),
            eight_bit_mime: has(smtp_proto::EXT_8BIT_MIME),
            smtputf8: has(smtp_proto::EXT_SMTP_UTF8),
            dsn: has(smtp_proto::EXT_DSN),
            auth_plain: has(smtp_proto::EXT_AUTH) && auth(smtp_proto::AUTH_PLAIN),
            auth_login: has(smtp_proto::EXT_AUTH) && auth(smtp_proto::AUTH_LOGIN),
            size_offered: has(smtp_proto::EXT_SIZE),
            size_limit: ehlo.size as u64,
        }
    }
}

/// The MAIL FROM parameters of one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    /// BODY=8BITMIME.
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// RFC 3461 RET (FULL or HDRS), only to DSN servers.
    pub ret: Option<String>,
    /// RFC 3461 ENVID, decoded.
    pub envid: Option<String>,
}

/// `MAIL FROM:<sender> params` with CRLF.
pub fn mail_from(sender: &str, params: &MailParams) -> String {
    let mut line = format!("MAIL FROM:<{sender}>");
    if let Some(size) = params.size {
        line.push_str(&format!(" SIZE={size}"));
    }
    if params.eight_bit {
        line.push_str(" BODY=8BITMIME");
    }
    if params.smtputf8 {
        line.push_str(" SMTPUTF8");
    }
    if let Some(ret) = &params.ret {
        line.push_str(&format!(" RET={ret}"));
    }
    if let Some(envid) = &params.envid {
        line.push_str(&format!(" ENVID={}", xtext(envid)));
    }
    line.push_str("\r\n");
    line
}

/// The RCPT TO parameters of RFC 3461, only to DSN servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// NOTIFY=: "NEVER" or a comma list of SUCCESS, FAILURE, DELAY.
    pub notify: Option<String>,
    /// ORCPT's address (type rfc822), decoded.
    pub orcpt: Option<String>,
}

/// `RCPT TO:<address> params` with CRLF.
pub fn rcpt_to(address: &str, params: &RcptParams) -> String {
    let mut line = format!("RCPT TO:<{address}>");
    if let Some(notify) = &params.notify {
        line.push_str(&format!(" NOTIFY={notify}"));
    }
    if let Some(orcpt) = &params.orcpt {
        line.push_str(&format!(" ORCPT=rfc822;{}", xtext(orcpt)));
    }
    line.push_str("\r\n");
    line
}

/// RFC 3461 4: "+" followed by two upper case hex digits for every byte
/// outside "!" to "~", and for "+" and "=".
pub fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Turns message bytes into the DATA stream: CRLF line ends, a dot added
/// to lines that start with one (RFC 5321 4.5.2), and the final
/// `CRLF.CRLF`. Feed it chunk by chunk; it keeps the state between them.
#[derive(Debug)]
pub struct DataEncoder {
    at_line_start: bool,
    previous: u8,
}

impl Default for DataEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DataEncoder {
    pub fn new() -> DataEncoder {
        DataEncoder {
            at_line_start: true,
            previous: b'\n',
        }
    }

    /// Append the encoding of `chunk` to `out`.
    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 32 + 8);
        for &b in chunk {
            if self.at_line_start && b == b'.' {
                out.push(b'.');
            }
            if b == b'\n' && self.previous != b'\r' {
                out.push(b'\r');
            }
            out.push(b);
            self.at_line_start = b == b'\n';
            self.previous = b;
        }
    }

    /// Append the end of data: a CRLF if the message lacked a final one,
    /// then `.CRLF`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            if self.previous != b'\r' {
                out.push(b'\r');
            }
            out.push(b'\n');
        }
        out.extend_from_slice(b".\r\n");
        self.at_line_start = true;
        self.previous = b'\n';
    }
}

/// Whether a header section carries non-ASCII text, which only an
/// SMTPUTF8 server may get (RFC 6532 3).
pub fn headers_need_utf8(head: &[u8]) -> bool {
    let end = memchr::memmem::find(head, b"\n\r\n")
        .or_else(|| memchr::memmem::find(head, b"\n\n"))
        .unwrap_or(head.len());
    !head[..end].is_ascii()
}

/// The reply as one line for logs and bounces: code, enhanced code and
/// text, continuation lines joined by spaces.
pub fn describe(reply: &Response<String>) -> String {
    let text = reply.message.split('\n').collect::<Vec<_>>().join(" ");
    if reply.esc[0] != 0 {
        format!(
            "{} {}.{}.{} {}",
            reply.code, reply.esc[0], reply.esc[1], reply.esc[2], text
        )
    } else {
        format!("{} {}", reply.code, text)
    }
}

/// The RFC 3463 status for a reply: its own enhanced code when it has
/// one of the right class, else the class with 0.0.
pub fn status_of(reply: &Response<String>) -> String {
    let class = (reply.code / 100) as u8;
    if reply.esc[0] == class {
        format!("{}.{}.{}", reply.esc[0], reply.esc[1], reply.esc[2])
    } else {
        format!("{class}.0.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_all(chunks: &[&[u8]]) -> Vec<u8> {
        let mut enc = DataEncoder::new();
        let mut out = Vec::new();
        for c in chunks {
            enc.encode(c, &mut out);
        }
        enc.finish(&mut out);
        out
    }

    #[test]
    fn dot_stuffing_and_line_ends() {
        assert_eq!(
            encode_all(&[b".a\r\nb\n..c\r\n"]),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        // State carries across chunks: a CR at a chunk's end, a dot at
        // the next chunk's start.
        assert_eq!(encode_all(&[b"a\r", b"\n.", b"b"]), b"a\r\n..b\r\n.\r\n");
        assert_eq!(encode_all(&[b"x"]), b"x\r\n.\r\n");
        assert_eq!(encode_all(&[]), b".\r\n");
        assert_eq!(encode_all(&[b"x\r"]), b"x\r\n.\r\n");
    }

    #[test]
    fn xtext_encodes_plus_equals_and_controls() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext("é"), "+C3+A9");
    }

    #[test]
    fn command_lines() {
        let p = MailParams {
            size: Some(12),
            eight_bit: true,
            smtputf8: false,
            ret: Some("HDRS".into()),
            envid: Some("x+y".into()),
        };
        assert_eq!(
            mail_from("a@b", &p),
            "MAIL FROM:<a@b> SIZE=12 BODY=8BITMIME RET=HDRS ENVID=x+2By\r\n"
        );
        let r = RcptParams {
            notify: Some("SUCCESS,FAILURE".into()),
            orcpt: Some("c@d".into()),
        };
        assert_eq!(
            rcpt_to("c@d", &r),
            "RCPT TO:<c@d> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d\r\n"
        );
        assert_eq!(mail_from("", &MailParams::default()), "MAIL FROM:<>\r\n");
    }

    #[test]
    fn capabilities_from_ehlo() {
        let caps = Capabilities::parse(
            b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250-AUTH LOGIN PLAIN\r\n250-DSN\r\n250 SMTPUTF8\r\n",
        );
        assert!(caps.pipelining && caps.starttls && caps.dsn && caps.smtputf8);
        assert!(caps.auth_plain && caps.auth_login && !caps.eight_bit_mime);
        assert!(caps.size_offered);
        assert_eq!(caps.size_limit, 1000);
        assert_eq!(
            Capabilities::parse(b"250 only.hostname\r\n"),
            Capabilities::default()
        );
    }

    #[test]
    fn statuses() {
        let r = Response {
            code: 550,
            esc: [5, 1, 1],
            message: "no such\nuser".to_string(),
        };
        assert_eq!(describe(&r), "550 5.1.1 no such user");
        assert_eq!(status_of(&r), "5.1.1");
        let r = Response {
            code: 451,
            esc: [0, 0, 0],
            message: "later".to_string(),
        };
        assert_eq!(status_of(&r), "4.0.0");
    }

    #[test]
    fn utf8_headers() {
        assert!(headers_need_utf8("Subject: é\r\n\r\nbody".as_bytes()));
        assert!(!headers_need_utf8("Subject: e\r\n\r\nbodé".as_bytes()));
    }
}
