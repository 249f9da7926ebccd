//! ClamAV's clamd: the INSTREAM command (clamd(8)), which takes the message
//! over the socket in length-prefixed chunks, so clamd needs no access to
//! our spool.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{connect, ScanError};
use common::config::ScannerAddress;

/// Bytes of one INSTREAM chunk.
const CHUNK: usize = 64 * 1024;
/// clamd's answers are one short line; more is not clamd.
const MAX_REPLY: usize = 4096;

/// What clamd found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAnswer {
    Clean,
    /// The name of the signature that matched.
    Infected(String),
}

/// Stream the file at `path` (`size` bytes) to clamd at `address`.
pub async fn scan(
    address: &ScannerAddress,
    path: &Path,
    size: u64,
) -> Result<ClamdAnswer, ScanError> {
    let mut file = tokio::fs::File::open(path).await.map_err(ScanError::Read)?;
    let mut stream = connect(address).await?;
    // The `z` prefix: the command and the reply end with NUL.
    let sent = async {
        stream.write_all(b"zINSTREAM\0").await?;
        let mut remaining = size;
        let mut buf = vec![0u8; CHUNK];
        while remaining > 0 {
            let want = remaining.min(CHUNK as u64) as usize;
            let n = file.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            stream.write_all(&(n as u32).to_be_bytes()).await?;
            stream.write_all(&buf[..n]).await?;
            remaining -= n as u64;
        }
        stream.write_all(&0u32.to_be_bytes()).await?;
        stream.flush().await
    }
    .await;
    // clamd past its StreamMaxLength answers and closes while we write:
    // its reply says more than our write error.
    let reply = read_reply(&mut stream).await;
    match (reply, sent) {
        (Ok(reply), _) if !reply.is_empty() => parse_reply(&reply),
        (_, Err(e)) | (Err(e), _) => Err(ScanError::Io(e)),
        (Ok(_), Ok(())) => Err(ScanError::Protocol("no answer".into())),
    }
}

async fn read_reply(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    let mut limited = stream.take(MAX_REPLY as u64);
    let mut byte = [0u8; 256];
    loop {
        let n = limited.read(&mut byte).await?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&byte[..n]);
        if reply.contains(&0) {
            break;
        }
    }
    Ok(reply)
}

/// clamd's reply: `stream: OK`, `stream: <name> FOUND`, or `<text> ERROR`.
fn parse_reply(reply: &[u8]) -> Result<ClamdAnswer, ScanError> {
    let text = String::from_utf8_lossy(reply);
    let text = text.trim_end_matches(['\0', '\n', '\r']).trim();
    let answer = text.strip_prefix("stream:").map(str::trim);
    match answer {
        Some("OK") => Ok(ClamdAnswer::Clean),
        Some(a) if a.ends_with(" FOUND") => {
            let name = a.trim_end_matches(" FOUND").trim();
            // The name goes into a reply line and the log.
            let name: String = name
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(200)
                .collect();
            Ok(ClamdAnswer::Infected(name))
        }
        _ => Err(ScanError::Protocol(
            text.chars().filter(|c| !c.is_control()).take(200).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"stream: OK\0").unwrap(), ClamdAnswer::Clean);
        assert_eq!(
            parse_reply(b"stream: Eicar-Test-Body.UNOFFICIAL FOUND\0").unwrap(),
            ClamdAnswer::Infected("Eicar-Test-Body.UNOFFICIAL".into())
        );
        let error = parse_reply(b"INSTREAM size limit exceeded. ERROR\0").unwrap_err();
        assert_eq!(
            error.to_string(),
            "unexpected answer: INSTREAM size limit exceeded. ERROR"
        );
        assert!(parse_reply(b"stream: \x01odd\0").is_err());
    }
}
