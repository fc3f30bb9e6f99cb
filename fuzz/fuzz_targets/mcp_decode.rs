//! MCP request decoding: arbitrary bodies decode to a message or a JSON-RPC error (never a
//! panic); a decoded request classifies in both eras, passes or fails the stateless envelope
//! checks with the headers it implies, and any error it gets encodes as JSON.
#![no_main]
use ephyr::mcp::jsonrpc::{self, Message};
use ephyr::mcp::server::{self, RoutingHeaders};
use ephyr::mcp::version::Version;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match jsonrpc::decode(data) {
        Err(rej) => {
            let out = jsonrpc::encode_error(rej.id.as_ref(), &rej.error);
            assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        }
        Ok(Message::Request(r)) => {
            let name = r.params.get("name").or(r.params.get("uri")).and_then(|v| v.as_str()).map(str::to_owned);
            let version = r
                .params
                .get("_meta")
                .and_then(|m| m.get("io.modelcontextprotocol/protocolVersion"))
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            let h = RoutingHeaders {
                protocol_version: version.as_deref(),
                method: Some(&r.method),
                name: name.as_deref(),
            };
            let _ = server::check_stateless(&r.method, &r.params, h);
            for v in [Version::V2025_11_25, Version::V2026_07_28] {
                if let Err(e) = server::classify(&r.method, r.params.clone(), v) {
                    let out = jsonrpc::encode_error(Some(&r.id), &e);
                    assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
                }
            }
            if r.method == "initialize" {
                let _ = server::initialize(&r.params);
            }
        }
        Ok(_) => {}
    }
});
