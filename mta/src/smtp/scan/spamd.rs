//! SpamAssassin's spamd: the SPAMC protocol's SYMBOLS command, which
//! answers the verdict and the names of the rules that hit, without
//! sending the message back.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{connect, ScanError};
use common::config::ScannerAddress;

/// The reply is a status line, a few headers and a list of rule names.
const MAX_REPLY: u64 = 64 * 1024;

/// spamd's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct SpamVerdict {
    pub spam: bool,
    pub score: f64,
    pub required: f64,
    /// The rules that hit.
    pub symbols: Vec<String>,
}

impl SpamVerdict {
    /// `X-Spam-Status:` (and `X-Spam-Flag:` for spam), in SpamAssassin's
    /// own form, which filters and clients already know.
    pub fn headers(&self) -> String {
        let mut status = format!(
            "X-Spam-Status: {}, score={:.1} required={:.1} tests=",
            if self.spam { "Yes" } else { "No" },
            self.score,
            self.required
        );
        // RFC 5322 2.2.3: fold long fields, here between rule names.
        let mut line_len = status.len();
        for (i, symbol) in self.symbols.iter().enumerate() {
            let piece = if i == 0 {
                symbol.clone()
            } else {
                format!(",{symbol}")
            };
            if line_len + piece.len() > 78 && i > 0 {
                status.push_str(",\r\n\t");
                status.push_str(symbol);
                line_len = 1 + symbol.len();
            } else {
                status.push_str(&piece);
                line_len += piece.len();
            }
        }
        if self.symbols.is_empty() {
            status.push_str("none");
        }
        status.push_str("\r\n");
        if self.spam {
            status.insert_str(0, "X-Spam-Flag: YES\r\n");
        }
        status
    }
}

/// Send the file at `path` (`size` bytes) to spamd at `address`.
pub async fn scan(
    address: &ScannerAddress,
    path: &Path,
    size: u64,
) -> Result<SpamVerdict, ScanError> {
    let file = tokio::fs::File::open(path).await.map_err(ScanError::Read)?;
    let mut stream = connect(address).await?;
    let request = format!("SYMBOLS SPAMC/1.5\r\nContent-length: {size}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let copied = tokio::io::copy(&mut file.take(size), &mut stream).await?;
    if copied != size {
        return Err(ScanError::Read(std::io::ErrorKind::UnexpectedEof.into()));
    }
    stream.flush().await?;
    let mut reply = Vec::new();
    stream.take(MAX_REPLY).read_to_end(&mut reply).await?;
    parse_reply(&reply)
}

/// `SPAMD/1.1 0 EX_OK`, headers (`Spam: True ; 1000.0 / 5.0`), an empty
/// line and the comma-separated rule names.
fn parse_reply(reply: &[u8]) -> Result<SpamVerdict, ScanError> {
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut words = status.split_whitespace();
    let protocol_ok = words.next().is_some_and(|p| p.starts_with("SPAMD/"));
    let code = words.next();
    if !protocol_ok || code != Some("0") {
        let shown: String = status
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        return Err(ScanError::Protocol(shown));
    }
    let spam_line = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("Spam"))
        .map(|(_, value)| value.trim())
        .ok_or_else(|| ScanError::Protocol("no Spam header".into()))?;
    let bad = || ScanError::Protocol(format!("bad Spam header: {spam_line}"));
    let (flag, scores) = spam_line.split_once(';').ok_or_else(bad)?;
    let (score, required) = scores.split_once('/').ok_or_else(bad)?;
    let spam = match flag.trim() {
        f if f.eq_ignore_ascii_case("true") || f.eq_ignore_ascii_case("yes") => true,
        f if f.eq_ignore_ascii_case("false") || f.eq_ignore_ascii_case("no") => false,
        _ => return Err(bad()),
    };
    let number = |s: &str| s.trim().parse::<f64>().ok().filter(|n| n.is_finite());
    let symbols = body
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect()
        })
        .take(200)
        .collect();
    Ok(SpamVerdict {
        spam,
        score: number(score).ok_or_else(bad)?,
        required: number(required).ok_or_else(bad)?,
        symbols,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let v = parse_reply(
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 17\r\nSpam: True ; 1000.0 / 5.0\r\n\r\nGTUBE,MSGID_SHORT",
        )
        .unwrap();
        assert!(v.spam);
        assert_eq!((v.score, v.required), (1000.0, 5.0));
        assert_eq!(v.symbols, ["GTUBE", "MSGID_SHORT"]);
        assert_eq!(
            v.headers(),
            "X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=1000.0 required=5.0 tests=GTUBE,MSGID_SHORT\r\n"
        );
        let ham = parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.1 / 5.0\r\n\r\n").unwrap();
        assert!(!ham.spam);
        assert_eq!(
            ham.headers(),
            "X-Spam-Status: No, score=-0.1 required=5.0 tests=none\r\n"
        );
    }

    #[test]
    fn long_rule_lists_are_folded() {
        let v = SpamVerdict {
            spam: false,
            score: 1.0,
            required: 5.0,
            symbols: (0..12).map(|i| format!("SOME_LONG_RULE_{i}")).collect(),
        };
        let headers = v.headers();
        assert!(headers.lines().all(|l| l.len() <= 78), "{headers}");
        assert_eq!(headers.matches("SOME_LONG_RULE_").count(), 12);
        assert!(headers.contains(",\r\n\tSOME_LONG_RULE_"));
    }

    #[test]
    fn errors() {
        assert!(parse_reply(b"SPAMD/1.0 76 Bad header line: x\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe ; 1 / 5\r\n\r\n").is_err());
        assert!(parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; NaN / 5\r\n\r\n").is_err());
        assert!(parse_reply(b"").is_err());
    }
}
