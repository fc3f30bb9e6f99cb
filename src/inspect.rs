//! Explaining a task token to a person: decoded without any key, reduced to the envelope it
//! carries, with its times in UTC, local time and relative, and — when the caller could check
//! the chain (`ephyr inspect --root-key-file`, or the broker's own task trees in the console) —
//! whether it verifies. Used by `ephyr inspect` and the console's token inspector.
//!
//! What runs here: the caller's thread; `localtime_r` for the local-time display. Pure otherwise.

use std::fmt::Write as _;

use crate::macaroon::{Dim, Macaroon, Reduced, SetKey, envelope::Reducer};
use crate::time::{UnixMicros, format_rfc3339_offset, now};

/// A token, explained.
pub struct Described {
    /// Every fact, for `--json` and tests.
    pub json: serde_json::Value,
    /// The same for a person, one fact per line.
    pub text: String,
    /// The chain failed to verify, or the caveats do not reduce (such a token grants nothing).
    pub bad: bool,
}

/// Explains `m` (whose text form was `text_len` characters). `verified`: the outcome of a chain
/// check, if the caller could make one.
pub fn describe(m: &Macaroon, text_len: usize, verified: Option<Result<(), String>>) -> Described {
    let reduced = unverified(m);
    let t = now();
    let caveats: Vec<String> = m.caveats().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    let mut v = serde_json::json!({
        "valid_format": true,
        "size": { "text": text_len, "binary": m.to_binary().len() },
        "identifier": String::from_utf8_lossy(m.identifier()),
        "location": m.location().map(String::from_utf8_lossy),
        "caveats": caveats,
        "verified": verified.as_ref().map(Result::is_ok),
        "verify_error": verified.as_ref().and_then(|r| r.as_ref().err()),
    });
    match &reduced {
        Ok(r) => {
            v["task"] = serde_json::json!(r.task().map(|t| t.to_string()));
            v["lineage"] = serde_json::json!(r.lineage.iter().map(|l| l.task.to_string()).collect::<Vec<_>>());
            v["envelope"] = r.envelope.to_json();
            v["expires"] = r.envelope.expires_before.map(|e| when(e, t)).unwrap_or(serde_json::Value::Null);
            v["not_before"] = r.envelope.not_before.map(|e| when(e, t)).unwrap_or(serde_json::Value::Null);
            v["time_status"] = serde_json::json!(match r.envelope.check_time(t) {
                Ok(()) => "within its validity window".to_string(),
                Err(e) => e.to_string(),
            });
            v["metadata"] = serde_json::json!({ "agent": r.agent, "initiated_by": r.initiated_by });
        }
        Err(e) => v["reduce_error"] = serde_json::json!(e),
    }
    let text = render(m, &v, &reduced);
    let bad = matches!(verified, Some(Err(_))) || reduced.is_err();
    Described { json: v, text, bad }
}

fn when(t: UnixMicros, now: UnixMicros) -> serde_json::Value {
    let secs = t.secs();
    let delta = (t.0 - now.0) / 1_000_000;
    let rel =
        if delta >= 0 { format!("in {}", human(delta as u64)) } else { format!("{} ago", human((-delta) as u64)) };
    serde_json::json!({
        "utc": t.to_rfc3339(),
        "local": format_rfc3339_offset(secs, crate::os::utc_offset_at(secs)),
        "relative": rel,
    })
}

fn human(s: u64) -> String {
    crate::time::format_duration(std::time::Duration::from_secs(s))
}

fn unverified(m: &Macaroon) -> Result<Reduced, String> {
    let mut r = Reducer::default();
    for c in m.caveats() {
        r.push(c, [0; 32]).map_err(|e| e.to_string())?;
    }
    r.finish(m.identifier(), false).map_err(|e| e.to_string())
}

