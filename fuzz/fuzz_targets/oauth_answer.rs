//! `oauth_answer`: the checks are `ephyr::fuzzing::oauth_answer` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::oauth_answer(data));
