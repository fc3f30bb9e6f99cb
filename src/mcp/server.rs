//! The server side of MCP, without a transport: the `initialize` handshake, the stateless-era
//! envelope checks, method classification with typed parameters, and result shapes per revision.
//!
//! Pure: values in, values out. The HTTP transport (`broker::http::mcp`) decides which era a
//! request belongs to, calls these, and runs the tools; nothing here knows about tools, policy
//! or sockets.

use serde_json::{Map, Value, json};

use super::jsonrpc::{RequestId, RpcError, code};
use super::version::{
    Era, META_CLIENT_CAPABILITIES, META_CLIENT_INFO, META_PROTOCOL_VERSION, META_SERVER_INFO, META_SUBSCRIPTION_ID,
    STATELESS_VERSIONS, Version,
};

/// Who we are, as results report it.
#[derive(Debug)]
pub struct ServerIdentity {
    /// `ephyr`.
    pub name: &'static str,
    /// The crate version.
    pub version: &'static str,
    /// Guidance for the model (sent as `instructions`).
    pub instructions: &'static str,
    /// `serverInfo`, built once.
    pub info_cache: std::sync::OnceLock<Value>,
}

impl ServerIdentity {
    /// An identity.
    pub const fn new(name: &'static str, version: &'static str, instructions: &'static str) -> Self {
        ServerIdentity { name, version, instructions, info_cache: std::sync::OnceLock::new() }
    }

    fn info(&self) -> Value {
        self.info_cache
            .get_or_init(|| json!({ "name": self.name, "title": "ephyr access broker", "version": self.version }))
            .clone()
    }
}

/// What the server offers.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// Tool list changes are announced (session era: on the GET stream; stateless era: on
    /// `subscriptions/listen`).
    pub list_changed: bool,
}

impl Capabilities {
    /// The `capabilities` object for `v`.
    pub fn to_json(self, v: Version) -> Value {
        let mut c = json!({
            "tools": { "listChanged": self.list_changed },
            "resources": { "listChanged": self.list_changed, "subscribe": false },
            "prompts": { "listChanged": false },
        });
        if v.era() == Era::Session {
            // logging/setLevel is accepted (we send no log notifications; 2026-07-28 removed it).
            c["logging"] = json!({});
        }
        c
    }
}

/// The client, as it introduced itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// `clientInfo.name` (`"unknown"` when absent).
    pub name: String,
    /// `clientInfo.version`.
    pub version: String,
}

impl ClientInfo {
    fn from_value(v: Option<&Value>) -> Result<ClientInfo, RpcError> {
        match v {
            None => Ok(ClientInfo { name: "unknown".into(), version: String::new() }),
            Some(Value::Object(m)) => {
                let s = |k: &str| m.get(k).and_then(Value::as_str).map(|s| s.chars().take(100).collect::<String>());
                Ok(ClientInfo {
                    name: s("name").unwrap_or_else(|| "unknown".into()),
                    version: s("version").unwrap_or_default(),
                })
            }
            Some(_) => Err(RpcError::invalid_params("clientInfo must be an object with name and version")),
        }
    }
}

/// A validated `initialize`.
#[derive(Clone, Debug)]
pub struct Initialize {
    /// The version we answer with.
    pub version: Version,
    /// What the client asked for.
    pub requested: String,
    /// The client.
    pub client: ClientInfo,
}

/// Validates `initialize` params and negotiates the version.
pub fn initialize(params: &Map<String, Value>) -> Result<Initialize, RpcError> {
    let requested = match params.get("protocolVersion") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(RpcError::invalid_params("protocolVersion must be a string such as \"2025-11-25\"")),
        None => return Err(RpcError::invalid_params("protocolVersion is missing")),
    };
    if params.get("capabilities").is_some_and(|c| !c.is_object()) {
        return Err(RpcError::invalid_params("capabilities must be an object"));
    }
    let client = ClientInfo::from_value(params.get("clientInfo"))?;
    Ok(Initialize { version: Version::negotiate(&requested), requested, client })
}

