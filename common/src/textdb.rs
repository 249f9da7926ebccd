//! Line-oriented table files (users, aliases, domains): reading with line
//! numbers for error messages, and whole-file rewrites under a lock.

use std::io;
use std::path::{Path, PathBuf};

use crate::safeio;

/// A problem with a table file, located by file and line.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Refused(String),
}

impl TableError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        TableError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn syntax(path: &Path, line: usize, message: impl Into<String>) -> Self {
        TableError::Syntax {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

/// Read a table file; a missing file is an empty table.
pub fn read_table(path: &Path) -> Result<String, TableError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(TableError::io(path, e)),
    }
}

/// The meaningful lines of a table with their 1-based numbers: comments
/// (`#` at line start) and blank lines are skipped, surrounding white space
/// trimmed.
pub fn entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// Rewrite `path` under its lock file: `edit` gets the current text and
/// returns the new text and a result; the file is replaced atomically with
/// permission bits `mode`.
pub fn update<T>(
    path: &Path,
    mode: u32,
    edit: impl FnOnce(&str) -> Result<(String, T), TableError>,
) -> Result<T, TableError> {
    let lock_path = path.with_file_name(format!(
        "{}.lock",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let _lock = safeio::lock_exclusive(&lock_path).map_err(|e| TableError::io(&lock_path, e))?;
    let current = read_table(path)?;
    let (new_text, result) = edit(&current)?;
    safeio::write_atomic_mode(path, new_text.as_bytes(), mode)
        .map_err(|e| TableError::io(path, e))?;
    Ok(result)
}

/// Remove the entry lines for which `is_target` holds; error if none did.
pub fn remove_lines(
    text: &str,
    what: &str,
    is_target: impl Fn(&str) -> bool,
) -> Result<String, TableError> {
    let mut found = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim();
        if !t.is_empty() && !t.starts_with('#') && is_target(t) {
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if found {
        Ok(out)
    } else {
        Err(TableError::Refused(format!("{what} does not exist")))
    }
}

/// `text` with `line` appended, ending in a newline.
pub fn append_line(text: &str, line: &str) -> String {
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_skip_comments_and_number_lines() {
        let t = "# c\n\n a \n#x\nb";
        let v: Vec<_> = entries(t).collect();
        assert_eq!(v, vec![(3, "a"), (5, "b")]);
    }

    #[test]
    fn update_rewrites_and_remove_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        update(&p, 0o600, |t| Ok((append_line(t, "x"), ()))).unwrap();
        update(&p, 0o600, |t| Ok((append_line(t, "y"), ()))).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x\ny\n");
        let e = update(&p, 0o600, |t| Ok((remove_lines(t, "z", |l| l == "z")?, ())));
        assert!(matches!(e, Err(TableError::Refused(_))));
        update(&p, 0o600, |t| Ok((remove_lines(t, "x", |l| l == "x")?, ()))).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "y\n");
    }
}
