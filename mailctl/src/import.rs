//! `mailctl import`: take over a Dovecot installation's users and
//! Maildirs, and a Postfix `/etc/aliases`, so users notice nothing: the
//! same passwords, the same folders, the same UIDs (IMAP clients download
//! nothing again) and the same flags and keywords.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use common::address::Address;
use common::aliases::{AliasKey, Aliases};
use common::config::Config;
use common::domains::Domains;
use common::userdb::{maildir_path, UserDb};

/// `mailctl import ...`
#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Users (with their password hashes) and Maildirs from Dovecot
    Dovecot {
        /// Dovecot's passwd-file (`user:{SCHEME}hash:...`)
        #[arg(long)]
        passwd_file: PathBuf,
        /// Where the Maildirs are: user u@d's is R/d/u (or R/d/u/Maildir)
        #[arg(long)]
        maildir_root: PathBuf,
        /// The domain of users listed without one
        #[arg(long)]
        domain: Option<String>,
    },
    /// Aliases from an /etc/aliases file (pipes, files and :include: are
    /// reported and left out)
    Aliases { file: PathBuf },
}

pub fn import(config: &Config, command: ImportCommand) -> anyhow::Result<()> {
    match command {
        ImportCommand::Dovecot {
            passwd_file,
            maildir_root,
            domain,
        } => dovecot(config, &passwd_file, &maildir_root, domain.as_deref()),
        ImportCommand::Aliases { file } => aliases(config, &file),
    }
}

/// One account of the passwd-file, checked.
#[derive(Debug)]
struct Account {
    address: Address,
    /// The whole line, the name made `user@domain`.
    line: String,
}