/// The `initialize` result.
pub fn initialize_result(v: Version, who: &ServerIdentity, caps: Capabilities) -> Value {
    json!({
        "protocolVersion": v.as_str(),
        "capabilities": caps.to_json(v),
        "serverInfo": who.info(),
        "instructions": who.instructions,
    })
}

/// The `server/discover` result (stateless era).
pub fn discover_result(who: &ServerIdentity, caps: Capabilities) -> Value {
    let versions: Vec<&str> = STATELESS_VERSIONS.iter().map(|v| v.as_str()).collect();
    let mut m = Map::new();
    m.insert("supportedVersions".into(), json!(versions));
    m.insert("capabilities".into(), caps.to_json(Version::V2026_07_28));
    m.insert("instructions".into(), Value::from(who.instructions));
    finish(Version::V2026_07_28, who, cacheable(Version::V2026_07_28, m, 300_000, true))
}

/// The routing headers a stateless-era request carries (already decoded from HTTP).
#[derive(Clone, Copy, Debug, Default)]
pub struct RoutingHeaders<'a> {
    /// `MCP-Protocol-Version`.
    pub protocol_version: Option<&'a str>,
    /// `Mcp-Method`.
    pub method: Option<&'a str>,
    /// `Mcp-Name` (raw; may carry the `=?base64?…?=` form).
    pub name: Option<&'a str>,
}

/// A stateless-era request whose envelope passed every check.
#[derive(Clone, Debug)]
pub struct Stateless {
    /// Its version.
    pub version: Version,
    /// The client.
    pub client: ClientInfo,
}

/// The `-32022` error for a version we do not serve in the stateless era.
pub fn unsupported_version(requested: &str) -> RpcError {
    let supported: Vec<&str> = STATELESS_VERSIONS.iter().map(|v| v.as_str()).collect();
    RpcError::new(code::UNSUPPORTED_PROTOCOL_VERSION, format!("unsupported protocol version {requested:?}"))
        .with_data(json!({ "supported": supported, "requested": requested }))
}

