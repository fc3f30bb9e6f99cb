//! `policy_load`: the checks are `ephyr::fuzzing::policy_load` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::policy_load(data));
