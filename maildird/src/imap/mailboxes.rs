//! A user's mailbox tree: listing, CREATE, DELETE, RENAME, subscriptions
//! and STATUS over the Maildir++ layout of [`common::mailbox_name`].

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::flags::SystemFlag;
use common::maildir::create_maildir;
use common::safeio::{sync_dir, write_atomic};

use crate::imap::cache::FolderCache;
use crate::imap::folder::Folder;
use common::mailbox_name::{encode_mutf7, MailboxName, DELIMITER};

/// Subscriptions, one name per line in its on-disk (modified UTF-7) form,
/// as Courier and Dovecot's Maildir++ store them.
const SUBSCRIPTIONS_FILE: &str = "subscriptions";

/// Why a mailbox operation failed, mapped to response codes by the session.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error("Mailbox does not exist")]
    NonExistent,
    #[error("Mailbox already exists")]
    AlreadyExists,
    #[error("{0}")]
    Cannot(&'static str),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The special-use attribute (RFC 6154 2) of a top-level folder made by
/// [`common::maildir::create_mailbox`].
pub fn special_use(name: &MailboxName) -> Option<&'static str> {
    Some(match name.as_str() {
        "Sent" => "\\Sent",
        "Drafts" => "\\Drafts",
        "Junk" => "\\Junk",
        "Trash" => "\\Trash",
        "Archive" => "\\Archive",
        _ => return None,
    })
}

/// STATUS figures of a mailbox (RFC 9051 6.3.11).
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusInfo {
    pub messages: u32,
    pub recent: u32,
    pub uid_next: u32,
    pub uid_validity: u32,
    pub unseen: u32,
    pub deleted: u32,
    pub size: u64,
}

/// One user's mailboxes.
pub struct Mailboxes {
    root: PathBuf,
    cache: Arc<FolderCache>,
}

impl Mailboxes {
    /// The tree whose INBOX is the Maildir at `root`.
    pub fn new(root: &Path, cache: Arc<FolderCache>) -> Mailboxes {
        Mailboxes {
            root: root.to_path_buf(),
            cache,
        }
    }

    /// The daemon's folder cache.
    pub fn cache(&self) -> &Arc<FolderCache> {
        &self.cache
    }

    /// The user's Maildir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder directory of `name`.
    pub fn path(&self, name: &MailboxName) -> PathBuf {
        name.folder_dir(&self.root)
    }

    /// Whether `name` exists as a selectable mailbox.
    pub fn exists(&self, name: &MailboxName) -> bool {
        self.path(name).join("cur").is_dir()
    }

