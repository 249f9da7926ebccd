//! `mailctl dkim keygen` and `mailctl dns`: DKIM keys in
//! `<paths.dkim_keys>/<domain>/<selector>.pem`, and the DNS records a
//! domain needs (MX, SPF, DKIM, DMARC) in zone-file form.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine as _;
use clap::{Subcommand, ValueEnum};
use common::config::Config;

/// Key algorithms (RFC 6376 3.3, RFC 8463).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Algorithm {
    /// RSA, 2048 bits
    Rsa,
    /// Ed25519
    Ed25519,
}

#[derive(Debug, Subcommand)]
pub enum DkimCommand {
    /// Make a signing key for DOMAIN and print its DNS record
    Keygen {
        domain: String,
        /// The selector (s=), the key's name in the DNS
        #[arg(long, default_value = "mail")]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: Algorithm,
    },
}

/// `mailctl dkim ...`
pub fn dkim(config: &Config, command: DkimCommand) -> anyhow::Result<()> {
    match command {
        DkimCommand::Keygen {
            domain,
            selector,
            algorithm,
        } => keygen(config, &domain, &selector, algorithm),
    }
}

/// A DNS label of letters, digits and hyphens (and dots in a domain):
/// nothing that could leave the keys directory.
fn check_name(what: &str, name: &str, dots: bool) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || (dots && c == '.'))
        && !name.contains("..");
    if !ok {
        bail!(
            "{what} `{name}`: use letters, digits and hyphens{}",
            if dots { " (and dots)" } else { "" }
        );
    }
    Ok(())
}

fn keygen(
    config: &Config,
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
) -> anyhow::Result<()> {
    let domain = domain.to_ascii_lowercase();
    check_name("domain", &domain, true)?;
    check_name("selector", selector, false)?;
    let dir = config.paths.dkim_keys.join(&domain);
    let path = dir.join(format!("{selector}.pem"));
    if path.exists() {
        bail!("{} exists; choose another --selector", path.display());
    }
    let pem = match algorithm {
        Algorithm::Rsa => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)
                .context("generating an RSA key")?;
            key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .context("encoding the key")?
                .to_string()
        }
        Algorithm::Ed25519 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .context("generating an Ed25519 key")?
            .serialize_pem(),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_key(config, &path, pem.as_bytes())?;
    println!("created {}", path.display());
    println!("publish this record; smtpd signs with the key after `mailctl reload`, qmgr (sendmail's mail) after a restart:");
    println!("{}", dkim_record(&domain, &path)?);
    Ok(())
}

/// Write a new key readable by the daemons and nobody else: the secret
/// group's when they drop privileges, else only the owner's.
fn write_key(config: &Config, path: &Path, pem: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(pem)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    if let (Some(p), true) = (&config.privileges, crate::system::is_root()) {
        let gid = common::privileges::group(&p.secret_group)?;
        std::os::unix::fs::chown(path, Some(0), Some(gid.as_raw()))
            .with_context(|| format!("chown {}", path.display()))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    Ok(())
}

/// The TXT record for the key at `path` (`<selector>.pem`).
fn dkim_record(domain: &str, path: &Path) -> anyhow::Result<String> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let key = rcgen::KeyPair::from_pem(&pem)
        .with_context(|| format!("{}: not a PKCS#8 RSA or Ed25519 key", path.display()))?;
    let (k, public) = if key.is_compatible(&rcgen::PKCS_ED25519) {
        // RFC 8463 4.2: the raw 32-byte public key.
        ("ed25519", key.public_key_raw().to_vec())
    } else {
        // RFC 6376 3.6.1: SubjectPublicKeyInfo.
        ("rsa", key.public_key_der())
    };
    let selector = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let value = format!(
        "v=DKIM1; k={k}; p={}",
        base64::engine::general_purpose::STANDARD.encode(public)
    );
    Ok(txt(&format!("{selector}._domainkey.{domain}."), &value))
}

/// A zone-file TXT line; values over 255 bytes are split into several
/// strings (RFC 7208 3.3, RFC 6376 3.6.2.2 join them again).
fn txt(name: &str, value: &str) -> String {
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!("{name:<40} IN TXT {}", strings.join(" "))
}

/// `mailctl dns DOMAIN`: every record to publish for DOMAIN.
pub fn dns(config: &Config, domain: &str) -> anyhow::Result<()> {
    let domain = domain.to_ascii_lowercase();
    check_name("domain", &domain, true)?;
    let host = &config.hostname;
    println!("; DNS records for {domain}, served by {host} (paste into the zone of {domain})");
    println!("{:<40} IN MX 10 {host}.", format!("{domain}."));
    println!("; {host} needs A and AAAA records with this machine's public addresses,");
    println!("; and those addresses PTR records naming {host}.");
    println!("{}", txt(&format!("{domain}."), "v=spf1 mx -all"));
    let mut keys: Vec<PathBuf> = match std::fs::read_dir(config.paths.dkim_keys.join(&domain)) {
        Ok(dir) => dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "pem"))
            .collect(),
        Err(_) => Vec::new(),
    };
    keys.sort();
    if keys.is_empty() {
        println!("; no DKIM key for {domain}: mailctl dkim keygen {domain}");
    }
    for key in keys {
        println!("{}", dkim_record(&domain, &key)?);
    }
    println!(
        "{}",
        txt(
            &format!("_dmarc.{domain}."),
            &format!("v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}")
        )
    );
    Ok(())
}
