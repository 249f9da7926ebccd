//! The backup format: a directory that describes itself.
//!
//! ```text
//! PATH/backup.json          the header: id, time, kind, parent, totals
//! PATH/manifest.jsonl.zst   every record of the installation, one JSON line each
//! PATH/packs/<name>.pack    content: one zstd frame a blob, found by sha256
//! PATH/SHA256SUMS           sha256 of every other file; written last
//! ```
//!
//! Every manifest lists the whole installation; an incremental backup only
//! stores blobs its parents lack, and finds the others up the chain. A
//! backup without `SHA256SUMS` is unfinished and is refused. The packs are
//! concatenated zstd frames, so `zstd -dc` reads them and `sha256sum -c
//! SHA256SUMS` checks a copy, without mailctl.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const HEADER_FILE: &str = "backup.json";
pub const MANIFEST_FILE: &str = "manifest.jsonl.zst";
pub const SUMS_FILE: &str = "SHA256SUMS";
pub const PACKS_DIR: &str = "packs";
/// The format this mailctl writes and reads.
pub const FORMAT: u32 = 1;
/// zstd's default level: fast, and most of the gain.
const LEVEL: i32 = 3;
/// Longest manifest line read: a folder record lists its messages.
const MAX_RECORD: u64 = 1 << 30;

/// `backup.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub hostname: String,
    pub mailsrv_version: String,
    pub parent: Option<Parent>,
    pub totals: Totals,
}

/// The backup an incremental one builds on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Parent {
    pub id: String,
    /// Where it was when this one was made (absolute).
    pub path: PathBuf,
    /// sha256 of its `SHA256SUMS`, which covers all of it.
    pub sums_sha256: String,
}

/// What a backup holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    pub files: u64,
    pub queue_entries: u64,
    pub users: u64,
    pub folders: u64,
    pub messages: u64,
    /// Bytes of everything listed, as on disk.
    pub bytes: u64,
    /// Bytes of content stored in this backup (compressed).
    pub stored_bytes: u64,
}

/// What a backed-up file of the installation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    Config,
    Users,
    Aliases,
    Domains,
    TlsCert,
    TlsKey,
    Dkim,
    RelayCredentials,
    Greylist,
}

/// One message of a folder: UID, file name (with its `:2,` flags), in
/// `new/`, mtime (IMAP's INTERNALDATE), size, sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message(pub u32, pub String, pub bool, pub i64, pub u64, pub String);

impl Message {
    pub fn uid(&self) -> u32 {
        self.0
    }
    pub fn file_name(&self) -> &str {
        &self.1
    }
    /// The name before `:`, which flag changes leave alone.
    pub fn base(&self) -> &str {
        self.1.split_once(':').map_or(&self.1, |(b, _)| b)
    }
    pub fn in_new(&self) -> bool {
        self.2
    }
    pub fn mtime(&self) -> i64 {
        self.3
    }
    pub fn size(&self) -> u64 {
        self.4
    }
    pub fn sha256(&self) -> &str {
        &self.5
    }
}

/// One line of the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// A file of the installation; `name` is its path in a restored
    /// installation, relative to the config's directory.
    File {
        role: FileRole,
        name: String,
        /// Where it was.
        origin: PathBuf,
        mode: u32,
        mtime: i64,
        size: u64,
        sha256: String,
    },
    /// A queued message and its envelope.
    Queue {
        id: String,
        state: String,
        envelope: String,
        data: String,
        data_size: u64,
    },
    /// A message `sendmail` dropped for pickup, with its owner's uid.
    Maildrop {
        id: String,
        uid: u32,
        size: u64,
        sha256: String,
    },
    /// A user's mailbox (the users file holds its account).
    User {
        address: String,
        subscriptions: Option<String>,
    },
    /// A folder: `dir` is "" for INBOX, else its Maildir++ directory
    /// (`.Work`).
    Folder {
        user: String,
        dir: String,
        uid_validity: u32,
        uid_next: u32,
        keywords: Option<String>,
        messages: Vec<Message>,
    },
    /// Content stored in this backup.
    Blob {
        sha256: String,
        pack: String,
        offset: u64,
        stored: u64,
        size: u64,
    },
}

