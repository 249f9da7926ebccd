//! Maildir++ mailboxes: creation and durable delivery.
//!
//! Files are stored with LF line ends, as Postfix's virtual(8) and Dovecot's
//! LDA write them. The name carries `,S=<size on disk>` and `,W=<size with
//! CRLF>` (Dovecot's convention), so IMAP can answer RFC822.SIZE without
//! reading the file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::safeio;

/// The special-use folders every new mailbox gets (RFC 6154 roles).
pub const SPECIAL_FOLDERS: [&str; 5] = ["Sent", "Drafts", "Junk", "Trash", "Archive"];

/// Temporary names written by local delivery end with this, so the queue
/// manager can recognise its own leftovers after a crash.
pub const DELIVERY_TMP_SUFFIX: &str = ".delivering";

/// Temporary names written by IMAP (APPEND, COPY across file systems):
/// not qmgr's to remove at its start, since maildird may be writing them.
const STORE_TMP_SUFFIX: &str = ".storing";

/// Maildir's own rule: a file left in tmp/ for 36 hours is abandoned.
const TMP_MAX_AGE: Duration = Duration::from_secs(36 * 3600);

static DELIVERY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Lock file in a user's Maildir: IMAP sessions hold it shared while a
/// command takes messages out of folders or moves them between folders
/// (COPY, MOVE, EXPUNGE, CLOSE, DELETE, RENAME); a backup holds it
/// exclusively while it lists the user's folders, so a message on its way
/// from one folder to another is seen in one, or both, never neither.
pub const FOLDERS_LOCK: &str = "mailsrv-folders.lock";

/// Create a Maildir (cur, new, tmp) at `path` if missing.
pub fn create_maildir(path: &Path) -> io::Result<()> {
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(path.join(sub))?;
    }
    Ok(())
}

/// Create a user's mailbox: INBOX at `root` and the special-use folders as
/// Maildir++ subfolders (`.Sent`, ...), each marked with `maildirfolder`.
pub fn create_mailbox(root: &Path) -> io::Result<()> {
    create_maildir(root)?;
    for name in SPECIAL_FOLDERS {
        let folder = root.join(format!(".{name}"));
        create_maildir(&folder)?;
        let marker = folder.join("maildirfolder");
        if !marker.exists() {
            File::create(marker)?;
        }
    }
    Ok(())
}

/// The result of a delivery.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Path of the new file in `new/`.
    pub path: PathBuf,
    /// Bytes on disk.
    pub size: u64,
}

/// Deliver a message into the Maildir at `maildir`: `headers` (already LF
/// terminated) followed by `message`, whose CRLF line ends are written as
/// LF. The file is written in `tmp/`, fsynced, renamed into `new/`, and
/// `new/` is fsynced, so on return the message survives a crash.
pub fn deliver(
    maildir: &Path,
    hostname: &str,
    headers: &[u8],
    message: impl Read,
) -> io::Result<Delivered> {
    write_message(maildir, hostname, headers, message, None, None)
}

/// How a message is filed by IMAP (APPEND): into `cur/` with these Maildir
/// info flags (the letters after `:2,`) and this modification time, which
/// IMAP reports as INTERNALDATE.
#[derive(Debug, Clone, Copy)]
pub struct Filing<'a> {
    pub info: &'a str,
    pub mtime: Option<SystemTime>,
}

/// Store `message` (CRLF or LF line ends) in `cur/` of the Maildir folder,
/// durably, as [`deliver`] does for `new/`.
pub fn store(
    maildir: &Path,
    hostname: &str,
    message: impl Read,
    filing: Filing<'_>,
) -> io::Result<Delivered> {
    write_message(
        maildir,
        hostname,
        b"",
        message,
        Some(filing.info),
        filing.mtime,
    )
}

