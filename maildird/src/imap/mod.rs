//! IMAP4rev2 (RFC 9051) and IMAP4rev1 (RFC 3501) over the Maildirs.

pub mod cache;
pub mod command;
pub mod fetch;
pub mod folder;
pub mod mailboxes;
pub mod mime;
pub mod output;
pub mod search;
pub mod send;
pub mod sequence;
pub mod server;
pub mod session;
pub mod syntax;
pub mod watch;
pub mod wire;