/// Where a blob lives.
#[derive(Debug, Clone)]
pub struct BlobAt {
    /// The backup directory holding it.
    pub backup: usize,
    pub pack: String,
    pub offset: u64,
    pub stored: u64,
    pub size: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes blobs into one pack file, as zstd frames.
pub struct PackWriter {
    name: String,
    file: File,
    offset: u64,
}

impl PackWriter {
    /// A new pack `name` in `backup`'s packs directory.
    pub fn create(backup: &Path, name: &str) -> anyhow::Result<PackWriter> {
        let path = backup.join(PACKS_DIR).join(format!("{name}.pack"));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(PackWriter::from_file(name, file))
    }

    /// A pack written through an open file (a child process that cannot
    /// open the backup directory gets the file from its parent).
    pub fn from_file(name: &str, file: File) -> PackWriter {
        PackWriter {
            name: name.to_string(),
            file,
            offset: 0,
        }
    }

    /// Compress `source` into the pack; returns its sha256 and size, and
    /// the blob record unless `known` says the content is stored already
    /// (then the frame is taken back).
    pub fn add(
        &mut self,
        source: &mut dyn Read,
        known: &dyn Fn(&str) -> bool,
    ) -> io::Result<(String, u64, Option<Record>)> {
        let start = self.offset;
        let mut hashing = HashingReader {
            inner: source,
            hasher: Sha256::new(),
            size: 0,
        };
        let counted = CountingWriter {
            inner: &mut self.file,
            written: 0,
        };
        let mut encoder = zstd::stream::Encoder::new(counted, LEVEL)?;
        encoder.include_checksum(true)?;
        io::copy(&mut hashing, &mut encoder)?;
        let counted = encoder.finish()?;
        let stored = counted.written;
        let sha256 = hex(&hashing.hasher.finalize());
        let size = hashing.size;
        if known(&sha256) {
            self.file.set_len(start)?;
            self.file.seek(SeekFrom::Start(start))?;
            return Ok((sha256, size, None));
        }
        self.offset += stored;
        let record = Record::Blob {
            sha256: sha256.clone(),
            pack: self.name.clone(),
            offset: start,
            stored,
            size,
        };
        Ok((sha256, size, Some(record)))
    }

