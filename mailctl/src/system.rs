//! What `mailctl` does as root for an installation whose daemons drop
//! privileges (design.md, "Processes and privileges"): make the system
//! users, and give every file and directory its owner and mode.
//!
//! | path | owner:group | mode |
//! |---|---|---|
//! | config | root:secret_group | 0644 (holds no secret; sendmail, run by any user, reads it) |
//! | users, aliases, domains | root:secret_group | 0640 |
//! | TLS key | root:root | 0600 (read as root at start; master hands it over on reload) |
//! | TLS certificate | root:root | 0644 |
//! | DKIM keys, relay credentials | root:secret_group | 0640 |
//! | spool | spool_user:spool group | 2771 (others may pass through to the maildrop) |
//! | spool state directories | spool_user:spool group | 2770 |
//! | spool/maildrop | store_user:maildrop_group | 3730 (sticky, setgid: a setgid-maildrop_group sendmail writes, only qmgr lists and reads) |
//! | mail root | store_user:store group | 0770 |
//! | everything under the mail root | store_user:store group | as made |

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use common::config::{Config, PrivilegesConfig};
use common::privileges::{drop_privileges, group, user, Role};
use nix::unistd::{Gid, Uid};

/// Whether this process is root, and so may make users and change owners.
pub fn is_root() -> bool {
    Uid::effective().is_root()
}

/// Create the secret group and the two users when missing, as system
/// accounts with no home and no login shell.
pub fn ensure_accounts(p: &PrivilegesConfig) -> anyhow::Result<()> {
    for name in [&p.secret_group, &p.maildrop_group] {
        if group(name).is_err() {
            run(Command::new("groupadd").args(["--system", name]))?;
            println!("created system group {name}");
        }
    }
    for (name, role) in [
        (&p.spool_user, "mailsrv smtpd, spool owner"),
        (&p.store_user, "mailsrv mail store owner"),
    ] {
        if user(name).is_err() {
            run(Command::new("useradd").args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                role,
                name,
            ]))?;
            println!("created system user {name}");
        }
    }
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Give the installation described by `config` (at `config_path`) its
/// owners and modes.
pub fn apply_ownership(config: &Config, config_path: &Path) -> anyhow::Result<()> {
    let Some(p) = &config.privileges else {
        return Ok(());
    };
    let secret = group(&p.secret_group)?;
    let (spool_uid, spool_gid) = user(&p.spool_user)?;
    let root = Uid::from_raw(0);
    let paths = &config.paths;
    set(config_path, root, secret, 0o644)?;
    for file in [&paths.users, &paths.aliases, &paths.domains] {
        set(file, root, secret, 0o640)?;
    }
    let root_group = Gid::from_raw(0);
    set(&config.tls.cert, root, root_group, 0o644)?;
    set(&config.tls.key, root, root_group, 0o600)?;
    // Secrets the daemons read through the secret group: DKIM keys
    // (`<dkim_keys>/<domain>/<selector>.pem`) and the relay password.
    let mut secrets: Vec<std::path::PathBuf> = std::fs::read_dir(&paths.dkim_keys)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|domain| std::fs::read_dir(domain.path()).ok())
        .flatten()
        .flatten()
        .map(|key| key.path())
        .collect();
    secrets.extend(
        config
            .delivery
            .relay
            .as_ref()
            .and_then(|r| r.credentials.clone()),
    );
    for file in secrets.iter().filter(|f| f.is_file()) {
        set(file, root, secret, 0o640)?;
    }
    let spool = common::spool::Spool::new(&paths.spool);
    spool.create_dirs().context("creating the spool")?;
    set_tree(&paths.spool, spool_uid, spool_gid, Some(0o2770))?;
    set(&paths.spool, spool_uid, spool_gid, 0o2771)?;
    let (store_uid, store_gid) = user(&p.store_user)?;
    let drop_gid = group(&p.maildrop_group)?;
    set(
        &spool.dir(common::spool::QueueState::Maildrop),
        store_uid,
        drop_gid,
        0o3730,
    )?;
    std::fs::create_dir_all(&paths.mail_root)
        .with_context(|| format!("creating {}", paths.mail_root.display()))?;
    // A new installation: nothing in it yet that another user could have
    // replaced. smtpd must not get through to any Maildir.
    set_tree(&paths.mail_root, store_uid, store_gid, Some(0o770))?;
    for dir in [&paths.spool, &paths.mail_root, &paths.users] {
        reachable(dir)?;
    }
    Ok(())
}

/// Run `work` as the mail-store user when root runs mailctl on an
/// installation that drops privileges: in a child process that has become
/// that user, so what it makes belongs to the store user without a chown,
/// and no path in the store (which that user controls) is ever followed
/// as root. Otherwise `work` runs here.
pub fn as_store_user(
    config: &Config,
    work: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    if config.privileges.is_none() || !is_root() {
        return work();
    }
    // SAFETY: mailctl is single-threaded here; the child only drops its
    // privileges, runs `work` and exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            let result = drop_privileges(config, Role::Maildird)
                .map_err(anyhow::Error::from)
                .and_then(|_| work());
            let code = match result {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("mailctl: {e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        ForkResult::Parent { child } => match waitpid(child, None).context("waitpid")? {
            WaitStatus::Exited(_, 0) => Ok(()),
            other => bail!("the work done as the mail-store user failed ({other:?})"),
        },
    }
}

/// [`as_store_user`] for work with a small result (well under a pipe's
/// 64 KiB, which the child writes before the parent reads).
pub fn as_store_user_returning<T: serde::Serialize + serde::de::DeserializeOwned>(
    config: &Config,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use std::io::Read;
    if config.privileges.is_none() || !is_root() {
        return work();
    }
    let (read, write) = nix::unistd::pipe().context("pipe")?;
    as_store_user(config, || {
        let value = work()?;
        let mut out = std::fs::File::from(write.try_clone()?);
        serde_json::to_writer(&mut out, &value)?;
        Ok(())
    })?;
    drop(write);
    let mut text = String::new();
    std::fs::File::from(read)
        .take(1 << 20)
        .read_to_string(&mut text)?;
    serde_json::from_str(&text).context("the result of the work done as the mail-store user")
}

fn set(path: &Path, uid: Uid, gid: Gid, mode: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw()))
        .with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// chown `path` and what is under it; directories also get `dir_mode`.
fn set_tree(path: &Path, uid: Uid, gid: Gid, dir_mode: Option<u32>) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw()))
        .with_context(|| format!("chown {}", path.display()))?;
    if meta.is_dir() {
        if let Some(mode) = dir_mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", path.display()))?;
        }
        for entry in std::fs::read_dir(path).with_context(|| format!("{}", path.display()))? {
            set_tree(&entry?.path(), uid, gid, dir_mode)?;
        }
    }
    Ok(())
}

/// Every directory above `path` must let the daemons' users through.
fn reachable(path: &Path) -> anyhow::Result<()> {
    for dir in path.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.mode() & 0o001 == 0 {
            bail!(
                "{}: the daemons' users cannot reach {} through it (mode {:o}); make it searchable (chmod o+x) or install elsewhere",
                dir.display(),
                path.display(),
                meta.mode() & 0o7777
            );
        }
    }
    Ok(())
}
