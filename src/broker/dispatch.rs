//! The MCP dispatcher: one classified request ([`Call`]) from one authenticated caller, under one
//! policy snapshot, to its result — whichever transport carried it. The Streamable HTTP endpoint
//! (`http::mcp`) and the local socket call it; federation will too.
//!
//! What runs here: the executor thread. Tools run through `tools::call` (which authorizes and
//! audits each call); `tools/list` comes from the `tools::Catalog`; resources from `resources`.
//! What is left to the transport, because only it has the means: opening notification streams
//! (`subscriptions/listen`), per-session state (`logging/setLevel`), and encoding the reply.

use std::rc::Rc;

use serde_json::{Map, Value, json};

use super::auth::Caller;
use super::policy::Policy;
use super::{Broker, resources, tools};
use crate::mcp::jsonrpc::RpcError;
use crate::mcp::server::{self, Call, Capabilities, ListenFilter, ServerIdentity};
use crate::mcp::types::text_contents;
use crate::mcp::version::Version;

/// The server's identity in results.
pub static IDENTITY: ServerIdentity = ServerIdentity::new(
    "ephyr",
    env!("CARGO_PKG_VERSION"),
    "ephyr brokers access to SSH hosts, HTTP APIs and remote MCP tools. Read ephyr://overview \
     or call list_targets / list_services to see what you may use. Requests outside your policy \
     are denied with a reason; do not retry a denial unchanged.",
);

/// What this server offers (list-changed notifications on policy reloads).
pub const CAPS: Capabilities = Capabilities { list_changed: true };
/// How long list results may be cached by stateless-era clients (per caller).
pub const LIST_TTL_MS: u64 = 30_000;

/// What a call produced.
#[derive(Debug)]
pub enum Reply {
    /// A JSON-RPC result.
    Result(Value),
    /// A result with one member given as JSON text already serialised (the cached tool list):
    /// `{name: raw, ...rest}`.
    RawMember {
        /// The member's name.
        name: &'static str,
        /// Its value, as JSON text.
        raw: String,
        /// The other members (an object).
        rest: Value,
    },
    /// Open a notification stream with this filter (the transport does).
    Listen(ListenFilter),
    /// Set the session's log level and answer `{}` (the transport keeps sessions).
    SetLogLevel(String),
}

/// Where a call's progress notifications go (a client that sent `_meta.progressToken` and takes
/// an event stream): the agent's own token, and the stream its answer is written to. Federation
/// relays a remote's progress here; an approval gate reports its wait.
#[derive(Clone, Debug)]
pub struct Progress {
    /// The token the agent gave (`_meta.progressToken`).
    pub token: Value,
    /// Notifications for the agent, written before its answer.
    pub tx: async_channel::Sender<Value>,
}

impl Progress {
    /// Passes on a remote's `notifications/progress` parameters under the agent's token: only
    /// `progress`, `total` and `message` (at most 1,000 characters), nothing else of the remote's.
    /// Dropped if the agent's stream is behind.
    pub fn relay(&self, params: &Value) {
        let Some(progress) = params["progress"].as_f64().filter(|n| n.is_finite()) else { return };
        let mut p = json!({ "progressToken": self.token, "progress": progress });
        if let Some(t) = params["total"].as_f64().filter(|n| n.is_finite()) {
            p["total"] = Value::from(t);
        }
        if let Some(m) = params["message"].as_str() {
            p["message"] = Value::from(m.chars().take(1000).collect::<String>());
        }
        let _ = self.tx.try_send(json!({ "jsonrpc": "2.0", "method": "notifications/progress", "params": p }));
    }

    /// Reports the broker's own progress (`progress` rising, a message of its own).
    pub fn send(&self, progress: f64, message: &str) {
        self.relay(&json!({ "progress": progress, "message": message }));
    }
}

