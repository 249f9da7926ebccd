//! The SMTP session: command lines (split at LF) through the command
//! parser and the state machine of the MX port, no panic.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use common::config::Config;
use common::recipients::{Directory, DirectoryCache};
use libfuzzer_sys::fuzz_target;
use mailsrv_mta::smtp::session::{Port, Session, SessionLimits};

/// An installation with one domain, one user and one alias, made once.
fn setup() -> &'static (Config, std::sync::Arc<Directory>) {
    static SETUP: OnceLock<(Config, std::sync::Arc<Directory>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mailsrv-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("domains"), "example.test\n").unwrap();
        std::fs::write(dir.join("aliases"), "postmaster: alice\n").unwrap();
        std::fs::write(
            dir.join("users"),
            "alice@example.test:{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g::::::\n",
        )
        .unwrap();
        let text = "hostname = \"mx.example.test\"
[paths]
spool = \"spool\"
mail_root = \"mail\"
users = \"users\"
aliases = \"aliases\"
domains = \"domains\"
run_dir = \"run\"
log_file = \"log\"
[smtpd]
listen = [\"127.0.0.1:2525\"]
[tls]
cert = \"c\"
key = \"k\"
";
        let config = Config::parse(text, &dir.join("mailsrv.toml")).expect("the fuzz config parses");
        let directory = DirectoryCache::new(&config).expect("the tables load").current().0;
        (config, directory)
    })
}

fuzz_target!(|input: &[u8]| {
    let (config, directory) = setup();
    let mut session = Session::new(
        SessionLimits::new(config),
        Port::Mx,
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        None,
    );
    for line in input.split(|&b| b == b'\n') {
        let _ = session.handle(line, directory);
    }
});