/// Decodes an `Mcp-Name` value: verbatim, or the `=?base64?…?=` form (canonical base64 of UTF-8).
pub fn decode_header_value(raw: &str) -> Option<String> {
    let Some(inner) = raw.strip_prefix("=?base64?").and_then(|r| r.strip_suffix("?=")) else {
        return Some(raw.to_owned());
    };
    let bytes = data_encoding::BASE64.decode(inner.as_bytes()).ok()?;
    // Only the canonical encoding: two spellings of one name must not both pass.
    if data_encoding::BASE64.encode(&bytes) != inner {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// The parameter whose value `Mcp-Name` mirrors, per method.
fn name_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// The stateless-era checks, first failure wins: `_meta` carries the version and the client's
/// capabilities; the routing headers agree with the body; the version is one we serve.
pub fn check_stateless(
    method: &str,
    params: &Map<String, Value>,
    headers: RoutingHeaders<'_>,
) -> Result<Stateless, RpcError> {
    let Some(Value::Object(meta)) = params.get("_meta") else {
        return Err(RpcError::invalid_params(format!(
            "params._meta must be an object carrying {META_PROTOCOL_VERSION:?} and {META_CLIENT_CAPABILITIES:?}"
        )));
    };
    let missing: Vec<&str> =
        [META_PROTOCOL_VERSION, META_CLIENT_CAPABILITIES].into_iter().filter(|k| !meta.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(RpcError::invalid_params(format!("params._meta is missing {}", missing.join(" and "))));
    }
    let body_version = meta.get(META_PROTOCOL_VERSION);
    match (headers.protocol_version, body_version) {
        (Some(h), Some(Value::String(b))) if h == b => {}
        (None, _) => {
            return Err(RpcError::new(code::HEADER_MISMATCH, "the MCP-Protocol-Version header is missing"));
        }
        _ => {
            return Err(RpcError::new(
                code::HEADER_MISMATCH,
                "the MCP-Protocol-Version header does not match params._meta's protocol version",
            ));
        }
    }
    match headers.method {
        Some(m) if m == method => {}
        None => return Err(RpcError::new(code::HEADER_MISMATCH, "the Mcp-Method header is missing")),
        Some(_) => {
            return Err(RpcError::new(code::HEADER_MISMATCH, "the Mcp-Method header does not match the body's method"));
        }
    }
    if let Some(key) = name_param(method)
        && let Some(body_name) = params.get(key)
    {
        let header = headers.name.map(decode_header_value);
        match header {
            None => {
                return Err(RpcError::new(
                    code::HEADER_MISMATCH,
                    format!("the Mcp-Name header is missing ({key:?} is set)"),
                ));
            }
            Some(None) => return Err(RpcError::new(code::HEADER_MISMATCH, "the Mcp-Name header is malformed base64")),
            Some(Some(h)) if body_name.as_str() == Some(h.as_str()) => {}
            Some(Some(_)) => {
                return Err(RpcError::new(
                    code::HEADER_MISMATCH,
                    format!("the Mcp-Name header does not match the body's {key:?}"),
                ));
            }
        }
    }
    let requested = body_version.and_then(Value::as_str).unwrap_or_default();
    let version = match Version::parse(requested) {
        Some(v) if v.era() == Era::Stateless => v,
        _ => return Err(unsupported_version(requested)),
    };
    let client = ClientInfo::from_value(meta.get(META_CLIENT_INFO))?;
    Ok(Stateless { version, client })
}

/// Which change notifications a `subscriptions/listen` asked for and we honour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenFilter {
    /// `toolsListChanged`.
    pub tools: bool,
    /// `resourcesListChanged`.
    pub resources: bool,
}

/// A classified request, with typed parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    /// `ping` (session era).
    Ping,
    /// `server/discover` (stateless era).
    Discover,
    /// `tools/list`.
    ToolsList,
    /// `tools/call`.
    ToolsCall {
        /// Tool name.
        name: String,
        /// Arguments (empty when absent).
        arguments: Map<String, Value>,
    },
    /// `resources/list`.
    ResourcesList,
    /// `resources/templates/list`.
    ResourceTemplatesList,
    /// `resources/read`.
    ResourcesRead {
        /// The URI.
        uri: String,
    },
    /// `prompts/list`.
    PromptsList,
    /// `prompts/get`.
    PromptsGet {
        /// Prompt name.
        name: String,
        /// Arguments (empty when absent).
        arguments: Map<String, Value>,
    },
    /// `logging/setLevel` (session era).
    SetLogLevel(String),
    /// `subscriptions/listen` (stateless era).
    Listen(ListenFilter),
}

const LOG_LEVELS: [&str; 8] = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"];

fn no_cursor(params: &Map<String, Value>) -> Result<(), RpcError> {
    match params.get("cursor") {
        None | Some(Value::Null) => Ok(()),
        // We never hand out cursors: every list fits in one page.
        Some(_) => Err(RpcError::invalid_params("invalid cursor: this server does not paginate")),
    }
}

