//! Token decoder: arbitrary bytes (binary and text form) must decode or fail cleanly, and
//! whatever decodes must re-encode to the same bytes and verify without panicking.
#![no_main]
use ephyr::macaroon::{Macaroon, RootKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Macaroon::decode_binary(data.to_vec()) {
        assert_eq!(m.to_binary(), data, "decode/encode must be the identity on accepted input");
        let back = Macaroon::decode(&m.encode()).expect("our own encoding decodes");
        assert_eq!(back, m);
        let _ = RootKey::from_bytes(b"fuzz").start(m.identifier()).verify_and_reduce(&m);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Macaroon::decode(text);
    }
});
