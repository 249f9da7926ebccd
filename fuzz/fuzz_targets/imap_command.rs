//! The IMAP command decoder, literals included (`{n}` / `{n+}` followed
//! by their bytes, as the I/O loop hands a whole command over): any
//! bytes, no panic, and the helpers the loop uses on the raw line too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailsrv_maildird::imap::{command, syntax};

fuzz_target!(|message: &[u8]| {
    let _ = command::decode(message);
    let _ = syntax::literal_announcement(message);
    let _ = syntax::command_name(message);
    let _ = syntax::is_append_message_literal(message);
    let _ = syntax::split_search_return(message);
    let _ = syntax::parse_list(message);
});
