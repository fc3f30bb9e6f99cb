//! JSON-RPC 2.0 as MCP uses it: one message per HTTP body, ids that are strings or integers,
//! params that are objects. Batches are refused (MCP removed them in 2025-06-18).
//!
//! Pure: bytes in, values out. The decoder is strict where ambiguity could be abused: a duplicated
//! top-level member (`method` twice, say) is an invalid request rather than "last one wins", so a
//! proxy that reads the first copy and the broker can never disagree about what was asked.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Error codes: JSON-RPC's own, MCP's, and ephyr's (from the implementation-defined range).
pub mod code {
    /// The body is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// JSON, but not a valid request object (or a batch).
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method (in this protocol version).
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters missing or of the wrong shape; unknown tool; in 2026-07-28 also an unknown
    /// resource.
    pub const INVALID_PARAMS: i64 = -32602;
    /// A bug on our side.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Not authenticated (also the HTTP 401 body).
    pub const UNAUTHENTICATED: i64 = -32001;
    /// Resource not found (2025 revisions).
    pub const RESOURCE_NOT_FOUND: i64 = -32002;
    /// Forbidden (bad Origin or Host, a disabled agent).
    pub const FORBIDDEN: i64 = -32003;
    /// Too many requests.
    pub const RATE_LIMITED: i64 = -32005;
    /// The session is unknown or has ended (the client must initialize again).
    pub const SESSION_NOT_FOUND: i64 = -32010;
    /// 2026-07-28: an `Mcp-*` routing header is missing, duplicated or disagrees with the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// 2026-07-28: the request needs a client capability the client did not declare.
    pub const MISSING_CLIENT_CAPABILITY: i64 = -32021;
    /// 2026-07-28: the requested protocol version is not served here.
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
}

/// A request id: MCP allows strings and integers (never null).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RequestId {
    /// An integer id.
    Num(i64),
    /// A string id.
    Str(String),
}

impl Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RequestId::Num(n) => s.serialize_i64(*n),
            RequestId::Str(t) => s.serialize_str(t),
        }
    }
}

impl RequestId {
    fn from_value(v: &Value) -> Option<RequestId> {
        match v {
            Value::Number(n) => n.as_i64().map(RequestId::Num),
            Value::String(s) => Some(RequestId::Str(s.clone())),
            _ => None,
        }
    }

    /// As a JSON value.
    pub fn to_value(&self) -> Value {
        match self {
            RequestId::Num(n) => Value::from(*n),
            RequestId::Str(s) => Value::from(s.as_str()),
        }
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Num(n) => write!(f, "{n}"),
            RequestId::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A request (has an id, wants an answer).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Its id.
    pub id: RequestId,
    /// The method.
    pub method: String,
    /// Named parameters (an absent `params` reads as empty).
    pub params: Map<String, Value>,
}

/// A notification (no id, no answer).
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    /// The method.
    pub method: String,
    /// Named parameters.
    pub params: Map<String, Value>,
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// A request.
    Request(Request),
    /// A notification.
    Notification(Notification),
    /// A response the client posted (to a server request; we never send any, so it is
    /// acknowledged and dropped).
    Response,
}

/// A JSON-RPC error, ready to send.
#[derive(Clone, Debug, PartialEq)]
pub struct RpcError {
    /// One of [`code`].
    pub code: i64,
    /// Human text: what was wrong, naming the member or value.
    pub message: String,
    /// Structured details.
    pub data: Option<Value>,
}

impl RpcError {
    /// An error without data.
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into(), data: None }
    }

    /// Adds data.
    pub fn with_data(mut self, data: Value) -> RpcError {
        self.data = Some(data);
        self
    }

    /// `-32602` naming the parameter.
    pub fn invalid_params(message: impl Into<String>) -> RpcError {
        RpcError::new(code::INVALID_PARAMS, message)
    }

    /// `-32601` naming the method.
    pub fn method_not_found(method: &str) -> RpcError {
        RpcError::new(code::METHOD_NOT_FOUND, format!("method not found: {method:?}"))
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// Why a body is not a message: the error to send and the id to send it with (`None` = null).
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// The id, when it could be read.
    pub id: Option<RequestId>,
    /// The error.
    pub error: RpcError,
}