    /// Every mailbox, INBOX first, then by name.
    pub fn all(&self) -> io::Result<Vec<MailboxName>> {
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(dir_name) = file_name.to_str() else {
                continue;
            };
            if let Some(name) = MailboxName::from_dir_name(dir_name) {
                if entry.path().join("cur").is_dir() {
                    names.insert(name);
                }
            }
        }
        let mut all = vec![MailboxName::from_client("INBOX", true).expect("INBOX is valid")];
        all.extend(names);
        Ok(all)
    }

    /// CREATE (RFC 9051 6.3.4). A trailing delimiter only declares a
    /// hierarchy; in Maildir++ the folder is made all the same.
    pub fn create(&self, name: &MailboxName) -> Result<(), MailboxError> {
        if name.is_inbox() || self.exists(name) {
            return Err(MailboxError::AlreadyExists);
        }
        let path = self.path(name);
        create_maildir(&path)?;
        std::fs::File::create(path.join("maildirfolder"))?;
        sync_dir(&self.root)?;
        Ok(())
    }

    /// DELETE (RFC 9051 6.3.5): the folder and its messages; inferior
    /// mailboxes stay, as they are separate directories.
    pub fn delete(&self, name: &MailboxName) -> Result<(), MailboxError> {
        if name.is_inbox() {
            return Err(MailboxError::Cannot("INBOX cannot be deleted"));
        }
        if !self.exists(name) {
            return Err(MailboxError::NonExistent);
        }
        std::fs::remove_dir_all(self.path(name))?;
        sync_dir(&self.root)?;
        Ok(())
    }

    /// RENAME (RFC 9051 6.3.6), inferiors included. Renaming INBOX moves
    /// its messages into the new mailbox and leaves INBOX empty.
    pub fn rename(&self, from: &MailboxName, to: &MailboxName) -> Result<(), MailboxError> {
        if !self.exists(from) {
            return Err(MailboxError::NonExistent);
        }
        if to.is_inbox() || self.exists(to) {
            return Err(MailboxError::AlreadyExists);
        }
        let prefix = format!("{}{DELIMITER}", from.as_str());
        if to.as_str().starts_with(&prefix) {
            return Err(MailboxError::Cannot("cannot move a mailbox into itself"));
        }
        if from.is_inbox() {
            return self.rename_inbox(to);
        }
        let mut moves = vec![(from.clone(), to.clone())];
        for name in self.all()? {
            if let Some(rest) = name.as_str().strip_prefix(&prefix) {
                let target = format!("{}{DELIMITER}{rest}", to.as_str());
                let target = MailboxName::from_client(&target, true)
                    .map_err(|_| MailboxError::Cannot("the new name is not valid"))?;
                if self.exists(&target) {
                    return Err(MailboxError::AlreadyExists);
                }
                moves.push((name, target));
            }
        }
        for (a, b) in moves {
            std::fs::rename(self.path(&a), self.path(&b))?;
        }
        sync_dir(&self.root)?;
        let subscribed = self.subscriptions()?;
        if subscribed
            .iter()
            .any(|s| s == from.as_str() || s.starts_with(&prefix))
        {
            let renamed = subscribed
                .into_iter()
                .map(|s| match s.strip_prefix(from.as_str()) {
                    Some(rest) if rest.is_empty() || rest.starts_with(DELIMITER) => {
                        format!("{}{rest}", to.as_str())
                    }
                    _ => s,
                })
                .collect();
            self.save_subscriptions(&renamed)?;
        }
        Ok(())
    }

    fn rename_inbox(&self, to: &MailboxName) -> Result<(), MailboxError> {
        self.create(to)?;
        let target = self.path(to);
        for sub in ["cur", "new"] {
            for entry in std::fs::read_dir(self.root.join(sub))? {
                let entry = entry?;
                let name = entry.file_name();
                match std::fs::rename(entry.path(), target.join(sub).join(&name)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            sync_dir(&target.join(sub))?;
            sync_dir(&self.root.join(sub))?;
        }
        // Flags' keyword letters must mean the same in the new folder.
        for file in [
            common::flags::KEYWORDS_FILE,
            common::flags::DOVECOT_KEYWORDS_FILE,
        ] {
            match std::fs::copy(self.root.join(file), target.join(file)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Subscribed names (UTF-8).
    pub fn subscriptions(&self) -> io::Result<Vec<String>> {
        match std::fs::read_to_string(self.root.join(SUBSCRIPTIONS_FILE)) {
            Ok(text) => Ok(common::mailbox_name::parse_subscriptions(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn save_subscriptions(&self, names: &BTreeSet<String>) -> io::Result<()> {
        let text: String = names
            .iter()
            .map(|n| format!("{}\n", encode_mutf7(n)))
            .collect();
        write_atomic(&self.root.join(SUBSCRIPTIONS_FILE), text.as_bytes())
    }

    /// SUBSCRIBE / UNSUBSCRIBE (RFC 9051 6.3.7, 6.3.8).
    pub fn subscribe(&self, name: &MailboxName, on: bool) -> io::Result<()> {
        let mut names: BTreeSet<String> = self.subscriptions()?.into_iter().collect();
        let changed = if on {
            names.insert(name.as_str().to_string())
        } else {
            names.remove(name.as_str())
        };
        if changed {
            self.save_subscriptions(&names)?;
        }
        Ok(())
    }

    /// STATUS figures, read without selecting (\Recent is left alone).
    pub fn status(&self, name: &MailboxName) -> Result<StatusInfo, MailboxError> {
        if !self.exists(name) {
            return Err(MailboxError::NonExistent);
        }
        let mut folder = Folder::open(&self.path(name), true, self.cache.clone())?;
        Ok(status_of(&mut folder))
    }
}

/// Subscribe INBOX and the special-use folders of a user who has no
/// subscriptions file yet, so clients that show only subscribed folders
/// (Thunderbird's default) show them from the first login. A user who
/// later unsubscribes keeps the choice: the file then exists.
pub fn subscribe_defaults(root: &Path) -> io::Result<()> {
    let path = root.join(SUBSCRIPTIONS_FILE);
    if path.exists() {
        return Ok(());
    }
    let text: String = std::iter::once("INBOX")
        .chain(common::maildir::SPECIAL_FOLDERS)
        .map(|n| format!("{n}\n"))
        .collect();
    write_atomic(&path, text.as_bytes())
}

/// STATUS figures of an open folder.
pub fn status_of(folder: &mut Folder) -> StatusInfo {
    let mut info = StatusInfo {
        messages: folder.exists(),
        uid_next: folder.uid_next,
        uid_validity: folder.uid_validity,
        ..StatusInfo::default()
    };
    let path = folder.path.clone();
    for m in folder.messages() {
        if !m.has(SystemFlag::Seen) {
            info.unseen += 1;
        }
        if m.has(SystemFlag::Deleted) {
            info.deleted += 1;
        }
        if m.in_new || m.recent {
            info.recent += 1;
        }
        info.size += m.size(&path).unwrap_or(0);
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::maildir::create_mailbox;

    fn name(s: &str) -> MailboxName {
        MailboxName::from_client(s, true).unwrap()
    }

    #[test]
    fn tree_operations() {
        let dir = tempfile::tempdir().unwrap();
        create_mailbox(dir.path()).unwrap();
        let mb = Mailboxes::new(dir.path(), Arc::default());
        mb.create(&name("Work")).unwrap();
        mb.create(&name("Work.Old")).unwrap();
        assert!(matches!(
            mb.create(&name("Work")),
            Err(MailboxError::AlreadyExists)
        ));
        mb.subscribe(&name("Work.Old"), true).unwrap();
        mb.rename(&name("Work"), &name("Job")).unwrap();
        let all: Vec<String> = mb
            .all()
            .unwrap()
            .iter()
            .map(|n| n.as_str().to_string())
            .collect();
        assert!(all.contains(&"Job.Old".to_string()) && !all.contains(&"Work".to_string()));
        assert_eq!(mb.subscriptions().unwrap(), vec!["Job.Old".to_string()]);
        assert!(matches!(
            mb.rename(&name("Job"), &name("Job.X")),
            Err(MailboxError::Cannot(_))
        ));
        mb.delete(&name("Job")).unwrap();
        assert!(mb.exists(&name("Job.Old")));
        assert!(matches!(
            mb.delete(&name("INBOX")),
            Err(MailboxError::Cannot(_))
        ));
    }

    #[test]
    fn default_subscriptions_only_once() {
        let dir = tempfile::tempdir().unwrap();
        create_mailbox(dir.path()).unwrap();
        subscribe_defaults(dir.path()).unwrap();
        let mb = Mailboxes::new(dir.path(), Arc::default());
        assert_eq!(mb.subscriptions().unwrap().len(), 6);
        mb.subscribe(&name("Junk"), false).unwrap();
        subscribe_defaults(dir.path()).unwrap();
        assert!(!mb.subscriptions().unwrap().contains(&"Junk".to_string()));
    }

    #[test]
    fn inbox_rename_moves_messages() {
        let dir = tempfile::tempdir().unwrap();
        create_mailbox(dir.path()).unwrap();
        std::fs::write(dir.path().join("new/1.a.h"), b"x\n").unwrap();
        let mb = Mailboxes::new(dir.path(), Arc::default());
        mb.rename(&name("INBOX"), &name("Old")).unwrap();
        assert!(dir.path().join(".Old/new/1.a.h").exists());
        assert_eq!(mb.status(&name("INBOX")).unwrap().messages, 0);
        let st = mb.status(&name("Old")).unwrap();
        assert_eq!((st.messages, st.recent, st.unseen, st.size), (1, 1, 1, 3));
    }
}
