//! `signer_frames`: the checks are `ephyr::fuzzing::signer_frames` (shared with the corpus replay test).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ephyr::fuzzing::signer_frames(data));