    /// Bytes written.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// Make the pack durable.
    pub fn finish(self) -> io::Result<()> {
        self.file.sync_all()
    }
}

struct HashingReader<'a> {
    inner: &'a mut dyn Read,
    hasher: Sha256,
    size: u64,
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

struct CountingWriter<'a> {
    inner: &'a mut File,
    written: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the manifest, compressed, one record a line.
pub struct ManifestWriter {
    encoder: zstd::stream::Encoder<'static, io::BufWriter<File>>,
}

impl ManifestWriter {
    pub fn create(backup: &Path) -> anyhow::Result<ManifestWriter> {
        let path = backup.join(MANIFEST_FILE);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut encoder = zstd::stream::Encoder::new(io::BufWriter::new(file), LEVEL)?;
        // Damage is caught while the manifest is read, not only by verify.
        encoder.include_checksum(true)?;
        Ok(ManifestWriter { encoder })
    }

    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.encoder, record)?;
        self.encoder.write_all(b"\n")
    }

    pub fn finish(self) -> io::Result<()> {
        let file = self
            .encoder
            .finish()?
            .into_inner()
            .map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

/// A finished backup and the chain of those it builds on, checked to be
/// the ones its headers name.
pub struct Chain {
    /// This backup first, then its parent, and so on.
    pub dirs: Vec<PathBuf>,
    pub headers: Vec<Header>,
    blobs: HashMap<String, BlobAt>,
}

impl Chain {
    /// Open the backup at `path` and every ancestor.
    pub fn open(path: &Path) -> anyhow::Result<Chain> {
        let mut chain = Chain {
            dirs: Vec::new(),
            headers: Vec::new(),
            blobs: HashMap::new(),
        };
        let mut next = Some((path.to_path_buf(), None::<Parent>));
        while let Some((dir, expected)) = next.take() {
            let dir = match &expected {
                Some(p) => find_parent(&chain.dirs[chain.dirs.len() - 1], p)?,
                None => dir,
            };
            let header = read_header(&dir)?;
            check_described(&dir)?;
            if let Some(p) = &expected {
                let sums = sha256_of_file(&dir.join(SUMS_FILE))?;
                if header.id != p.id || sums != p.sums_sha256 {
                    bail!(
                        "{}: not the parent backup {} it should be (it was changed or replaced)",
                        dir.display(),
                        p.id
                    );
                }
            }
            let index = chain.dirs.len();
            if index > 1000 {
                bail!(
                    "{}: the chain of backups is too long (a loop?)",
                    path.display()
                );
            }
            for record in read_manifest(&dir)? {
                if let Record::Blob {
                    sha256,
                    pack,
                    offset,
                    stored,
                    size,
                } = record?
                {
                    chain.blobs.entry(sha256).or_insert(BlobAt {
                        backup: index,
                        pack,
                        offset,
                        stored,
                        size,
                    });
                }
            }
            next = header.parent.clone().map(|p| (dir.clone(), Some(p)));
            chain.dirs.push(dir);
            chain.headers.push(header);
        }
        Ok(chain)
    }

    /// The newest backup's header.
    pub fn header(&self) -> &Header {
        &self.headers[0]
    }

    /// The newest backup's directory.
    pub fn dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// Whether the chain stores `sha256`.
    pub fn has(&self, sha256: &str) -> bool {
        self.blobs.contains_key(sha256)
    }

    /// Where `sha256` is stored.
    pub fn blob(&self, sha256: &str) -> Option<&BlobAt> {
        self.blobs.get(sha256)
    }

    /// Every blob of the chain.
    pub fn blobs(&self) -> impl Iterator<Item = (&String, &BlobAt)> {
        self.blobs.iter()
    }

    /// The newest backup's records.
    pub fn records(&self) -> anyhow::Result<impl Iterator<Item = anyhow::Result<Record>>> {
        read_manifest(self.dir())
    }

    /// Open every pack of the chain, so that a child process that cannot
    /// reach the backup reads through these files.
    pub fn open_packs(&self) -> anyhow::Result<Packs> {
        let mut files = HashMap::new();
        for (_, at) in self.blobs() {
            let key = (at.backup, at.pack.clone());
            if let std::collections::hash_map::Entry::Vacant(slot) = files.entry(key) {
                let path = pack_path(&self.dirs[at.backup], &at.pack);
                let file =
                    File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                slot.insert(file);
            }
        }
        Ok(Packs { files })
    }
}

/// The open packs of a chain.
pub struct Packs {
    files: HashMap<(usize, String), File>,
}

impl Packs {
    /// Decompress the blob `at` into `out`, checking it is `sha256`.
    pub fn copy_blob(&self, sha256: &str, at: &BlobAt, out: &mut dyn Write) -> anyhow::Result<u64> {
        let file = self
            .files
            .get(&(at.backup, at.pack.clone()))
            .with_context(|| format!("pack {} is not open", at.pack))?;
        let frame = PositionedReader {
            file,
            position: at.offset,
            end: at.offset + at.stored,
        };
        let mut decoder = zstd::stream::Decoder::new(frame)?;
        let mut checked = HashingWriter {
            inner: out,
            hasher: Sha256::new(),
            size: 0,
        };
        io::copy(&mut decoder, &mut checked).with_context(|| {
            format!(
                "pack {}: blob {sha256} at offset {} is damaged",
                at.pack, at.offset
            )
        })?;
        let got = hex(&checked.hasher.finalize());
        if got != sha256 || checked.size != at.size {
            bail!(
                "pack {}: blob {sha256} at offset {} is damaged (its content hashes to {got})",
                at.pack,
                at.offset
            );
        }
        Ok(checked.size)
    }
}

struct PositionedReader<'a> {
    file: &'a File,
    position: u64,
    end: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.position);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: Sha256,
    size: u64,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub fn pack_path(backup: &Path, pack: &str) -> PathBuf {
    backup.join(PACKS_DIR).join(format!("{pack}.pack"))
}

