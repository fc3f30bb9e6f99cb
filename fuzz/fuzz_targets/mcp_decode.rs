//! `mcp_decode`: the checks are `ephyr::fuzzing::mcp_decode` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::mcp_decode(data));