/// Write tmp/, fsync, rename into new/ (`info` None) or cur/ with the
/// info flags, fsync the directory.
fn write_message(
    maildir: &Path,
    hostname: &str,
    headers: &[u8],
    message: impl Read,
    info: Option<&str>,
    mtime: Option<SystemTime>,
) -> io::Result<Delivered> {
    let base = unique_name(hostname);
    let suffix = if info.is_some() {
        STORE_TMP_SUFFIX
    } else {
        DELIVERY_TMP_SUFFIX
    };
    let tmp = maildir.join("tmp").join(format!("{base}{suffix}"));
    let open = || OpenOptions::new().write(true).create_new(true).open(&tmp);
    let file = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // First delivery to this user: make the mailbox.
            create_mailbox(maildir)?;
            open()?
        }
        other => other?,
    };
    let result = write_converted(file, headers, message, mtime);
    let (size, lines) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let name = format!("{base},S={size},W={}", size + lines);
    let final_path = match info {
        None => maildir.join("new").join(name),
        Some(info) => maildir.join("cur").join(format!("{name}:2,{info}")),
    };
    if let Err(e) = std::fs::rename(&tmp, &final_path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    safeio::sync_parent(&final_path)?;
    Ok(Delivered {
        path: final_path,
        size,
    })
}

/// Put a copy of the message file `source` into `cur/` of the folder
/// `maildir` under a new unique name with the info flags `info`: a hard
/// link (Maildir files never change, so both folders may share it), or a
/// byte copy where links are impossible. The caller fsyncs `cur/` once
/// for a batch ([`safeio::sync_dir`]). Returns the new file's path.
pub fn link_copy(source: &Path, maildir: &Path, hostname: &str, info: &str) -> io::Result<PathBuf> {
    let source_name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let source_base = source_name.split(':').next().unwrap_or_default();
    // Keep the ,S= and ,W= fields: the content is the same.
    let sizes: String = source_base
        .split(',')
        .skip(1)
        .filter(|f| f.starts_with("S=") || f.starts_with("W="))
        .map(|f| format!(",{f}"))
        .collect();
    let target = maildir
        .join("cur")
        .join(format!("{}{sizes}:2,{info}", unique_name(hostname)));
    match std::fs::hard_link(source, &target) {
        Ok(()) => Ok(target),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        Err(_) => {
            let tmp = maildir
                .join("tmp")
                .join(format!("{}{STORE_TMP_SUFFIX}", unique_name(hostname)));
            let copied = std::fs::copy(source, &tmp)
                .and_then(|_| File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &target));
            if copied.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            copied.map(|()| target)
        }
    }
}

/// Bytes read from the message, and gathered for the file, at a time.
const COPY_CHUNK: usize = 64 * 1024;

thread_local! {
    /// The buffers of [`write_converted`], kept by each (blocking) thread
    /// so that a delivery neither allocates nor zeroes them again.
    static COPY_BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        std::cell::RefCell::new((vec![0; COPY_CHUNK], Vec::with_capacity(COPY_CHUNK)));
}

/// Write headers + CRLF-to-LF converted message, fsync; returns bytes
/// written and the number of LFs not preceded by CR (so that W= is the
/// size once each such LF becomes CRLF, as IMAP and POP3 send it).
fn write_converted(
    mut file: File,
    headers: &[u8],
    mut message: impl Read,
    mtime: Option<SystemTime>,
) -> io::Result<(u64, u64)> {
    let (size, lines) = COPY_BUFFERS.with_borrow_mut(|(input, out)| {
        out.clear();
        out.extend_from_slice(headers);
        let mut converter = CrlfToLf {
            lines: headers.iter().filter(|&&b| b == b'\n').count() as u64,
            ..CrlfToLf::default()
        };
        let mut size = 0;
        loop {
            let n = message.read(input)?;
            if n == 0 {
                break;
            }
            converter.convert(&input[..n], out);
            if out.len() >= COPY_CHUNK {
                file.write_all(out)?;
                size += out.len() as u64;
                out.clear();
            }
        }
        converter.finish(out);
        file.write_all(out)?;
        size += out.len() as u64;
        out.clear();
        io::Result::Ok((size, converter.lines))
    })?;
    if let Some(mtime) = mtime {
        file.set_modified(mtime)?;
    }
    file.sync_all()?;
    Ok((size, lines))
}

/// Turns CRLF into LF across chunks, keeping lone CRs, and counts the LFs
/// written without a CR before them.
#[derive(Default)]
struct CrlfToLf {
    /// The previous chunk ended in CR: written or dropped by the next byte.
    pending_cr: bool,
    /// The last byte written was a CR.
    after_cr: bool,
    lines: u64,
}