/// Read and check every line first: an unusable line stops the import
/// before anything changed.
fn read_accounts(passwd_file: &Path, domain: Option<&str>) -> anyhow::Result<Vec<Account>> {
    let text = std::fs::read_to_string(passwd_file)
        .with_context(|| format!("reading {}", passwd_file.display()))?;
    let mut accounts = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |m: String| format!("{}:{}: {m}", passwd_file.display(), n + 1);
        let (name, rest) = line.split_once(':').unwrap_or((line, ""));
        let name = match (name.contains('@'), domain) {
            (true, _) => name.to_string(),
            (false, Some(d)) => format!("{name}@{d}"),
            (false, None) => {
                problems.push(at(format!("`{name}` has no domain: give --domain")));
                continue;
            }
        };
        let address = match Address::parse(&name) {
            Ok(a) => a,
            Err(e) => {
                problems.push(at(format!("`{name}`: {e}")));
                continue;
            }
        };
        let hash = rest.split(':').next().unwrap_or_default();
        // A hash without a scheme is CRYPT, as in Dovecot.
        let hash_checked = if hash.starts_with('{') {
            hash.to_string()
        } else {
            format!("{{CRYPT}}{hash}")
        };
        if let Err(e) = common::password::check_hash_format(&hash_checked) {
            problems.push(at(format!("{name}: {e}")));
            continue;
        }
        let rest = rest.split_once(':').map_or("", |(_, r)| r);
        accounts.push(Account {
            line: format!("{}:{hash_checked}:{rest}", address.key()),
            address,
        });
    }
    if !problems.is_empty() {
        bail!(
            "nothing imported; fix these lines first:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(accounts)
}

fn dovecot(
    config: &Config,
    passwd_file: &Path,
    maildir_root: &Path,
    domain: Option<&str>,
) -> anyhow::Result<()> {
    let accounts = read_accounts(passwd_file, domain)?;
    let served = Domains::load(&config.paths.domains)?;
    let new_domains: BTreeSet<String> = accounts
        .iter()
        .map(|a| a.address.domain().to_string())
        .filter(|d| !served.contains(d))
        .collect();
    for d in &new_domains {
        Domains::add(&config.paths.domains, d)?;
        println!("domain {d} is now served here");
    }
    let existing = UserDb::load(&config.paths.users)?;
    let mut copies = Vec::new();
    for account in &accounts {
        let key = account.address.key();
        // Also what makes a second run, after one that failed halfway,
        // take over only the users still missing.
        if existing.get(&key).is_some() {
            println!("{key}: already a user here, account and mail kept as they are");
            continue;
        }
        let source = dovecot_maildir(maildir_root, &account.address);
        let target = maildir_path(&config.paths.mail_root, &account.address)?;
        copies.push((key, source, target, account.line.clone()));
    }
    // Each user's mail is copied aside and renamed into place, and the
    // account is added only once its mail is in: a user is imported
    // whole or not at all.
    let jobs: Vec<(String, Option<PathBuf>, PathBuf)> = copies
        .iter()
        .map(|(k, s, t, _)| (k.clone(), s.clone(), t.clone()))
        .collect();
    let results: Vec<(String, Result<u64, String>)> =
        crate::system::as_store_user_returning(config, || {
            Ok(jobs
                .iter()
                .map(|(user, source, target)| {
                    let copied = match source {
                        Some(source) => copy_maildir(source, target)
                            .with_context(|| format!("copying {}", source.display()))
                            .map_err(|e| format!("{e:#}")),
                        None => Ok(0),
                    };
                    (user.clone(), copied)
                })
                .collect())
        })?;
    let mut failed = 0;
    for ((user, copied), (_, source, _, line)) in results.into_iter().zip(&copies) {
        match copied {
            Ok(messages) => {
                UserDb::add_line(&config.paths.users, line)?;
                match source {
                    Some(_) => println!("{user}: imported with {messages} messages"),
                    None => println!(
                        "{user}: imported (no Maildir under {})",
                        maildir_root.display()
                    ),
                }
            }
            Err(e) => {
                failed += 1;
                println!("{user}: NOT imported: {e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} user(s) not imported; fix the cause and run the import again");
    }
    println!(
        "imported {} users from {}; see `mailctl check`, then point MX and clients here",
        copies.len(),
        passwd_file.display()
    );
    Ok(())
}

/// The user's Maildir under Dovecot's root: `R/d/u/Maildir` or `R/d/u`.
fn dovecot_maildir(root: &Path, address: &Address) -> Option<PathBuf> {
    let home = root.join(address.domain()).join(address.local());
    [home.join("Maildir"), home]
        .into_iter()
        .find(|d| d.join("cur").is_dir())
}

/// Files of Dovecot's that are caches or its own bookkeeping: rebuilt or
/// not needed here. `dovecot-uidlist` and `dovecot-keywords` are kept:
/// the UIDs and keyword letters come from them.
fn is_dovecot_cache(name: &str) -> bool {
    name.starts_with("dovecot.index")
        || name.starts_with("dovecot.list.index")
        || name.starts_with("dovecot-uidvalidity")
        || name == "dovecot.mailbox.log"
        || name == "maildirsize"
}

/// Copy a Dovecot Maildir (INBOX and its `.Folder`s) into `target`, which
/// must not exist yet; returns the messages copied. Message files keep
/// their names and times (IMAP's INTERNALDATE); each folder then gets our
/// UID list from Dovecot's. Built beside the target and renamed into
/// place, so a failed copy leaves nothing behind.
fn copy_maildir(source: &Path, target: &Path) -> anyhow::Result<u64> {
    if target.exists() {
        bail!(
            "{} exists already; not mixed with Dovecot's mail",
            target.display()
        );
    }
    let parent = target.parent().context("a Maildir has a parent")?;
    std::fs::create_dir_all(parent)?;
    let building = parent.join(format!(
        ".importing-{}",
        target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&building);
    let copied = copy_folders(source, &building).and_then(|messages| {
        common::safeio::rename_durable(&building, target)?;
        Ok(messages)
    });
    if copied.is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    copied
}

fn copy_folders(source: &Path, target: &Path) -> anyhow::Result<u64> {
    let mut folders = vec![(source.to_path_buf(), target.to_path_buf())];
    for entry in std::fs::read_dir(source)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name != "." && name != ".." && entry.path().join("cur").is_dir()
        {
            folders.push((entry.path(), target.join(&name)));
        }
    }
    let mut messages = 0;
    for (from, to) in &folders {
        common::maildir::create_maildir(to)?;
        for entry in std::fs::read_dir(from)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_dovecot_cache(&name) {
                continue;
            }
            if let Ok(meta) = entry.metadata() {
                if meta.is_file() {
                    copy_file(&entry.path(), &to.join(&name), &meta)?;
                }
            }
        }
        for sub in ["cur", "new"] {
            for entry in std::fs::read_dir(from.join(sub))?.flatten() {
                // Dovecot may rename (flags) or remove a file while we copy.
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_file()
                    && copy_file(&entry.path(), &to.join(sub).join(entry.file_name()), &meta)?
                {
                    messages += 1;
                }
            }
        }
        common::uidlist::sync(to).with_context(|| format!("UIDs of {}", to.display()))?;
    }
    Ok(messages)
}

/// Copy one file with its modification time; false when it vanished.
fn copy_file(from: &Path, to: &Path, meta: &std::fs::Metadata) -> anyhow::Result<bool> {
    let mut source = match std::fs::File::open(from) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", from.display())),
    };
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    std::io::copy(&mut source, &mut file)?;
    file.set_modified(meta.modified()?)?;
    file.sync_all()?;
    Ok(true)
}

/// /etc/aliases entries into our aliases file.
fn aliases(config: &Config, file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let existing = Aliases::load(&config.paths.aliases)?;
    let (mut added, mut skipped) = (0, 0);
    for (line_no, entry) in entries(&text) {
        let at = format!("{}:{line_no}", file.display());
        let Some((key, targets)) = entry.split_once(':') else {
            println!("{at}: not `name: targets`, skipped");
            skipped += 1;
            continue;
        };
        let key = key.trim();
        let parsed = match AliasKey::parse(key) {
            Ok(k) => k,
            Err(e) => {
                println!("{at}: {e}, skipped");
                skipped += 1;
                continue;
            }
        };
        if existing.get(&parsed).is_some() {
            println!("{at}: {key} is an alias here already, kept as it is");
            skipped += 1;
            continue;
        }
        let mut usable = Vec::new();
        for target in split_targets(targets) {
            // `\user`: that user's own mailbox, which is what a bare name
            // here means already.
            let target = target.strip_prefix('\\').unwrap_or(&target);
            // Delivery never runs commands or writes files it is told to.
            let unquoted = target.trim_start_matches('"');
            if unquoted.starts_with('|')
                || unquoted.starts_with('/')
                || unquoted.starts_with(":include:")
            {
                println!("{at}: {key}: `{target}` (a program, file or include) left out");
                continue;
            }
            usable.push(target.to_string());
        }
        if usable.is_empty() {
            println!("{at}: {key}: nothing left to deliver to, skipped");
            skipped += 1;
            continue;
        }
        match Aliases::add(&config.paths.aliases, key, &usable) {
            Ok(()) => added += 1,
            Err(e) => {
                println!("{at}: {key}: {e}, skipped");
                skipped += 1;
            }
        }
    }
    println!(
        "imported {added} aliases from {} ({skipped} skipped)",
        file.display()
    );
    Ok(())
}

/// The targets of an entry: split at commas, except inside double quotes
/// (`"|/usr/bin/procmail -a x, -b y"` is one target).
fn split_targets(targets: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in targets.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    out.push(current);
    out.into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The entries of an aliases file with their first line numbers: comment
/// lines dropped, continuation lines (starting with white space) joined.
fn entries(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, entry)) = out.last_mut() {
                entry.push(' ');
                entry.push_str(line.trim());
                continue;
            }
        }
        out.push((i + 1, line.trim().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_entries_join_continuations() {
        let text = "# c\npostmaster: root\nstaff: a,\n  b\n\n\tc\nx: y\n";
        assert_eq!(
            entries(text),
            [
                (2, "postmaster: root".to_string()),
                (3, "staff: a, b c".to_string()),
                (7, "x: y".to_string())
            ]
        );
    }

    #[test]
    fn quoted_targets_keep_their_commas() {
        assert_eq!(
            split_targets(r#" "|/usr/bin/procmail -a x, -b y", alice ,\bob,"#),
            [r#""|/usr/bin/procmail -a x, -b y""#, "alice", "\\bob"]
        );
    }

    #[test]
    fn dovecot_caches_are_left_behind() {
        assert!(is_dovecot_cache("dovecot.index.cache"));
        assert!(is_dovecot_cache("dovecot-uidvalidity.65a1b2c3"));
        assert!(!is_dovecot_cache("dovecot-uidlist"));
        assert!(!is_dovecot_cache("dovecot-keywords"));
        assert!(!is_dovecot_cache("subscriptions"));
    }

    #[test]
    fn accounts_are_checked_before_anything_is_imported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        std::fs::write(
            &p,
            "alice:{SHA512-CRYPT}$6$SwxZHvYWaSIYhsKZ$eVPHH6fX:1000:1000::/home/a::userdb_quota_rule=*:storage=1G\n",
        )
        .unwrap();
        let accounts = read_accounts(&p, Some("example.org")).unwrap();
        assert_eq!(accounts[0].address.key(), "alice@example.org");
        assert!(accounts[0]
            .line
            .starts_with("alice@example.org:{SHA512-CRYPT}$6$"));
        assert!(accounts[0].line.ends_with("storage=1G"));
        assert!(read_accounts(&p, None).is_err());
        std::fs::write(&p, "bob@x.org:{PLAIN}secret\n").unwrap();
        let e = read_accounts(&p, None).unwrap_err().to_string();
        assert!(e.contains("nothing imported") && e.contains(":1:"), "{e}");
    }
}
