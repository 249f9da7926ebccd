//! `mailctl check`: the same validation the daemons do at start.

use std::path::Path;

use common::aliases::Aliases;
use common::config::Config;
use common::domains::Domains;
use common::privileges::{check_separation, identity, Role};
use common::userdb::UserDb;

/// Validate the config file and every table it names; the first error is
/// reported as `FILE:LINE: ...`.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let domains = Domains::load(&config.paths.domains)?;
    Aliases::load(&config.paths.aliases)?;
    let users = UserDb::load(&config.paths.users)?;
    for user in users.list() {
        let domain = user
            .name
            .rsplit_once('@')
            .map(|(_, d)| d)
            .unwrap_or_default();
        if !domains.contains(domain) {
            println!(
                "{}: warning: user {} is in a domain not listed in {}",
                config.paths.users.display(),
                user.name,
                config.paths.domains.display()
            );
        }
    }
    if let Some(file) = config
        .delivery
        .relay
        .as_ref()
        .and_then(|r| r.credentials.as_ref())
    {
        common::relay_credentials::load(file)?;
    }
    startable(&config)?;
    println!("{}: ok", config_path.display());
    Ok(())
}

/// What every daemon needs at start beyond a valid config: a certificate
/// and key that load and belong together (the same load the daemons do),
/// and the system users and group of `[privileges]`.
pub fn startable(config: &Config) -> anyhow::Result<()> {
    common::tls::server_config(&config.tls)?;
    if let Some(p) = &config.privileges {
        for role in [Role::Smtpd, Role::Qmgr, Role::Maildird] {
            identity(p, role)?;
        }
        check_separation(p)?;
    }
    Ok(())
}
