//! `mailctl user|alias|domain`: edit the tables. Each change rewrites the
//! file whole under its lock; the daemons notice the new file by itself.

use std::io::{BufRead, IsTerminal};

use anyhow::{bail, Context};
use clap::Subcommand;
use common::address::Address;
use common::aliases::Aliases;
use common::config::Config;
use common::domains::Domains;
use common::maildir::create_mailbox;
use common::userdb::{maildir_path, UserDb};

/// `mailctl user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user; the password is read from a prompt, or from stdin's
    /// first line when stdin is not a terminal
    Add { address: String },
    /// Remove a user (the Maildir is kept)
    Del { address: String },
    /// Change a user's password (read like `add`)
    Passwd { address: String },
    /// List users
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a user's mailbox usage and limit, or set the limit (a size
    /// like 500M or 2G, or bytes; `none` removes it)
    Quota {
        address: String,
        limit: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `mailctl alias ...`
#[derive(Debug, Subcommand)]
pub enum AliasCommand {
    /// Add an alias: SOURCE is `name`, `user@domain` or `@domain`
    Add {
        source: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Remove an alias
    Del { source: String },
    /// List aliases
    List {
        #[arg(long)]
        json: bool,
    },
}

/// `mailctl domain ...`
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Serve a domain
    Add { domain: String },
    /// Stop serving a domain
    Del { domain: String },
    /// List served domains
    List {
        #[arg(long)]
        json: bool,
    },
}

/// Run a user command.
pub fn user(config: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    let path = &config.paths.users;
    match cmd {
        UserCommand::Add { address } => {
            let address = Address::parse(&address).with_context(|| format!("`{address}`"))?;
            let domains = Domains::load(&config.paths.domains)?;
            if !domains.contains(address.domain()) {
                bail!(
                    "domain {} is not served here: add it first with `mailctl domain add {}`",
                    address.domain(),
                    address.domain()
                );
            }
            let password = read_password(&format!("Password for {address}: "))?;
            UserDb::add(path, &address, &password)?;
            let maildir = maildir_path(&config.paths.mail_root, &address)?;
            crate::system::as_store_user(config, || {
                create_mailbox(&maildir).with_context(|| format!("creating {}", maildir.display()))
            })?;
            println!("added {} (Maildir {})", address.key(), maildir.display());
        }
        UserCommand::Del { address } => {
            UserDb::remove(path, &address)?;
            println!("removed {address}; its Maildir is kept");
        }
        UserCommand::Passwd { address } => {
            if UserDb::load(path)?.get(&address).is_none() {
                bail!("user {address} does not exist");
            }
            let password = read_password(&format!("New password for {address}: "))?;
            UserDb::set_password(path, &address, &password)?;
            println!("password changed for {address}");
        }
        UserCommand::List { json } => {
            let db = UserDb::load(path)?;
            print_names("user", db.list().iter().map(|u| u.name.as_str()), json);
        }
        UserCommand::Quota {
            address,
            limit,
            json,
        } => quota(config, &address, limit.as_deref(), json)?,
    }
    Ok(())
}

/// `mailctl user quota`: set the limit, then show where the user stands.
fn quota(config: &Config, address: &str, limit: Option<&str>, json: bool) -> anyhow::Result<()> {
    let path = &config.paths.users;
    let address = Address::parse(address).with_context(|| format!("`{address}`"))?;
    if let Some(limit) = limit {
        let bytes = match limit {
            "none" | "0" => None,
            size => Some(common::quota::parse_size(size, 1).map_err(anyhow::Error::msg)?),
        };
        UserDb::set_quota(path, &address.key(), bytes)?;
    }
    let Some(user) = UserDb::load(path)?.get(&address.key()).cloned() else {
        bail!("user {address} does not exist");
    };
    let maildir = maildir_path(&config.paths.mail_root, &address)?;
    let (bytes, messages) = crate::system::as_store_user_returning(config, || {
        let usage = common::quota::usage(&maildir)
            .with_context(|| format!("reading {}", maildir.display()))?;
        Ok((usage.bytes, usage.messages))
    })?;
    if json {
        let v = serde_json::json!({
            "user": user.name,
            "used_bytes": bytes,
            "messages": messages,
            "limit_bytes": user.quota,
        });
        println!("{v}");
    } else {
        match user.quota {
            Some(max) => println!(
                "{}: {bytes} of {max} bytes used ({}%), {messages} messages",
                user.name,
                bytes.saturating_mul(100) / max.max(1)
            ),
            None => println!(
                "{}: {bytes} bytes used, {messages} messages, no limit",
                user.name
            ),
        }
    }
    Ok(())
}

/// Run an alias command.
pub fn alias(config: &Config, cmd: AliasCommand) -> anyhow::Result<()> {
    let path = &config.paths.aliases;
    match cmd {
        AliasCommand::Add { source, targets } => {
            Aliases::add(path, &source, &targets)?;
            println!("added {source}: {}", targets.join(", "));
        }
        AliasCommand::Del { source } => {
            Aliases::remove(path, &source)?;
            println!("removed {source}");
        }
        AliasCommand::List { json } => {
            let aliases = Aliases::load(path)?;
            if json {
                let v: Vec<_> = aliases
                    .list()
                    .iter()
                    .map(|(k, ts)| {
                        let targets: Vec<String> = ts.iter().map(|t| t.to_string()).collect();
                        serde_json::json!({ "source": k.to_string(), "targets": targets })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for (k, ts) in aliases.list() {
                    let targets: Vec<String> = ts.iter().map(|t| t.to_string()).collect();
                    println!("{k}: {}", targets.join(", "));
                }
            }
        }
    }
    Ok(())
}

/// Run a domain command.
pub fn domain(config: &Config, cmd: DomainCommand) -> anyhow::Result<()> {
    let path = &config.paths.domains;
    match cmd {
        DomainCommand::Add { domain } => {
            let name = Domains::add(path, &domain)?;
            let dir = config.paths.mail_root.join(&name);
            crate::system::as_store_user(config, || {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating the mail directory of {name}"))
            })?;
            println!("added {name}");
        }
        DomainCommand::Del { domain } => {
            Domains::remove(path, &domain)?;
            println!("removed {domain}; its users and Maildirs are kept");
        }
        DomainCommand::List { json } => {
            let domains = Domains::load(path)?;
            print_names("domain", domains.iter(), json);
        }
    }
    Ok(())
}

/// Print names one a line, or with `json` as an array of `{key: name}`.
fn print_names<'a>(key: &str, names: impl Iterator<Item = &'a str>, json: bool) {
    if json {
        let v: Vec<_> = names.map(|n| serde_json::json!({ key: n })).collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        names.for_each(|n| println!("{n}"));
    }
}

/// A password from the terminal (not echoed, asked twice) or from stdin's
/// first line. Never from the command line, where `ps` would show it.
fn read_password(prompt: &str) -> anyhow::Result<String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(prompt).context("reading the password")?;
        let again = rpassword::prompt_password("Again: ").context("reading the password")?;
        if first != again {
            bail!("the passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}
