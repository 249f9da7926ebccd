//! The SMTP receiver: a pure DATA decoder and session state machine, and the
//! I/O loop around them. Commands are parsed by `smtp-proto`.

pub mod auth_checks;
pub mod data;
pub mod dnsbl;
pub mod greylist;
pub mod hops;
pub mod own_results;
pub mod rates;
pub mod receive;
pub mod reply;
pub mod scan;
pub mod server;
pub mod session;
