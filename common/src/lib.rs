//! What every mailsrv program shares: configuration, addresses, the user,
//! alias and domain tables, password hashes, Maildir delivery, the spool,
//! queue ids, DNS and logging.

pub mod address;
pub mod aliases;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod domains;
pub mod flags;
pub mod logging;
pub mod login;
pub mod login_cache;
pub mod mailbox_name;
pub mod maildir;
pub mod maildrop;
pub mod memory;
pub mod net;
pub mod password;
pub mod privileges;
pub mod queue_id;
pub mod quota;
pub mod recipients;
pub mod relay_credentials;
pub mod safeio;
pub mod spool;
pub mod textdb;
pub mod throttle;
pub mod tls;
pub mod tls_handoff;
pub mod uidlist;
pub mod userdb;
