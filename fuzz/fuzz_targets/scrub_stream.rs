//! `scrub_stream`: the checks are `ephyr::fuzzing::scrub_stream` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::scrub_stream(data));