/// The header of the finished backup at `dir`.
pub fn read_header(dir: &Path) -> anyhow::Result<Header> {
    if !dir.join(SUMS_FILE).is_file() {
        if dir.join(HEADER_FILE).is_file() {
            bail!(
                "{}: unfinished backup (no {SUMS_FILE}): it was interrupted",
                dir.display()
            );
        }
        bail!("{}: not a mailsrv backup (no {HEADER_FILE})", dir.display());
    }
    let path = dir.join(HEADER_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let header: Header = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a backup header", path.display()))?;
    if header.format != FORMAT {
        bail!(
            "{}: backup format {} (this mailctl reads format {FORMAT})",
            path.display(),
            header.format
        );
    }
    Ok(header)
}

/// The records of the backup at `dir`, as they stream from its manifest.
pub fn read_manifest(dir: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<Record>>> {
    let path = dir.join(MANIFEST_FILE);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let decoder = zstd::stream::Decoder::new(file)?;
    let mut reader = BufReader::new(decoder);
    let mut line_no = 0u64;
    let mut line = Vec::new();
    Ok(std::iter::from_fn(move || {
        line.clear();
        line_no += 1;
        match (&mut reader).take(MAX_RECORD).read_until(b'\n', &mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_slice(&line)
                    .with_context(|| format!("{}: record {line_no} is damaged", path.display())),
            ),
            Err(e) => Some(Err(anyhow::Error::new(e).context(format!(
                "{}: damaged after record {}",
                path.display(),
                line_no - 1
            )))),
        }
    }))
}

/// The sha256 of a file, streamed.
pub fn sha256_of_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// Write `SHA256SUMS` over every file of the backup but itself, last.
pub fn write_sums(dir: &Path) -> anyhow::Result<()> {
    let mut files = vec![HEADER_FILE.to_string(), MANIFEST_FILE.to_string()];
    let packs = dir.join(PACKS_DIR);
    let mut names: Vec<String> = std::fs::read_dir(&packs)
        .with_context(|| format!("listing {}", packs.display()))?
        .filter_map(|e| e.ok())
        .map(|e| format!("{PACKS_DIR}/{}", e.file_name().to_string_lossy()))
        .collect();
    names.sort();
    files.extend(names);
    let mut text = String::new();
    for name in files {
        text.push_str(&format!("{}  {name}\n", sha256_of_file(&dir.join(&name))?));
    }
    common::safeio::write_atomic(&dir.join(SUMS_FILE), text.as_bytes())
        .with_context(|| format!("writing {}", dir.join(SUMS_FILE).display()))
}

/// Check that the header and the manifest are the ones `SHA256SUMS`
/// lists (the packs' blobs are checked by their own hashes as they are
/// read): what a restore trusts must not have changed.
fn check_described(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(SUMS_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for name in [HEADER_FILE, MANIFEST_FILE] {
        let listed = text.lines().find_map(|l| {
            l.split_once("  ")
                .filter(|(_, n)| *n == name)
                .map(|(s, _)| s)
        });
        let Some(listed) = listed else {
            bail!("{}: does not list {name}", path.display());
        };
        if sha256_of_file(&dir.join(name))? != listed {
            bail!(
                "{}: {name} was changed since the backup was made (run `mailctl backup verify`)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Check every line of `SHA256SUMS`; returns the problems found.
pub fn check_sums(dir: &Path) -> anyhow::Result<Vec<String>> {
    let path = dir.join(SUMS_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut problems = Vec::new();
    let mut listed = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let Some((sum, name)) = line.split_once("  ") else {
            problems.push(format!("{}:{}: not a checksum line", path.display(), i + 1));
            continue;
        };
        if name.contains("..") || name.starts_with('/') {
            problems.push(format!(
                "{}:{}: bad file name {name}",
                path.display(),
                i + 1
            ));
            continue;
        }
        listed.insert(name.to_string());
        match sha256_of_file(&dir.join(name)) {
            Ok(got) if got == sum => {}
            Ok(_) => problems.push(format!("{name}: checksum mismatch (the file was changed)")),
            Err(e) => problems.push(format!("{name}: {e:#}")),
        }
    }
    for required in [HEADER_FILE, MANIFEST_FILE] {
        if !listed.contains(required) {
            problems.push(format!("{}: does not list {required}", path.display()));
        }
    }
    Ok(problems)
}

/// Find the parent `p` of the backup at `child`: where it was, else a
/// sibling directory with its id (the backups were moved together).
fn find_parent(child: &Path, p: &Parent) -> anyhow::Result<PathBuf> {
    let is_it = |dir: &Path| read_header(dir).is_ok_and(|h| h.id == p.id);
    if is_it(&p.path) {
        return Ok(p.path.clone());
    }
    if let Some(siblings) = child.parent().and_then(|d| std::fs::read_dir(d).ok()) {
        for entry in siblings.flatten() {
            let dir = entry.path();
            if dir != child && is_it(&dir) {
                return Ok(dir);
            }
        }
    }
    bail!(
        "{}: its parent backup {} is neither at {} nor beside it",
        child.display(),
        p.id,
        p.path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    #[test]
    fn a_pack_keeps_blobs_and_takes_back_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(PACKS_DIR)).unwrap();
        let mut pack = PackWriter::create(dir.path(), "000001").unwrap();
        let body = b"Subject: hi\r\n\r\nhello\r\n".repeat(100);
        let (sha, size, record) = pack.add(&mut &body[..], &|_| false).unwrap();
        assert_eq!(sha, sha256_hex(&body));
        assert_eq!(size, body.len() as u64);
        let Some(Record::Blob {
            offset: 0, stored, ..
        }) = record
        else {
            panic!("{record:?}")
        };
        let (_, _, again) = pack.add(&mut &body[..], &|s| s == sha).unwrap();
        assert!(again.is_none());
        assert_eq!(pack.len(), stored);
        pack.finish().unwrap();
        let file = File::open(pack_path(dir.path(), "000001")).unwrap();
        assert_eq!(file.metadata().unwrap().len(), stored);
        let packs = Packs {
            files: HashMap::from([((0, "000001".to_string()), file)]),
        };
        let at = BlobAt {
            backup: 0,
            pack: "000001".into(),
            offset: 0,
            stored,
            size,
        };
        let mut out = Vec::new();
        packs.copy_blob(&sha, &at, &mut out).unwrap();
        assert_eq!(out, body);
        let wrong = "0".repeat(64);
        assert!(packs.copy_blob(&wrong, &at, &mut Vec::new()).is_err());
    }

    #[test]
    fn sums_catch_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(PACKS_DIR)).unwrap();
        std::fs::write(dir.path().join(HEADER_FILE), "{}").unwrap();
        std::fs::write(dir.path().join(MANIFEST_FILE), "m").unwrap();
        std::fs::write(dir.path().join(PACKS_DIR).join("a.pack"), "abc").unwrap();
        write_sums(dir.path()).unwrap();
        assert!(check_sums(dir.path()).unwrap().is_empty());
        std::fs::write(dir.path().join(PACKS_DIR).join("a.pack"), "abd").unwrap();
        let problems = check_sums(dir.path()).unwrap();
        assert_eq!(
            problems,
            ["packs/a.pack: checksum mismatch (the file was changed)"]
        );
    }
}
