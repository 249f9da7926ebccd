//! maildird: the POP3 (and, to come, IMAP) server over the Maildirs.

pub mod maildrop;
pub mod pop3;
