//! maildird: the POP3 (and, to come, IMAP) server over the Maildirs.

pub mod imap;
pub mod mailbox_name;
pub mod maildrop;
pub mod pop3;
