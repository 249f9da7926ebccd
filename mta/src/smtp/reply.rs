//! SMTP replies (RFC 5321 4.2) with enhanced status codes (RFC 3463,
//! RFC 2034).

use std::fmt::Write as _;

/// One reply: a code, an enhanced status code and one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: &'static str,
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced,
            lines: vec![text.into()],
        }
    }

    /// Whether this reply reports an error (4xx or 5xx).
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// The wire form: `code-enh text` lines, the last with a space, CRLF
    /// ended (RFC 5321 4.2.1). The greeting (220) and EHLO's capability
    /// lines have no enhanced code, per RFC 2034 section 3.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            if self.enhanced.is_empty() {
                let _ = write!(out, "{}{sep}{line}\r\n", self.code);
            } else {
                let _ = write!(out, "{}{sep}{} {line}\r\n", self.code, self.enhanced);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        assert_eq!(Reply::new(250, "2.1.0", "Ok").to_wire(), "250 2.1.0 Ok\r\n");
        let multi = Reply {
            code: 250,
            enhanced: "",
            lines: vec!["mx".into(), "PIPELINING".into()],
        };
        assert_eq!(multi.to_wire(), "250-mx\r\n250 PIPELINING\r\n");
        assert!(Reply::new(452, "4.5.3", "x").is_error());
    }
}
