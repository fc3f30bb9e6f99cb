//! `ephyr __federation-client URL`: the broker's federation client on its own, for the MCP
//! conformance suite's client scenarios (`conformance client --command "ephyr
//! __federation-client"`), which start a server and append its URL. It connects as the broker
//! would (`server/discover`, else `initialize`), lists the tools, and calls each one with
//! arguments made from its input schema, through the same `authorize` and forwarding code.
//!
//! What runs here: this process only; a policy with one remote at URL (loopback allowed), an
//! in-memory audit sink, no signer and no secrets.

use std::rc::Rc;

use serde_json::{Map, Value, json};

use crate::broker::Error;
use crate::broker::audit::MemorySink;
use crate::broker::blocking::BlockingPool;
use crate::broker::federation::{Federation, pins::Pins};
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

struct NoSecrets;

impl SecretSource for NoSecrets {
    fn resolve<'a>(&'a self, r: &'a SecretRef) -> Local<'a, Result<SecretBytes, Error>> {
        Box::pin(async move { Err(Error::Unavailable(format!("secret {r}: none in the federation client"))) })
    }
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
    let text = format!(
        "version: 1\nnetwork: {{ allow: [127.0.0.0/8, '::1/128'] }}\nremotes:\n  conformance: {{ url: {url:?}, pin: off }}\nagents:\n  client: {{ remotes: {{ conformance: {{}} }} }}\n"
    );
    let policy = Policy::parse(&text, "federation client").map_err(|e| format!("{url}: {e}"))?;
    let ex = Rc::new(smol::LocalExecutor::new());
    let federation = Federation::new(ex.clone(), Pins::default());
    let (audit, metrics, pool) = (MemorySink::default(), Metrics::default(), BlockingPool::new(1, 8));
    let approvals = crate::broker::approvals::Approvals::in_memory();
    let ports = Ports {
        audit: &audit,
        metrics: &metrics,
        signer: &NoSigner,
        tasks: &NoTasks,
        secrets: &NoSecrets,
        pool: &pool,
        approvals: &approvals,
        progress: None,
    };
    crate::broker::reactor::block_on(ex.run(async {
        federation.refresh_due(ports, &policy).await;
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
            let facts = match federation.prepare(&policy, &principal, &full, &args) {
                Some(Ok(f)) => f,
                Some(Err(e)) => return Err(format!("{name}: {e}")),
                None => return Err(format!("{name}: not offered")),
            };
            match federation.forward(ports, &policy, &facts, args, None).await {
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
