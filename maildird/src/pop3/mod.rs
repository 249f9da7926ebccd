//! POP3 (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH RFC 5034): a pure
//! command parser and session state machine.

pub mod command;
pub mod output;
pub mod server;
pub mod session;
