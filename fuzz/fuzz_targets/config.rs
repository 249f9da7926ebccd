//! The configuration parser and its checks: any text, no panic, and an
//! error always names the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = common::config::Config::parse(text, Path::new("/fuzz/mailsrv.toml")) {
        assert!(e.to_string().contains("/fuzz/mailsrv.toml"), "{e}");
    }
});
