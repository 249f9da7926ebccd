//! The address parser: any text, no panic; what parses prints back and
//! parses again to the same address.
#![no_main]

use common::address::Address;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(address) = Address::parse(text) {
        let again = Address::parse(&address.to_string()).expect("a printed address parses");
        assert_eq!(again, address);
    }
});