impl CrlfToLf {
    fn convert(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        let Some(&first) = input.first() else { return };
        if std::mem::take(&mut self.pending_cr) && first != b'\n' {
            self.push_lone_cr(out);
        }
        loop {
            match memchr::memchr(b'\r', input) {
                None => return self.push_run(input, out),
                Some(at) => {
                    self.push_run(&input[..at], out);
                    match input.get(at + 1) {
                        None => {
                            self.pending_cr = true;
                            return;
                        }
                        // CRLF: the CR is dropped, the LF starts the next run.
                        Some(b'\n') => {}
                        Some(_) => self.push_lone_cr(out),
                    }
                    input = &input[at + 1..];
                }
            }
        }
    }

    /// The message has ended: a CR it ended with stays.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            self.push_lone_cr(out);
        }
    }

    fn push_lone_cr(&mut self, out: &mut Vec<u8>) {
        out.push(b'\r');
        self.after_cr = true;
    }

    /// Bytes without CR: each LF counts, but one right after a written CR.
    fn push_run(&mut self, run: &[u8], out: &mut Vec<u8>) {
        let Some(&first) = run.first() else { return };
        let lfs = memchr::memchr_iter(b'\n', run).count() as u64;
        self.lines += lfs - u64::from(self.after_cr && first == b'\n');
        self.after_cr = false;
        out.extend_from_slice(run);
    }
}

/// A Maildir unique name: `<secs>.M<usecs>P<pid>Q<n>.<host>` (the
/// modern form from the Maildir specification), with `/` and `:` in the
/// host name escaped as Dovecot does.
fn unique_name(hostname: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let n = DELIVERY_COUNTER.fetch_add(1, Ordering::Relaxed);
    let host = hostname.replace('/', "\\057").replace(':', "\\072");
    format!(
        "{}.M{}P{}Q{}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        n,
        host
    )
}

/// A folder's `new/` and `cur/` held open, so that many messages move
/// from one to the other by name, without the kernel walking the
/// folder's path twice for each.
pub struct NewToCur {
    new: File,
    cur: File,
}

impl NewToCur {
    /// Open the two directories of the folder at `folder`.
    pub fn open(folder: &Path) -> io::Result<NewToCur> {
        Ok(NewToCur {
            new: File::open(folder.join("new"))?,
            cur: File::open(folder.join("cur"))?,
        })
    }

    /// Rename `new/<name>` to `cur/<target>`.
    pub fn rename(&self, name: &str, target: &str) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (new, cur) = (Some(self.new.as_raw_fd()), Some(self.cur.as_raw_fd()));
        nix::fcntl::renameat(new, name, cur, target).map_err(io::Error::from)
    }
}

/// The size with CRLF line ends (what IMAP's RFC822.SIZE and POP3's LIST
/// report) that a message file name records in its `,W=` field (ours and
/// Dovecot's), if it does.
pub fn crlf_size_from_name(file_name: &str) -> Option<u64> {
    name_field(file_name, "W=")
}

/// The size on disk that a message file name records in its `,S=` field
/// (Maildir++), if it does.
pub fn size_from_name(file_name: &str) -> Option<u64> {
    name_field(file_name, "S=")
}

/// A number field (`S=`, `W=`) of a message file name, before the flags.
fn name_field(file_name: &str, field: &str) -> Option<u64> {
    let base = file_name.split(':').next().unwrap_or(file_name);
    base.split(',')
        .find_map(|f| f.strip_prefix(field))
        .and_then(|v| v.parse().ok())
}

/// The size with CRLF line ends of the message file at `path`: from its
/// name when it tells, else counted (each LF not after a CR counts two).
pub fn crlf_size(path: &Path) -> io::Result<u64> {
    if let Some(size) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(crlf_size_from_name)
    {
        return Ok(size);
    }
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut size, mut prev) = (0u64, b'\n');
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(size);
        }
        size += n as u64;
        for &b in &buf[..n] {
            if b == b'\n' && prev != b'\r' {
                size += 1;
            }
            prev = b;
        }
    }
}

