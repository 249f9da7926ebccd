//! The relay host's AUTH credentials file: one `username:password` line,
//! readable by qmgr and by no other user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why the credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: holds a password but is accessible to every user; chmod o-rwx it")]
    Exposed { path: PathBuf },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: &'static str,
    },
}

/// Read `username:password` from `path` (lines starting with `#` and
/// blank lines are skipped).
pub fn load(path: &Path) -> Result<(String, String), CredentialsError> {
    let read = |source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(CredentialsError::Exposed {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    parse(&text).map_err(|(line, message)| CredentialsError::Syntax {
        path: path.to_path_buf(),
        line,
        message,
    })
}

fn parse(text: &str) -> Result<(String, String), (usize, &'static str)> {
    let mut found = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let Some((n, line)) = found.next() else {
        return Err((1, "no username:password line"));
    };
    if found.next().is_some() {
        return Err((n + 2, "more than one username:password line"));
    }
    match line.split_once(':') {
        Some((user, password)) if !user.is_empty() && !password.is_empty() => {
            Ok((user.to_string(), password.to_string()))
        }
        _ => Err((n + 1, "expected username:password")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_user_colon_password() {
        assert_eq!(
            parse("# relay\n\nme@b.test:pa:ss\n"),
            Ok(("me@b.test".into(), "pa:ss".into()))
        );
        assert_eq!(parse("\n\n"), Err((1, "no username:password line")));
        assert_eq!(
            parse("a:b\nc:d\n").unwrap_err().1,
            "more than one username:password line"
        );
        assert_eq!(parse("\nnocolon\n"), Err((2, "expected username:password")));
    }

    #[test]
    fn world_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "u:p\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("creds: holds a password"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&path).unwrap(), ("u".into(), "p".into()));
    }
}
