//! The mail transfer agent: `smtpd` (receiver), `qmgr` (queue manager and
//! local delivery) and `master` (the supervisor).

pub mod dkim_sign;
pub mod qmgr;
pub mod smtp;
pub mod supervisor;