/// Members present or absent, with `null` kept apart from absent for `id`.
#[derive(Deserialize)]
struct Raw {
    #[serde(default, deserialize_with = "present")]
    jsonrpc: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    method: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    params: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    result: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Value>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

fn invalid(id: Option<RequestId>, message: impl Into<String>) -> Rejected {
    Rejected { id, error: RpcError::new(code::INVALID_REQUEST, message) }
}

/// Decodes one message from a body.
pub fn decode(body: &[u8]) -> Result<Message, Rejected> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => return Err(Rejected { id: None, error: RpcError::new(code::PARSE_ERROR, "empty body") }),
        Some(b'[') => {
            return Err(invalid(None, "batch requests are not supported: send one JSON-RPC message per request"));
        }
        Some(b'{') => {}
        Some(_) => {
            // Either not JSON at all, or JSON that is not an object.
            return Err(match serde_json::from_slice::<de::IgnoredAny>(body) {
                Ok(_) => invalid(None, "the body must be one JSON-RPC request object"),
                Err(e) => Rejected { id: None, error: RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}")) },
            });
        }
    }
    let raw: Raw = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return Err(invalid(None, format!("not a valid JSON-RPC message: {e}")));
        }
        Err(e) => return Err(Rejected { id: None, error: RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}")) }),
    };
    let id = match &raw.id {
        None => None,
        Some(v) => match RequestId::from_value(v) {
            Some(id) => Some(id),
            None => return Err(invalid(None, "\"id\" must be a string or an integer (not null)")),
        },
    };
    match raw.jsonrpc.as_ref() {
        Some(Value::String(s)) if s == "2.0" => {}
        Some(v) => return Err(invalid(id, format!("\"jsonrpc\" must be \"2.0\", got {v}"))),
        None => return Err(invalid(id, "\"jsonrpc\": \"2.0\" is missing")),
    }
    let Some(method) = raw.method else {
        if id.is_some() && (raw.result.is_some() || raw.error.is_some()) {
            return Ok(Message::Response);
        }
        return Err(invalid(id, "\"method\" is missing"));
    };
    let Value::String(method) = method else {
        return Err(invalid(id, "\"method\" must be a string"));
    };
    if raw.result.is_some() || raw.error.is_some() {
        return Err(invalid(id, "a request must not carry \"result\" or \"error\""));
    }
    let params = match raw.params {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(invalid(id, "\"params\" must be an object")),
    };
    Ok(match id {
        Some(id) => Message::Request(Request { id, method, params }),
        None => Message::Notification(Notification { method, params }),
    })
}

#[derive(Serialize)]
struct OkOut<'a> {
    jsonrpc: &'static str,
    id: &'a RequestId,
    result: &'a Value,
}

#[derive(Serialize)]
struct ErrOut<'a> {
    jsonrpc: &'static str,
    id: Option<&'a RequestId>,
    error: ErrBody<'a>,
}

#[derive(Serialize)]
struct ErrBody<'a> {
    code: i64,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
}

#[derive(Serialize)]
struct NoteOut<'a> {
    jsonrpc: &'static str,
    method: &'a str,
    params: &'a Value,
}

/// Encodes a success response.
pub fn encode_result(id: &RequestId, result: &Value) -> Vec<u8> {
    serde_json::to_vec(&OkOut { jsonrpc: "2.0", id, result }).unwrap_or_default()
}

/// Encodes a success response whose result is `rest` (an object) with one more member, `name`,
/// whose value is `raw`: JSON text the caller serialised earlier (a cached list), spliced in
/// without parsing it again. `raw` must be valid JSON.
pub fn encode_result_with_raw(id: &RequestId, name: &str, raw: &str, rest: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 256);
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    let _ = serde_json::to_writer(&mut out, id);
    out.extend_from_slice(b",\"result\":{");
    let _ = serde_json::to_writer(&mut out, name);
    out.push(b':');
    out.extend_from_slice(raw.as_bytes());
    let rest = serde_json::to_vec(rest).unwrap_or_default();
    // `rest` is an object: `{}` or `{...}`; its members follow ours.
    if rest.len() > 2 && rest.first() == Some(&b'{') {
        out.push(b',');
        out.extend_from_slice(&rest[1..]);
    } else {
        out.push(b'}');
    }
    out.push(b'}');
    out
}