/// Classifies a request for revision `v`. `initialize` is not a `Call`: the transport handles it
/// (it creates the session).
pub fn classify(method: &str, mut params: Map<String, Value>, v: Version) -> Result<Call, RpcError> {
    let era = v.era();
    Ok(match method {
        "ping" if era == Era::Session => Call::Ping,
        "server/discover" if era == Era::Stateless => Call::Discover,
        "tools/list" => {
            no_cursor(&params)?;
            Call::ToolsList
        }
        "tools/call" => {
            let name = match params.remove("name") {
                Some(Value::String(s)) => s,
                Some(_) => return Err(RpcError::invalid_params("params.name must be a string")),
                None => return Err(RpcError::invalid_params("params.name (the tool) is missing")),
            };
            let arguments = match params.remove("arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m,
                Some(_) => return Err(RpcError::invalid_params("params.arguments must be an object")),
            };
            Call::ToolsCall { name, arguments }
        }
        "resources/list" => {
            no_cursor(&params)?;
            Call::ResourcesList
        }
        "resources/templates/list" => {
            no_cursor(&params)?;
            Call::ResourceTemplatesList
        }
        "prompts/list" => {
            no_cursor(&params)?;
            Call::PromptsList
        }
        "prompts/get" => {
            let name = match params.remove("name") {
                Some(Value::String(s)) => s,
                Some(_) => return Err(RpcError::invalid_params("params.name must be a string")),
                None => return Err(RpcError::invalid_params("params.name (the prompt) is missing")),
            };
            let arguments = match params.remove("arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) if m.values().all(Value::is_string) => m,
                Some(_) => return Err(RpcError::invalid_params("params.arguments must be an object of strings")),
            };
            Call::PromptsGet { name, arguments }
        }
        "resources/read" => match params.remove("uri") {
            Some(Value::String(uri)) => Call::ResourcesRead { uri },
            Some(_) => return Err(RpcError::invalid_params("params.uri must be a string")),
            None => return Err(RpcError::invalid_params("params.uri is missing")),
        },
        "logging/setLevel" if era == Era::Session => match params.get("level").and_then(Value::as_str) {
            Some(l) if LOG_LEVELS.contains(&l) => Call::SetLogLevel(l.to_owned()),
            _ => {
                return Err(RpcError::invalid_params(format!("params.level must be one of {}", LOG_LEVELS.join(", "))));
            }
        },
        "subscriptions/listen" if era == Era::Stateless => {
            let Some(Value::Object(n)) = params.get("notifications") else {
                return Err(RpcError::invalid_params("params.notifications must be an object"));
            };
            let flag = |k: &str| n.get(k).and_then(Value::as_bool).unwrap_or(false);
            Call::Listen(ListenFilter { tools: flag("toolsListChanged"), resources: flag("resourcesListChanged") })
        }
        "initialize" if era == Era::Session => {
            return Err(RpcError::new(code::INVALID_REQUEST, "initialize must be sent without a session"));
        }
        other => return Err(RpcError::method_not_found(other)),
    })
}

/// Completes a result for `v`: stateless-era results carry `resultType` and the server's identity.
pub fn finish(v: Version, who: &ServerIdentity, mut m: Map<String, Value>) -> Value {
    if v.era() == Era::Stateless {
        m.insert("resultType".into(), Value::from("complete"));
        let meta = m.entry("_meta").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(meta) = meta {
            meta.insert(META_SERVER_INFO.into(), who.info());
        }
    }
    Value::Object(m)
}

/// Adds the stateless era's cache hints to a list or read result (`private`: per caller).
pub fn cacheable(v: Version, mut m: Map<String, Value>, ttl_ms: u64, public: bool) -> Map<String, Value> {
    if v.era() == Era::Stateless {
        m.insert("ttlMs".into(), Value::from(ttl_ms));
        m.insert("cacheScope".into(), Value::from(if public { "public" } else { "private" }));
    }
    m
}

/// A `tools/call` result: one text block, optionally marked as an error, and the same data as
/// `structuredContent` when the revision has structured output.
pub fn tool_result(v: Version, who: &ServerIdentity, text: String, is_error: bool, structured: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("content".into(), json!([{ "type": "text", "text": text }]));
    if is_error {
        m.insert("isError".into(), Value::Bool(true));
    }
    if let Some(s) = structured.filter(|_| v.structured_output()) {
        m.insert("structuredContent".into(), s);
    }
    finish(v, who, m)
}

/// `notifications/subscriptions/acknowledged` for a listen request.
pub fn listen_acknowledged(id: &RequestId, f: ListenFilter) -> Value {
    let mut n = Map::new();
    if f.tools {
        n.insert("toolsListChanged".into(), Value::Bool(true));
    }
    if f.resources {
        n.insert("resourcesListChanged".into(), Value::Bool(true));
    }
    json!({ "_meta": { META_SUBSCRIPTION_ID: id.to_value() }, "notifications": n })
}

/// Params of a list-changed notification (stateless era: tagged with the subscription).
pub fn list_changed_params(subscription: Option<&RequestId>) -> Value {
    match subscription {
        Some(id) => json!({ "_meta": { META_SUBSCRIPTION_ID: id.to_value() } }),
        None => json!({}),
    }
}

