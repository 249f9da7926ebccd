//! mailctl: the mailsrv admin tool. See mailctl(8).

mod backup;
mod check;
mod control;
mod dkim;
mod import;
mod init;
mod queue;
mod status;
mod system;
mod tables;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::config::Config;

#[derive(Debug, Parser)]
#[command(name = "mailctl", version, about = "Administer a mailsrv installation")]
struct Cli {
    /// Configuration file [default: $MAILSRV_CONFIG or /etc/mailsrv/mailsrv.toml]
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a complete, self-contained installation in DIR
    Init(init::InitArgs),
    /// Manage mail users
    #[command(subcommand)]
    User(tables::UserCommand),
    /// Manage aliases
    #[command(subcommand)]
    Alias(tables::AliasCommand),
    /// Manage served domains
    #[command(subcommand)]
    Domain(tables::DomainCommand),
    /// See and steer the mail queue
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// DKIM signing keys
    #[command(subcommand)]
    Dkim(dkim::DkimCommand),
    /// Take over users and Maildirs from Dovecot, aliases from Postfix
    #[command(subcommand)]
    Import(import::ImportCommand),
    /// Back up and restore the whole installation
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Print the DNS records to publish for DOMAIN (MX, SPF, DKIM, DMARC)
    Dns { domain: String },
    /// Validate the configuration and the tables
    Check,
    /// Start the mail system
    Start {
        /// Run in this process, logging to stderr, until SIGTERM or SIGINT
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the mail system and wait until it has stopped
    Stop,
    /// Make the daemons re-read the configuration
    Reload,
    /// Show the health of the mail system: daemons, listeners, queue,
    /// disk use, certificate expiry, last backup
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Like every Unix tool, end quietly when the reader of our output goes
    // away (`mailctl queue list | head`) instead of failing to print.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config_path = Config::locate(cli.config.as_deref());
    if let Command::Init(args) = cli.command {
        return init::run(&args);
    }
    if let Command::Check = cli.command {
        return check::run(&config_path);
    }
    // A backup is read, and restored into a new directory, on a machine
    // with no installation.
    if let Command::Backup(c) = cli.command {
        if c.needs_no_config() {
            return backup::without_config(c);
        }
        let config = Config::load(&config_path)?;
        return backup::backup(&config, &config_path, c);
    }
    let config = Config::load(&config_path)?;
    match cli.command {
        Command::Init(_) | Command::Check | Command::Backup(_) => unreachable!("handled above"),
        Command::User(c) => tables::user(&config, c),
        Command::Alias(c) => tables::alias(&config, c),
        Command::Domain(c) => tables::domain(&config, c),
        Command::Queue(c) => queue::queue(&config, c),
        Command::Dkim(c) => dkim::dkim(&config, c),
        Command::Dns { domain } => dkim::dns(&config, &domain),
        Command::Start { foreground } => control::start(&config_path, &config, foreground),
        Command::Stop => control::stop(&config),
        Command::Reload => control::reload(&config),
        Command::Status { json } => status::status(&config, json),
        Command::Import(c) => import::import(&config, c),
    }
}
