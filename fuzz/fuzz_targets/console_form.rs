//! `console_form`: the checks are `ephyr::fuzzing::console_form` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::console_form(data));
