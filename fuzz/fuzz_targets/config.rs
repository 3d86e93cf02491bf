//! Arbitrary text as a configuration file: parsing and validation must refuse or accept, never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = herald::config::Config::parse(text);
});
