//! What `mailctl` does as root for an installation whose daemons drop
//! privileges (design.md, "Processes and privileges"): make the system
//! users, and give every file and directory its owner and mode.
//!
//! | path | owner:group | mode |
//! |---|---|---|
//! | config, users, aliases, domains | root:secret_group | 0640 |
//! | TLS key | root:root | 0600 (read as root at start; master hands it over on reload) |
//! | TLS certificate | root:root | 0644 |
//! | spool and its state directories | spool_user:spool group | 2770 |
//! | mail root | store_user:store group | 0770 |
//! | everything under the mail root | store_user:store group | as made |

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use common::config::{Config, PrivilegesConfig};
use common::privileges::{group, user};
use nix::unistd::{Gid, Uid};

/// Whether this process is root, and so may make users and change owners.
pub fn is_root() -> bool {
    Uid::effective().is_root()
}

/// Create the secret group and the two users when missing, as system
/// accounts with no home and no login shell.
pub fn ensure_accounts(p: &PrivilegesConfig) -> anyhow::Result<()> {
    if group(&p.secret_group).is_err() {
        run(Command::new("groupadd").args(["--system", &p.secret_group]))?;
        println!("created system group {}", p.secret_group);
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
    for file in [config_path, &paths.users, &paths.aliases, &paths.domains] {
        set(file, root, secret, 0o640)?;
    }
    let root_group = Gid::from_raw(0);
    set(&config.tls.cert, root, root_group, 0o644)?;
    set(&config.tls.key, root, root_group, 0o600)?;
    let spool = common::spool::Spool::new(&paths.spool);
    spool.create_dirs().context("creating the spool")?;
    set_tree(&paths.spool, spool_uid, spool_gid, Some(0o2770))?;
    std::fs::create_dir_all(&paths.mail_root)
        .with_context(|| format!("creating {}", paths.mail_root.display()))?;
    give_to_store(config, &paths.mail_root)?;
    // smtpd must not get through to any Maildir.
    std::fs::set_permissions(&paths.mail_root, std::fs::Permissions::from_mode(0o770))
        .with_context(|| format!("chmod {}", paths.mail_root.display()))?;
    for dir in [&paths.spool, &paths.mail_root, &paths.users] {
        reachable(dir)?;
    }
    Ok(())
}

/// Hand `path` (in the mail root) and everything under it, and the
/// directories between it and the mail root, to the mail-store user, when
/// root made them for an installation that drops privileges.
pub fn give_to_store(config: &Config, path: &Path) -> anyhow::Result<()> {
    let Some(p) = config.privileges.as_ref().filter(|_| is_root()) else {
        return Ok(());
    };
    let (uid, gid) = user(&p.store_user)?;
    let between = path
        .ancestors()
        .skip(1)
        .take_while(|d| d.starts_with(&config.paths.mail_root) && *d != config.paths.mail_root);
    for dir in between {
        std::os::unix::fs::chown(dir, Some(uid.as_raw()), Some(gid.as_raw()))
            .with_context(|| format!("chown {}", dir.display()))?;
    }
    set_tree(path, uid, gid, None)
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
