//! `mailctl init`: a complete installation in one directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use common::address::normalize_domain;
use common::config::Config;
use common::spool::Spool;

use crate::system;

/// Arguments of `mailctl init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to create the installation in
    dir: PathBuf,
    /// Host name for banners, Received: headers and the certificate
    #[arg(long, default_value = "localhost")]
    hostname: String,
    /// First served domain [default: the host name]
    #[arg(long)]
    domain: Option<String>,
    /// Listen on 127.0.0.1 at P+25 (SMTP), P+587 (submission), P+465
    /// (submissions), P+143 (IMAP), P+993 (IMAPS), P+110 (POP3) and P+995
    /// (POP3S)
    #[arg(long, default_value_t = 10000)]
    port_base: u16,
    /// Run every daemon as whoever starts it, even root: no system users,
    /// no [privileges] section (containers, tests)
    #[arg(long)]
    single_user: bool,
}

/// Create the installation.
pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir).context("resolving the directory")?;
    let config_path = dir.join("mailsrv.toml");
    if config_path.exists() {
        bail!(
            "{} exists: refusing to overwrite an installation",
            config_path.display()
        );
    }
    let domain = args.domain.as_deref().unwrap_or(&args.hostname);
    let domain =
        normalize_domain(domain).with_context(|| format!("`{domain}` is not a domain name"))?;
    if args.port_base.checked_add(995).is_none() {
        bail!("--port-base is too high: P+995 must be a port number");
    }
    let smtp_port = args.port_base + 25;
    let privileged = system::is_root() && !args.single_user;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut text = config_text(&args.hostname, args.port_base);
    if privileged {
        text.push_str(PRIVILEGES);
    }
    // Check what we are about to write with the real parser.
    let mut config = Config::parse(&text, &config_path)
        .context("internal error: generated config is invalid")?;
    for sub in ["mail", "run", "log", "tls"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {sub}/"))?;
    }
    Spool::new(&dir.join("spool"))
        .create_dirs()
        .context("creating the spool")?;
    write_tls(&dir.join("tls"), &args.hostname)?;
    write_new(&dir.join("users"), "", 0o600)?;
    write_new(
        &dir.join("aliases"),
        "# name: target, target   |   user@domain: target   |   @domain: catch-all\n",
        0o644,
    )?;
    write_new(&dir.join("domains"), &format!("{domain}\n"), 0o644)?;
    write_new(&config_path, &text, 0o644)?;
    if let Some(p) = &config.privileges {
        system::ensure_accounts(p)?;
        config = Config::load(&config_path)?;
        system::apply_ownership(&config, &config_path)?;
    }
    println!("created {}", config_path.display());
    println!("  smtp        127.0.0.1:{smtp_port}");
    println!(
        "  submission  127.0.0.1:{} (STARTTLS, AUTH)",
        args.port_base + 587
    );
    println!(
        "  submissions 127.0.0.1:{} (TLS, AUTH)",
        args.port_base + 465
    );
    println!(
        "  imap        127.0.0.1:{} (STARTTLS)",
        args.port_base + 143
    );
    println!("  imaps       127.0.0.1:{}", args.port_base + 993);
    println!("  pop3        127.0.0.1:{} (STLS)", args.port_base + 110);
    println!("  pop3s       127.0.0.1:{}", args.port_base + 995);
    println!("  domain      {domain}");
    if let Some(p) = &config.privileges {
        println!(
            "  users       smtpd as {}, qmgr and maildird as {}, secrets group {}",
            p.spool_user, p.store_user, p.secret_group
        );
        println!(
            "  sendmail    for every user: install -g {} -m 2755 {} /usr/sbin/sendmail",
            p.maildrop_group,
            config
                .paths
                .binary_dir()
                .map(|d| d.join("sendmail").display().to_string())
                .unwrap_or_else(|_| "sendmail".into())
        );
    }
    println!("  mail        {}", dir.join("mail").display());
    println!(
        "next: mailctl -c {} user add you@{domain}",
        config_path.display()
    );
    Ok(())
}

fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    common::safeio::write_atomic_mode(path, text.as_bytes(), mode)
        .with_context(|| format!("writing {}", path.display()))
}

fn write_tls(dir: &Path, hostname: &str) -> anyhow::Result<()> {
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let cert = rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    write_new(&dir.join("cert.pem"), &cert.cert.pem(), 0o644)?;
    write_new(&dir.join("key.pem"), &cert.key_pair.serialize_pem(), 0o600)
}

/// Written when `mailctl init` runs as root: the daemons drop to these
/// users after binding their ports.
const PRIVILEGES: &str = r#"
[privileges]
spool_user = "mailsrv"
store_user = "vmail"
secret_group = "mailkeys"
"#;

fn config_text(hostname: &str, port_base: u16) -> String {
    let smtp_port = port_base + 25;
    let submission_port = port_base + 587;
    let submissions_port = port_base + 465;
    let imap_port = port_base + 143;
    let imaps_port = port_base + 993;
    let pop3_port = port_base + 110;
    let pop3s_port = port_base + 995;
    format!(
        r#"# mailsrv configuration; every key is described in mailsrv.conf(5).
# Relative paths are relative to this file's directory.
hostname = "{hostname}"

[paths]
spool = "spool"
mail_root = "mail"
users = "users"
aliases = "aliases"
domains = "domains"
run_dir = "run"
log_file = "log/mailsrv.log"

[log]
level = "info"

[smtpd]
listen = ["127.0.0.1:{smtp_port}"]
submission_listen = ["127.0.0.1:{submission_port}"]
submissions_listen = ["127.0.0.1:{submissions_port}"]
allow_plaintext_auth = false
max_message_size = 26214400
max_recipients = 100
relay_networks = []

[qmgr]
delivery_concurrency = 8

[addresses]
recipient_delimiter = "+"

[maildird]
imap_listen = ["127.0.0.1:{imap_port}"]
imaps_listen = ["127.0.0.1:{imaps_port}"]
pop3_listen = ["127.0.0.1:{pop3_port}"]
pop3s_listen = ["127.0.0.1:{pop3s_port}"]
allow_plaintext_auth = false

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
"#
    )
}
