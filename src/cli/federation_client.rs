//! `ephyr __federation-client URL`: the broker's federation client on its own, for the MCP
//! conformance suite's client scenarios (`conformance client --command "ephyr
//! __federation-client"`), which start a server and append its URL. It connects as the broker
//! would (`server/discover`, else `initialize`), lists the tools, and calls each one with
//! arguments made from its input schema, through the same `authorize` and forwarding code.
//!
//! A remote that answers `401` is signed in to with OAuth (`federation::auth`) as an operator
//! would, except that the browser is this process: it opens the authorization URL, takes the
//! redirect, and hands its query back. A pre-registered client comes from the suite's
//! `MCP_CONFORMANCE_CONTEXT` (`client_id`, `client_secret`). A call refused for want of scope
//! (`403 insufficient_scope`) is signed in for again, at most twice per call.
//!
//! What runs here: this process only; a policy with one remote at URL (loopback allowed), an
//! in-memory audit sink, no signer, and secrets only from the suite's context.

use std::rc::Rc;

use serde_json::{Map, Value, json};

use crate::broker::Error;
use crate::broker::audit::MemorySink;
use crate::broker::blocking::BlockingPool;
use crate::broker::federation::{Federation, auth, pins::Pins};
use crate::broker::metrics::Metrics;
use crate::broker::policy::{Policy, Principal, SecretRef};
use crate::broker::ports::{CertSigner, Local, Ports, SecretSource, SignedCert, TaskLiveness};
use crate::broker::signer_client::CallError;
use crate::secret::SecretBytes;
use crate::time::UnixMicros;

struct NoSigner;

impl CertSigner for NoSigner {
    fn sign<'a>(&'a self, _req: crate::signer::protocol::CertRequest) -> Local<'a, Result<SignedCert, CallError>> {
        Box::pin(async { Err(CallError::Protocol("no signer in the federation client".into())) })
    }
    fn max_cert_ttl(&self) -> Option<u64> {
        None
    }
    fn ca_public_key(&self) -> Option<String> {
        None
    }
}

struct NoTasks;

impl TaskLiveness for NoTasks {
    fn unusable(&self, _task: &str) -> bool {
        false
    }
    fn ended(&self, _task: String, _also: Option<UnixMicros>) -> Local<'static, ()> {
        Box::pin(std::future::pending())
    }
}

/// The pre-registered client's secret from the suite's context (`env:CONFORMANCE_CLIENT_SECRET`).
struct ContextSecrets(Option<String>);

impl SecretSource for ContextSecrets {
    fn resolve<'a>(&'a self, r: &'a SecretRef) -> Local<'a, Result<SecretBytes, Error>> {
        Box::pin(async move {
            match (r, &self.0) {
                (SecretRef::Env(n), Some(v)) if n == "CONFORMANCE_CLIENT_SECRET" => {
                    Ok(SecretBytes::new(v.as_bytes().to_vec()))
                }
                _ => Err(Error::Unavailable(format!("secret {r}: none in the federation client"))),
            }
        })
    }
}

/// The policy of the run: one remote at `url`, with an `oauth` entry when it must sign in.
fn policy_text(url: &str, oauth: bool, context: &Value) -> String {
    let mut o = String::new();
    if oauth {
        // The URL the suite's CIMD scenario expects (its fixture's; nothing fetches it).
        o.push_str(", oauth: { client_id_url: 'https://conformance-test.local/client-metadata.json'");
        if let Some(id) = context["client_id"].as_str() {
            o.push_str(&format!(", client_id: {id:?}"));
            if context["client_secret"].is_string() {
                o.push_str(", client_secret: 'env:CONFORMANCE_CLIENT_SECRET'");
            }
        }
        o.push_str(" }");
    }
    format!(
        "version: 1\nnetwork: {{ allow: [127.0.0.0/8, '::1/128'] }}\nremotes:\n  conformance: {{ url: {url:?}, pin: off{o} }}\nagents:\n  client: {{ remotes: {{ conformance: {{}} }} }}\n"
    )
}

/// Arguments for a tool from its input schema: every property with a plain value of its type.
fn sample_arguments(def: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, s) in def["inputSchema"]["properties"].as_object().into_iter().flatten() {
        let v = match s["type"].as_str() {
            Some("number" | "integer") => json!(1),
            Some("boolean") => json!(true),
            Some("array") => json!([]),
            Some("object") => json!({}),
            _ => json!("test"),
        };
        out.insert(k.clone(), v);
    }
    out
}

