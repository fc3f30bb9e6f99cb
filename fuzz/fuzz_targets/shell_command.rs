//! `shell_command`: the checks are `ephyr::fuzzing::shell_command` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::shell_command(data));