/// Encodes an error response (`id` null when unknown).
pub fn encode_error(id: Option<&RequestId>, e: &RpcError) -> Vec<u8> {
    let body = ErrBody { code: e.code, message: &e.message, data: e.data.as_ref() };
    serde_json::to_vec(&ErrOut { jsonrpc: "2.0", id, error: body }).unwrap_or_default()
}

/// Encodes a notification.
pub fn encode_notification(method: &str, params: &Value) -> Vec<u8> {
    serde_json::to_vec(&NoteOut { jsonrpc: "2.0", method, params }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> Rejected {
        decode(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn requests_notifications_and_responses() {
        let m = decode(br#"{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"cursor":"x"}}"#).unwrap();
        let Message::Request(r) = m else { panic!() };
        assert_eq!(r.id, RequestId::Num(7));
        assert_eq!(r.method, "tools/list");
        assert_eq!(r.params["cursor"], "x");
        let m = decode(br#"{"jsonrpc":"2.0","id":"a","method":"ping"}"#).unwrap();
        assert!(matches!(m, Message::Request(Request { id: RequestId::Str(_), .. })));
        let m = decode(br#" {"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert!(matches!(m, Message::Notification(_)));
        assert_eq!(decode(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#).unwrap(), Message::Response);
    }

    #[test]
    fn every_malformed_shape_gets_its_code_and_a_reason() {
        for (body, code, words) in [
            ("", code::PARSE_ERROR, "empty"),
            ("{\"jsonrpc\":", code::PARSE_ERROR, "not JSON"),
            ("nope", code::PARSE_ERROR, "not JSON"),
            ("[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}]", code::INVALID_REQUEST, "batch"),
            ("42", code::INVALID_REQUEST, "one JSON-RPC request object"),
            ("{\"id\":1,\"method\":\"ping\"}", code::INVALID_REQUEST, "\"jsonrpc\": \"2.0\" is missing"),
            ("{\"jsonrpc\":\"1.0\",\"id\":1,\"method\":\"ping\"}", code::INVALID_REQUEST, "must be \"2.0\""),
            ("{\"jsonrpc\":\"2.0\",\"id\":null,\"method\":\"ping\"}", code::INVALID_REQUEST, "not null"),
            ("{\"jsonrpc\":\"2.0\",\"id\":1.5,\"method\":\"ping\"}", code::INVALID_REQUEST, "integer"),
            ("{\"jsonrpc\":\"2.0\",\"id\":1}", code::INVALID_REQUEST, "\"method\" is missing"),
            ("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":3}", code::INVALID_REQUEST, "must be a string"),
            ("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\",\"params\":[1]}", code::INVALID_REQUEST, "object"),
            ("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"a\",\"method\":\"b\"}", code::INVALID_REQUEST, "duplicate"),
        ] {
            let r = err(body);
            assert_eq!(r.error.code, code, "{body}: {:?}", r.error);
            assert!(r.error.message.contains(words), "{body}: {}", r.error.message);
        }
        // The id is echoed when it could be read.
        assert_eq!(err("{\"jsonrpc\":\"1.0\",\"id\":9,\"method\":\"ping\"}").id, Some(RequestId::Num(9)));
    }

    #[test]
    fn encoding() {
        let ok = encode_result(&RequestId::Str("x".into()), &serde_json::json!({"a": 1}));
        assert_eq!(ok, br#"{"jsonrpc":"2.0","id":"x","result":{"a":1}}"#);
        let e = encode_error(None, &RpcError::new(code::PARSE_ERROR, "bad"));
        assert_eq!(e, br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad"}}"#);
    }

    #[test]
    fn a_raw_member_is_spliced_into_the_result() {
        let id = RequestId::Num(7);
        let rest = serde_json::json!({"ttlMs": 1000, "_meta": {"a": "b"}});
        let out = encode_result_with_raw(&id, "tools", r#"[{"name":"x"}]"#, &rest);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["result"]["tools"][0]["name"], "x");
        assert_eq!(v["result"]["ttlMs"], 1000);
        assert_eq!(v["result"]["_meta"]["a"], "b");
        let out = encode_result_with_raw(&RequestId::Str("s".into()), "tools", "[]", &serde_json::json!({}));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"jsonrpc": "2.0", "id": "s", "result": {"tools": []}}));
    }
}