/// The result that ends a listen stream gracefully (server shutdown).
pub fn listen_ended(id: &RequestId, who: &ServerIdentity) -> Value {
    let mut m = Map::new();
    m.insert("_meta".into(), json!({ META_SUBSCRIPTION_ID: id.to_value() }));
    finish(Version::V2026_07_28, who, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    static WHO: ServerIdentity = ServerIdentity::new("ephyr", "0", "");

    fn modern(extra: Value) -> Map<String, Value> {
        let mut p = json!({ "_meta": {
            META_PROTOCOL_VERSION: "2026-07-28",
            META_CLIENT_CAPABILITIES: {},
            META_CLIENT_INFO: { "name": "t", "version": "1" },
        }});
        if let (Value::Object(p), Value::Object(e)) = (&mut p, extra) {
            p.extend(e);
        }
        p.as_object().cloned().unwrap()
    }

    fn headers<'a>(v: &'a str, m: &'a str, n: Option<&'a str>) -> RoutingHeaders<'a> {
        RoutingHeaders { protocol_version: Some(v), method: Some(m), name: n }
    }

    #[test]
    fn initialize_negotiates_and_validates() {
        let i = initialize(
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(i.version, Version::V2025_06_18);
        assert_eq!(i.client.name, "c");
        let i = initialize(json!({"protocolVersion": "2030-01-01"}).as_object().unwrap()).unwrap();
        assert_eq!(i.version, Version::V2025_11_25);
        assert!(initialize(json!({}).as_object().unwrap()).unwrap_err().message.contains("protocolVersion is missing"));
        assert_eq!(
            initialize(json!({"protocolVersion": 1}).as_object().unwrap()).unwrap_err().code,
            code::INVALID_PARAMS
        );
    }

    #[test]
    fn the_stateless_ladder_names_the_first_failure() {
        let p = modern(json!({"name": "list_targets"}));
        let ok = check_stateless("tools/call", &p, headers("2026-07-28", "tools/call", Some("list_targets"))).unwrap();
        assert_eq!(ok.version, Version::V2026_07_28);
        assert_eq!(ok.client.name, "t");
        // base64 form of the name is accepted.
        let b64 = format!("=?base64?{}?=", data_encoding::BASE64.encode(b"list_targets"));
        check_stateless("tools/call", &p, headers("2026-07-28", "tools/call", Some(&b64))).unwrap();

        let none = RoutingHeaders::default();
        type Case<'a> = (&'a str, Map<String, Value>, RoutingHeaders<'a>, i64, &'a str);
        let cases: Vec<Case<'_>> = vec![
            ("tools/list", Map::new(), headers("2026-07-28", "tools/list", None), code::INVALID_PARAMS, "params._meta"),
            (
                "tools/list",
                json!({"_meta": {META_PROTOCOL_VERSION: "2026-07-28"}}).as_object().cloned().unwrap(),
                headers("2026-07-28", "tools/list", None),
                code::INVALID_PARAMS,
                "clientCapabilities",
            ),
            (
                "tools/list",
                modern(json!({})),
                RoutingHeaders { method: Some("tools/list"), ..none },
                code::HEADER_MISMATCH,
                "MCP-Protocol-Version header is missing",
            ),
            (
                "tools/list",
                modern(json!({})),
                headers("2025-11-25", "tools/list", None),
                code::HEADER_MISMATCH,
                "does not match",
            ),
            (
                "tools/list",
                modern(json!({})),
                RoutingHeaders { protocol_version: Some("2026-07-28"), ..none },
                code::HEADER_MISMATCH,
                "Mcp-Method header is missing",
            ),
            (
                "tools/list",
                modern(json!({})),
                headers("2026-07-28", "tools/call", None),
                code::HEADER_MISMATCH,
                "Mcp-Method header does not match",
            ),
            (
                "tools/call",
                p.clone(),
                headers("2026-07-28", "tools/call", None),
                code::HEADER_MISMATCH,
                "Mcp-Name header is missing",
            ),
            (
                "tools/call",
                p.clone(),
                headers("2026-07-28", "tools/call", Some("exec")),
                code::HEADER_MISMATCH,
                "does not match the body's \"name\"",
            ),
            (
                "tools/call",
                p.clone(),
                headers("2026-07-28", "tools/call", Some("=?base64?!!?=")),
                code::HEADER_MISMATCH,
                "malformed",
            ),
        ];
        for (method, params, h, c, words) in cases {
            let e = check_stateless(method, &params, h).unwrap_err();
            assert_eq!(e.code, c, "{e:?}");
            assert!(e.message.contains(words), "{} lacks {words:?}", e.message);
        }
        // An unknown version is named, with the list we serve.
        let mut p = modern(json!({}));
        p["_meta"][META_PROTOCOL_VERSION] = json!("2030-01-01");
        let e = check_stateless("tools/list", &p, headers("2030-01-01", "tools/list", None)).unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_PROTOCOL_VERSION);
        assert_eq!(e.data.unwrap()["supported"], json!(["2026-07-28"]));
        // A session-era version in a stateless envelope is also unsupported there.
        let mut p = modern(json!({}));
        p["_meta"][META_PROTOCOL_VERSION] = json!("2025-11-25");
        let e = check_stateless("tools/list", &p, headers("2025-11-25", "tools/list", None)).unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_PROTOCOL_VERSION);
    }

    #[test]
    fn classification_per_era() {
        let s = Version::V2025_11_25;
        let m = Version::V2026_07_28;
        let p = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(classify("ping", Map::new(), s).unwrap(), Call::Ping);
        assert_eq!(classify("ping", Map::new(), m).unwrap_err().code, code::METHOD_NOT_FOUND);
        assert_eq!(classify("server/discover", Map::new(), m).unwrap(), Call::Discover);
        assert_eq!(classify("server/discover", Map::new(), s).unwrap_err().code, code::METHOD_NOT_FOUND);
        assert_eq!(
            classify("tools/call", p(json!({"name": "x"})), s).unwrap(),
            Call::ToolsCall { name: "x".into(), arguments: Map::new() }
        );
        assert!(
            classify("tools/call", p(json!({"name": "x", "arguments": [1]})), s)
                .unwrap_err()
                .message
                .contains("arguments")
        );
        assert!(classify("tools/call", Map::new(), s).unwrap_err().message.contains("name"));
        assert!(classify("tools/list", p(json!({"cursor": "abc"})), s).unwrap_err().message.contains("cursor"));
        assert_eq!(
            classify("logging/setLevel", p(json!({"level": "info"})), s).unwrap(),
            Call::SetLogLevel("info".into())
        );
        assert_eq!(
            classify("logging/setLevel", p(json!({"level": "loud"})), s).unwrap_err().code,
            code::INVALID_PARAMS
        );
        assert_eq!(
            classify("subscriptions/listen", p(json!({"notifications": {"toolsListChanged": true}})), m).unwrap(),
            Call::Listen(ListenFilter { tools: true, resources: false })
        );
        assert_eq!(classify("prompts/list", Map::new(), s).unwrap(), Call::PromptsList);
        assert_eq!(
            classify("prompts/get", p(json!({"name": "ev.p", "arguments": {"a": 1}})), s).unwrap_err().code,
            code::INVALID_PARAMS
        );
        assert_eq!(classify("completion/complete", Map::new(), s).unwrap_err().code, code::METHOD_NOT_FOUND);
    }

    #[test]
    fn stateless_results_carry_result_type_and_server_info() {
        let r = tool_result(Version::V2026_07_28, &WHO, "x".into(), true, None);
        assert_eq!(r["resultType"], "complete");
        assert_eq!(r["_meta"][META_SERVER_INFO]["name"], "ephyr");
        assert_eq!(r["isError"], true);
        let r = tool_result(Version::V2025_11_25, &WHO, "x".into(), false, None);
        assert!(r.get("resultType").is_none() && r.get("isError").is_none());
        let d = discover_result(&WHO, Capabilities { list_changed: true });
        assert_eq!(d["supportedVersions"], json!(["2026-07-28"]));
        assert_eq!(d["cacheScope"], "public");
        assert!(d["ttlMs"].is_u64());
    }
}
