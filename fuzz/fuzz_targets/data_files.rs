//! `data_files`: the checks are `ephyr::fuzzing::data_files` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::data_files(data));