fn render(m: &Macaroon, v: &serde_json::Value, reduced: &Result<Reduced, String>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "token      {} characters ({} bytes binary), {} caveat(s)",
        v["size"]["text"],
        v["size"]["binary"],
        m.caveat_count()
    );
    let _ = writeln!(out, "identifier {}", String::from_utf8_lossy(m.identifier()));
    if let Some(l) = m.location() {
        let _ = writeln!(out, "location   {} (informational, not signed)", String::from_utf8_lossy(l));
    }
    let sig = match (v["verified"].as_bool(), v["verify_error"].as_str()) {
        (None, _) => "not verified (no key to check it with)".to_string(),
        (Some(true), _) => "VALID".to_string(),
        (Some(false), e) => format!("INVALID: {}", e.unwrap_or("?")),
    };
    let _ = writeln!(out, "signature  {sig}");
    let _ = writeln!(out, "caveats");
    for (i, c) in m.caveats().enumerate() {
        let _ = writeln!(out, "  {i:>2}  {}", String::from_utf8_lossy(c));
    }
    match reduced {
        Err(e) => {
            let _ = writeln!(out, "envelope   cannot be reduced: {e} (such a token grants nothing)");
        }
        Ok(r) => {
            let lineage: Vec<String> = r.lineage.iter().map(|l| l.task.to_string()).collect();
            let _ = writeln!(out, "task       {}", r.task().map(|t| t.to_string()).unwrap_or("(none)".into()));
            if lineage.len() > 1 {
                let _ = writeln!(out, "lineage    {}", lineage.join(" -> "));
            }
            for (label, key) in [("expires", "expires"), ("not before", "not_before")] {
                if let Some(e) = v[key].as_object() {
                    let _ = writeln!(
                        out,
                        "{label:<10} {} UTC | {} local | {}",
                        e["utc"].as_str().unwrap_or(""),
                        e["local"].as_str().unwrap_or(""),
                        e["relative"].as_str().unwrap_or("")
                    );
                }
            }
            let _ = writeln!(out, "time       {}", v["time_status"].as_str().unwrap_or(""));
            let _ = writeln!(out, "envelope   (what the token allows; the agent's policy applies on top)");
            for k in SetKey::ALL {
                let d = match r.envelope.dim(k) {
                    Dim::Unconstrained => "unconstrained by the token".to_string(),
                    Dim::Only(s) if s.is_empty() => "NOTHING (empty intersection)".to_string(),
                    Dim::Only(s) => s.iter().cloned().collect::<Vec<_>>().join(", "),
                };
                let _ = writeln!(out, "  {:<16} {d}", format!("{}s", k.as_str()));
            }
            let _ = writeln!(out, "  {:<16} {}", "can_delegate", r.envelope.can_delegate);
            if let Some(n) = r.envelope.delegation_depth {
                let _ = writeln!(out, "  {:<16} <= {n}", "delegation_depth");
            }
            for (name, rule) in &r.envelope.args {
                let mut parts = Vec::new();
                for p in &rule.prefixes {
                    parts.push(format!("under {}", p.as_str()));
                }
                if let Some(n) = rule.at_most {
                    parts.push(format!("<= {n}"));
                }
                if let Some(n) = rule.at_least {
                    parts.push(format!(">= {n}"));
                }
                if let Some(s) = &rule.one_of {
                    parts.push(format!("one of {}", s.iter().cloned().collect::<Vec<_>>().join(", ")));
                }
                for s in &rule.like {
                    parts.push(format!("like {}", s.iter().cloned().collect::<Vec<_>>().join(" | ")));
                }
                let _ = writeln!(out, "  {:<16} {}", format!("arg.{name}"), parts.join("; "));
            }
            if r.agent.is_some() || r.initiated_by.is_some() {
                let _ = writeln!(
                    out,
                    "metadata   agent={} initiated_by={}",
                    r.agent.as_deref().unwrap_or("-"),
                    r.initiated_by.as_deref().unwrap_or("-")
                );
            }
        }
    }
    out
}
