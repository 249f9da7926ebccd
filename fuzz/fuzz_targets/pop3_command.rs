//! The POP3 command parser: any line, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &str| {
    let _ = mailsrv_maildird::pop3::command::parse(line);
});
