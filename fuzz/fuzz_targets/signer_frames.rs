//! Signer wire protocol: every decoder must accept or reject arbitrary frames without panicking,
//! and accepted frames must re-encode identically.
#![no_main]
use ephyr::signer::protocol::{ControlRequest, ControlResponse, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((id, r)) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode(id)).unwrap(), (id, r));
    }
    if let Ok((id, r)) = Response::decode(data) {
        assert_eq!(Response::decode(&r.encode(id)).unwrap(), (id, r));
    }
    let _ = ControlRequest::decode(data);
    let _ = ControlResponse::decode(data);
});
