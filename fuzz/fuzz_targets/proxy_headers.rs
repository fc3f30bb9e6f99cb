//! `proxy_headers`: the checks are `ephyr::fuzzing::proxy_headers` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::proxy_headers(data));
