//! maildird: the IMAP and POP3 server over the Maildirs.

pub mod access;
pub mod imap;
pub mod login;
pub mod maildrop;
pub mod pop3;
