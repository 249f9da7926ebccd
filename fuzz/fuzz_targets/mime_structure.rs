//! The MIME walker behind BODYSTRUCTURE, ENVELOPE, BODY[section] and
//! SEARCH: any message, no panic, and the output is bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailsrv_maildird::imap::mime::MessageView;

fuzz_target!(|raw: &[u8]| {
    let view = MessageView::parse(raw);
    let mut out = Vec::new();
    view.write_body_structure(&mut out, true, true);
    view.write_envelope(&mut out, false);
    let _ = view.section(&[1, 1], mailsrv_maildird::imap::mime::SectionText::Mime);
    let _ = view.binary(&[1]);
    let _ = view.body_contains("x");
    let _ = view.sent_date();
});