/// Connects to `url`, lists its tools, calls each; exit 0 when every call returned a result.
pub fn run(url: &str) -> Result<u8, String> {
    let context: Value = std::env::var("MCP_CONFORMANCE_CONTEXT")
        .ok()
        .and_then(|c| serde_json::from_str(&c).ok())
        .unwrap_or(Value::Null);
    let plain =
        Policy::parse(&policy_text(url, false, &context), "federation client").map_err(|e| format!("{url}: {e}"))?;
    let signed =
        Policy::parse(&policy_text(url, true, &context), "federation client").map_err(|e| format!("{url}: {e}"))?;
    let ex = Rc::new(smol::LocalExecutor::new());
    let federation = Federation::new(ex.clone(), Pins::default());
    let (audit, metrics, pool) = (MemorySink::default(), Metrics::default(), BlockingPool::new(1, 8));
    let approvals = crate::broker::approvals::Approvals::in_memory();
    let secrets = ContextSecrets(context["client_secret"].as_str().map(str::to_owned));
    let ports = Ports {
        audit: &audit,
        metrics: &metrics,
        signer: &NoSigner,
        tasks: &NoTasks,
        secrets: &secrets,
        pool: &pool,
        approvals: &approvals,
        progress: None,
    };
    crate::broker::reactor::block_on(ex.run(async {
        federation.refresh_due(ports, &plain).await;
        let mut policy = &plain;
        // A remote that answered 401 with a challenge is signed in to.
        if federation.auth.has_challenge("conformance") {
            policy = &signed;
            // Signed in again while the remote asks for more scope, at most three times.
            for _ in 0..3 {
                federation.auth.forget_need("conformance");
                sign_in(&federation, ports, policy, url).await?;
                let e = federation.status().get("conformance").and_then(|s| s.3.clone());
                if !e.is_some_and(|e| e.contains("sign in")) {
                    break;
                }
            }
        }
        let status = federation.status();
        let (health, tools, _, error) = status.get("conformance").cloned().ok_or("no remote state")?;
        if let Some(e) = error {
            return Err(format!("{url}: {e}"));
        }
        eprintln!("connected ({}), {tools} tool(s)", health);
        let principal = Principal { agent: "client", token: None, delegators: &[] };
        let mut failed = 0;
        for def in federation.tool_definitions("conformance") {
            let name = def["name"].as_str().unwrap_or_default().to_owned();
            let args = sample_arguments(&def);
            let full = format!("conformance.{name}");
            let facts = match federation.prepare(policy, &principal, &full, &args) {
                Some(Ok(f)) => f,
                Some(Err(e)) => return Err(format!("{name}: {e}")),
                None => return Err(format!("{name}: not offered")),
            };
            let mut outcome = federation.forward(ports, policy, &facts, args.clone(), None).await;
            // Refused for want of scope: signed in again (the new scope), at most twice.
            for _ in 0..2 {
                match &outcome {
                    Err(e) if policy.remotes["conformance"].oauth.is_some() && e.message().contains("sign") => {
                        federation.auth.forget_need("conformance");
                        sign_in(&federation, ports, policy, url).await?;
                        outcome = federation.forward(ports, policy, &facts, args.clone(), None).await;
                    }
                    _ => break,
                }
            }
            match outcome {
                Ok((r, _)) => println!("{name}: {}", r["content"][0]["text"].as_str().unwrap_or("(no text)")),
                Err(e) => {
                    failed += 1;
                    println!("{name}: FAILED {e}");
                }
            }
        }
        Ok(if failed == 0 { 0 } else { 1 })
    }))
}

/// Signs in to the remote, this process acting as the operator's browser.
async fn sign_in(federation: &Federation, ports: Ports<'_>, policy: &Policy, url: &str) -> Result<(), String> {
    let begun =
        federation.login(ports, policy, "conformance", None, "conformance").await.map_err(|e| format!("{url}: {e}"))?;
    let cx = auth::Cx::of(federation.conns(), ports, policy, "conformance").ok_or("no oauth settings")?;
    let back = auth::RemoteAuth::visit(cx, &begun.url).await.map_err(|e| format!("{url}: {e}"))?;
    let query = back.split_once('?').map_or("", |(_, q)| q);
    federation.finish_login(ports, policy, query).await.map_err(|e| format!("{url}: {e}"))?;
    eprintln!("signed in");
    Ok(())
}
