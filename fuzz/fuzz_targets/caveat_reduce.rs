//! `caveat_reduce`: the checks are `ephyr::fuzzing::caveat_reduce` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::caveat_reduce(data));
