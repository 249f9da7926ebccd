//! `mailctl check`: the same validation the daemons do at start.

use std::path::Path;

use anyhow::Context;
use common::aliases::Aliases;
use common::config::Config;
use common::domains::Domains;
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
    for p in [&config.tls.cert, &config.tls.key] {
        std::fs::metadata(p).with_context(|| format!("{}: tls file", p.display()))?;
    }
    println!("{}: ok", config_path.display());
    Ok(())
}
