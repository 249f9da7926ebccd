//! Giving up root (design.md, "Processes and privileges"): a daemon started
//! as root binds its ports and reads its key, then becomes the system user
//! of its role before it reads a byte from the network.
//!
//! - smtpd: `spool_user` (its primary group owns the spool);
//! - qmgr: `store_user`, plus the spool user's group (it reads and changes
//!   the queue and is the one that delivers into Maildirs);
//! - maildird: `store_user` (owns the Maildirs), no access to the spool.
//!
//! Every role also gets `secret_group`, which may read the config, the
//! tables and the TLS key (re-read on reload).

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{Config, PrivilegesConfig};

/// Which daemon is dropping its privileges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Smtpd,
    Qmgr,
    Maildird,
}

/// Why the privileges could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("privileges: no system user `{0}` (mailctl init, run as root, creates it)")]
    NoUser(String),
    #[error("privileges: no system group `{0}` (mailctl init, run as root, creates it)")]
    NoGroup(String),
    #[error("privileges: looking up `{name}`: {source}")]
    Lookup { name: String, source: nix::Error },
    #[error("privileges: user `{0}` is root; a daemon must run as an unprivileged user")]
    RootUser(String),
    #[error("privileges: {what}: {source}")]
    Syscall {
        what: &'static str,
        source: nix::Error,
    },
    #[error("privileges: root could be regained after dropping it")]
    Regained,
    #[error("privileges: {0}")]
    NotSeparate(String),
}

/// Who a role runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<Gid>,
}

/// A system user: its uid and primary gid.
pub fn user(name: &str) -> Result<(Uid, Gid), PrivilegeError> {
    match User::from_name(name) {
        Ok(Some(u)) => Ok((u.uid, u.gid)),
        Ok(None) => Err(PrivilegeError::NoUser(name.to_string())),
        Err(source) => Err(PrivilegeError::Lookup {
            name: name.to_string(),
            source,
        }),
    }
}

/// A system group's gid.
pub fn group(name: &str) -> Result<Gid, PrivilegeError> {
    match Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(PrivilegeError::NoGroup(name.to_string())),
        Err(source) => Err(PrivilegeError::Lookup {
            name: name.to_string(),
            source,
        }),
    }
}

/// The identity of `role` under `privileges`.
pub fn identity(privileges: &PrivilegesConfig, role: Role) -> Result<Identity, PrivilegeError> {
    let name = match role {
        Role::Smtpd => &privileges.spool_user,
        Role::Qmgr | Role::Maildird => &privileges.store_user,
    };
    let (uid, gid) = user(name)?;
    if uid.is_root() {
        return Err(PrivilegeError::RootUser(name.clone()));
    }
    let mut groups = vec![gid, group(&privileges.secret_group)?];
    if role == Role::Qmgr {
        groups.push(user(&privileges.spool_user)?.1);
        groups.push(group(&privileges.maildrop_group)?);
    }
    groups.dedup();
    Ok(Identity {
        user: name.clone(),
        uid,
        gid,
        groups,
    })
}

/// Check that the spool and store users really are apart: different uids,
/// different primary groups, neither group root's (else smtpd could reach
/// the Maildirs through a shared id).
pub fn check_separation(privileges: &PrivilegesConfig) -> Result<(), PrivilegeError> {
    let (spool_uid, spool_gid) = user(&privileges.spool_user)?;
    let (store_uid, store_gid) = user(&privileges.store_user)?;
    let apart = |m: &str| Err(PrivilegeError::NotSeparate(m.to_string()));
    if spool_uid == store_uid {
        return apart("spool_user and store_user have the same uid");
    }
    if spool_gid == store_gid {
        return apart("spool_user and store_user have the same primary group");
    }
    if spool_gid.as_raw() == 0 || store_gid.as_raw() == 0 {
        return apart("spool_user and store_user must not have group root");
    }
    Ok(())
}

/// Become `role`'s user when running as root with `[privileges]` set; the
/// identity taken, or None when nothing changed (not root, or no
/// `[privileges]`: then everything runs as the invoking user).
pub fn drop_privileges(config: &Config, role: Role) -> Result<Option<Identity>, PrivilegeError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let Some(privileges) = &config.privileges else {
        tracing::warn!("running as root: the config has no [privileges] section");
        return Ok(None);
    };
    check_separation(privileges)?;
    let id = identity(privileges, role)?;
    become_identity(&id)?;
    tracing::info!("running as {} (uid {}, gid {})", id.user, id.uid, id.gid);
    Ok(Some(id))
}

fn become_identity(id: &Identity) -> Result<(), PrivilegeError> {
    let sys = |what| move |source| PrivilegeError::Syscall { what, source };
    // The kernel clears the parent-death signal when credentials change;
    // keep the one the supervisor set.
    let death_signal = nix::sys::prctl::get_pdeathsig().map_err(sys("prctl"))?;
    nix::unistd::setgroups(&id.groups).map_err(sys("setgroups"))?;
    // Real, effective and saved ids all change, so nothing can switch back.
    nix::unistd::setresgid(id.gid, id.gid, id.gid).map_err(sys("setresgid"))?;
    nix::unistd::setresuid(id.uid, id.uid, id.uid).map_err(sys("setresuid"))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::Regained);
    }
    nix::sys::prctl::set_no_new_privs().map_err(sys("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    if let Some(signal) = death_signal {
        nix::sys::prctl::set_pdeathsig(signal).map_err(sys("prctl(PR_SET_PDEATHSIG)"))?;
        // The supervisor may have died while the signal was unset.
        if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
            std::process::exit(1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_are_clear_errors() {
        let p = PrivilegesConfig {
            spool_user: "no-such-user-mailsrv-test".into(),
            store_user: "root".into(),
            secret_group: "root".into(),
            maildrop_group: "no-such-group-mailsrv-test".into(),
        };
        let e = identity(&p, Role::Smtpd).unwrap_err().to_string();
        assert!(
            e.contains("no system user `no-such-user-mailsrv-test`"),
            "{e}"
        );
        let e = identity(&p, Role::Maildird).unwrap_err().to_string();
        assert!(e.contains("is root"), "{e}");
    }
}