/// Remove files from the `tmp/` directory of `maildir`: every unfinished
/// delivery of ours (`own_leftovers`: only when no delivery can be running),
/// and anything older than 36 hours. Returns how many were removed.
pub fn clean_tmp(maildir: &Path, own_leftovers: bool) -> io::Result<usize> {
    let tmp = maildir.join("tmp");
    let entries = match std::fs::read_dir(&tmp) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = own_leftovers && name.ends_with(DELIVERY_TMP_SUFFIX);
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > TMP_MAX_AGE);
        if (ours || stale) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_converts_line_ends_and_names_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("a.test").join("alice");
        let msg: &[u8] = b"Subject: hi\r\n\r\nline\r\nbare\rcr\r\n";
        let d = deliver(&md, "mx.test", b"Return-Path: <s@x>\n", msg).unwrap();
        let content = std::fs::read(&d.path).unwrap();
        assert_eq!(
            content,
            b"Return-Path: <s@x>\nSubject: hi\n\nline\nbare\rcr\n".to_vec()
        );
        let name = d.path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(&format!(",S={},W={}", content.len(), content.len() + 5)),
            "{name}"
        );
        assert!(md.join(".Junk/maildirfolder").exists());
        assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn cr_at_chunk_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = vec![b'x'; 64 * 1024 - 1];
        body.extend_from_slice(b"\r\nend\r");
        let d = deliver(dir.path(), "h", b"", body.as_slice()).unwrap();
        let content = std::fs::read(&d.path).unwrap();
        assert_eq!(&content[content.len() - 6..], b"x\nend\r");
    }

    #[test]
    fn w_size_counts_only_lfs_without_cr() {
        let dir = tempfile::tempdir().unwrap();
        // "\r\r\n" keeps one CR before the LF: that LF needs no CR added.
        let d = deliver(dir.path(), "h", b"", &b"a\r\r\nb\r\n"[..]).unwrap();
        let content = std::fs::read(&d.path).unwrap();
        assert_eq!(content, b"a\r\nb\n");
        let name = d.path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.ends_with(",S=5,W=6"), "{name}");
    }

    /// The rule, a byte at a time: CRLF becomes LF, a lone CR stays, and
    /// an LF counts unless the byte written before it is a CR.
    fn convert_bytewise(input: &[u8]) -> (Vec<u8>, u64) {
        let (mut out, mut lines) = (Vec::new(), 0);
        for (i, &b) in input.iter().enumerate() {
            if b == b'\r' && input.get(i + 1) == Some(&b'\n') {
                continue;
            }
            if b == b'\n' && out.last() != Some(&b'\r') {
                lines += 1;
            }
            out.push(b);
        }
        (out, lines)
    }

    #[test]
    fn conversion_is_the_same_wherever_chunks_split() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..40 {
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    [b'a', b'\r', b'\n'][(seed % 3) as usize]
                })
                .collect();
            let expected = convert_bytewise(&input);
            for split in 0..=input.len() {
                let mut converter = CrlfToLf::default();
                let mut out = Vec::new();
                converter.convert(&input[..split], &mut out);
                converter.convert(&input[split..], &mut out);
                converter.finish(&mut out);
                assert_eq!(
                    (out, converter.lines),
                    expected,
                    "{input:?} split at {split}"
                );
            }
        }
    }

    #[test]
    fn crlf_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().join("1.a.h,S=4,W=6:2,S");
        std::fs::write(&named, b"whatever").unwrap();
        assert_eq!(crlf_size(&named).unwrap(), 6);
        let bare = dir.path().join("2.a.h");
        std::fs::write(&bare, b"a\r\nb\nc").unwrap();
        assert_eq!(crlf_size(&bare).unwrap(), 7);
        assert_eq!(crlf_size_from_name("3.a.h,S=1"), None);
    }

    #[test]
    fn clean_tmp_removes_own_leftovers_only() {
        let dir = tempfile::tempdir().unwrap();
        create_maildir(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/1.x.delivering"), b"").unwrap();
        std::fs::write(dir.path().join("tmp/2.imap-append"), b"").unwrap();
        assert_eq!(clean_tmp(dir.path(), false).unwrap(), 0);
        assert_eq!(clean_tmp(dir.path(), true).unwrap(), 1);
        assert!(dir.path().join("tmp/2.imap-append").exists());
    }
}