/// Answers `call` for `caller` under `policy` in protocol revision `v`; a federated tool's
/// progress notifications go to `progress` when the caller asked for them.
pub async fn dispatch(
    broker: &Rc<Broker>,
    policy: &Rc<Policy>,
    caller: &Caller,
    v: Version,
    call: Call,
    progress: Option<&Progress>,
) -> Result<Reply, RpcError> {
    // A run's tool calls and commands are counted for its summary (`ephyr runs`, the console).
    if let Call::ToolsCall { name, .. } = &call
        && let Some(r) = caller.token().and_then(|t| broker.runs.of_lineage(&t.lineage))
    {
        r.called(name);
    }
    match call {
        Call::Ping => Ok(Reply::Result(json!({}))),
        Call::Discover => Ok(Reply::Result(server::discover_result(&IDENTITY, CAPS))),
        Call::ToolsList => {
            let mut raw = broker.catalog.list_json(policy, caller, v.structured_output());
            if !policy.remotes.is_empty() {
                broker.federation.refresh_due(broker.ports(), policy).await;
                let remote = broker.federation.visible_descriptors(policy, &caller.principal());
                if !remote.is_empty() {
                    raw.pop();
                    for d in remote {
                        if raw.len() > 1 {
                            raw.push(',');
                        }
                        raw.push_str(&d);
                    }
                    raw.push(']');
                }
            }
            Ok(Reply::RawMember {
                name: "tools",
                raw,
                rest: server::finish(v, &IDENTITY, server::cacheable(v, Map::new(), LIST_TTL_MS, false)),
            })
        }
        Call::ToolsCall { name, arguments } if tools::find(&name).is_none() && !policy.remotes.is_empty() => {
            broker.federation.refresh_due(broker.ports(), policy).await;
            broker.federation.revive_for_call(broker.ports(), policy, &name).await;
            match tools::call_remote(broker, caller, policy, &name, arguments, progress).await {
                None => Err(RpcError::invalid_params(format!("unknown tool {name:?}"))),
                Some(Ok(result)) => {
                    // Only what a tool result is: a hostile remote cannot add protocol fields.
                    let mut keep = Map::new();
                    for k in ["content", "isError", "structuredContent"] {
                        if let Some(x) = result.get(k)
                            && (k != "structuredContent" || v.structured_output())
                        {
                            keep.insert(k.to_owned(), x.clone());
                        }
                    }
                    Ok(Reply::Result(server::finish(v, &IDENTITY, keep)))
                }
                Some(Err(out)) => Ok(Reply::Result(server::tool_result(v, &IDENTITY, out.text, true, None))),
            }
        }
        Call::ToolsCall { name, arguments } => {
            match tools::call(broker, caller, policy, &name, arguments, progress).await {
                None => Err(RpcError::invalid_params(format!("unknown tool {name:?}"))),
                Some(out) => {
                    let structured = match (out.is_error, out.value, tools::find(&name)) {
                        (false, Some(value), Some(t)) if v.structured_output() => t.output.structured(*value),
                        _ => None,
                    };
                    Ok(Reply::Result(server::tool_result(v, &IDENTITY, out.text, out.is_error, structured)))
                }
            }
        }
        Call::ResourcesList => {
            let mut list: Vec<Value> = resources::RESOURCES.iter().map(|d| d.to_json()).collect();
            if !policy.remotes.is_empty() {
                broker.federation.refresh_due(broker.ports(), policy).await;
                list.extend(broker.federation.visible_resources(policy, &caller.principal()));
            }
            let mut m = Map::new();
            m.insert("resources".into(), Value::Array(list));
            Ok(Reply::Result(server::finish(v, &IDENTITY, server::cacheable(v, m, LIST_TTL_MS, false))))
        }
        Call::ResourceTemplatesList => {
            let mut list = Vec::new();
            if !policy.remotes.is_empty() {
                broker.federation.refresh_due(broker.ports(), policy).await;
                list = broker.federation.visible_templates(policy, &caller.principal());
            }
            let mut m = Map::new();
            m.insert("resourceTemplates".into(), Value::Array(list));
            Ok(Reply::Result(server::finish(v, &IDENTITY, server::cacheable(v, m, LIST_TTL_MS, true))))
        }
        Call::ResourcesRead { uri } if uri.starts_with(super::federation::REMOTE_URI) => {
            match tools::ask_remote(broker, caller, policy, tools::RemoteAsk::Read(&uri)).await {
                Some(Ok(result)) => {
                    // Always an object: the federation builds it from what it keeps.
                    let m = if let Value::Object(m) = result { m } else { Map::new() };
                    Ok(Reply::Result(server::finish(v, &IDENTITY, server::cacheable(v, m, 0, false))))
                }
                Some(Err(e)) => Err(remote_rpc_error(&uri, e)),
                None => Err(RpcError::new(v.resource_not_found_code(), format!("unknown resource {uri:?}"))
                    .with_data(json!({ "uri": uri }))),
            }
        }
        Call::PromptsList => {
            let mut list = Vec::new();
            if !policy.remotes.is_empty() {
                broker.federation.refresh_due(broker.ports(), policy).await;
                list = broker.federation.visible_prompts(policy, &caller.principal());
            }
            let mut m = Map::new();
            m.insert("prompts".into(), Value::Array(list));
            Ok(Reply::Result(server::finish(v, &IDENTITY, server::cacheable(v, m, LIST_TTL_MS, false))))
        }
        Call::PromptsGet { name, arguments } => {
            match tools::ask_remote(broker, caller, policy, tools::RemoteAsk::Prompt(&name, &arguments)).await {
                Some(Ok(result)) => {
                    // Always an object: the federation builds it from what it keeps.
                    let m = if let Value::Object(m) = result { m } else { Map::new() };
                    Ok(Reply::Result(server::finish(v, &IDENTITY, m)))
                }
                Some(Err(e)) => Err(remote_rpc_error(&name, e)),
                None => Err(RpcError::invalid_params(format!("unknown prompt {name:?}"))),
            }
        }
        Call::ResourcesRead { uri } => match resources::read(broker, policy, caller, &uri) {
            Some(text) => {
                let mut m = Map::new();
                m.insert("contents".into(), json!([text_contents(&uri, "text/markdown", text)]));
                Ok(Reply::Result(server::finish(v, &IDENTITY, server::cacheable(v, m, 0, false))))
            }
            None => Err(RpcError::new(v.resource_not_found_code(), format!("unknown resource {uri:?}"))
                .with_data(json!({ "uri": uri }))),
        },
        Call::SetLogLevel(level) => Ok(Reply::SetLogLevel(level)),
        Call::Listen(filter) => Ok(Reply::Listen(filter)),
    }
}

/// A refused or failed resource read or prompt as a JSON-RPC error: the reason (and the remote)
/// in the message, the denial code in `data`. Never an internal error.
fn remote_rpc_error(asked: &str, e: super::Error) -> RpcError {
    let data = match &e {
        super::Error::Denied(d) => json!({ "asked": asked, "code": d.code.as_str() }),
        other => json!({ "asked": asked, "code": other.code() }),
    };
    RpcError::invalid_params(e.message()).with_data(data)
}

/// The text and error flag of a `tools/call` result (for transports that are not MCP).
pub fn tool_text(result: &Value) -> (String, bool) {
    let text = result["content"][0]["text"].as_str().unwrap_or_default().to_owned();
    (text, result["isError"].as_bool().unwrap_or(false))
}
