//! Prometheus metrics, rendered in the text exposition format at `GET /metrics` (dashboard
//! listener).
//!
//! What runs here: counters and histograms kept in the executor thread (no atomics, no locks);
//! `render` also reads `/proc/self/statm` for RSS. Every metric is declared once in [`METRICS`]
//! with its type and help text; recording an undeclared name is a programming error caught by
//! tests.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    /// Monotonic count.
    Counter,
    /// Current value.
    Gauge,
    /// Distribution (seconds).
    Histogram,
}

/// Every metric the broker exports: (name, type, help).
pub const METRICS: &[(&str, Type, &str)] = &[
    ("ephyr_build_info", Type::Gauge, "Build information (always 1)."),
    ("ephyr_uptime_seconds", Type::Gauge, "Seconds since the broker started."),
    ("process_resident_memory_bytes", Type::Gauge, "Resident memory of the broker process."),
    ("ephyr_http_requests_total", Type::Counter, "HTTP requests by listener and status class."),
    ("ephyr_mcp_requests_total", Type::Counter, "MCP JSON-RPC requests by method and outcome."),
    ("ephyr_mcp_request_duration_seconds", Type::Histogram, "MCP request handling time by method."),
    ("ephyr_mcp_sessions", Type::Gauge, "Live session-era MCP sessions."),
    ("ephyr_mcp_streams", Type::Gauge, "Open MCP notification streams."),
    ("ephyr_tool_calls_total", Type::Counter, "MCP tool calls by tool and outcome."),
    ("ephyr_tool_call_duration_seconds", Type::Histogram, "MCP tool call time by tool."),
    ("ephyr_auth_total", Type::Counter, "Authentication attempts by method and outcome."),
    ("ephyr_decisions_total", Type::Counter, "Authorization decisions by decision and code."),
    ("ephyr_tokens_minted_total", Type::Counter, "Task tokens minted."),
    ("ephyr_tokens_verified_total", Type::Counter, "Task tokens verified successfully."),
    ("ephyr_tokens_rejected_total", Type::Counter, "Task tokens rejected, by reason."),
    ("ephyr_tasks_active", Type::Gauge, "Live tasks."),
    ("ephyr_certificates_issued_total", Type::Counter, "SSH certificates issued, by requester kind."),
    ("ephyr_signer_request_duration_seconds", Type::Histogram, "Signer round trip time by request kind."),
    ("ephyr_signer_restarts_total", Type::Counter, "Signer worker restarts."),
    ("ephyr_signer_available", Type::Gauge, "1 if a signer worker is connected."),
    ("ephyr_signer_sandbox_enforced", Type::Gauge, "1 if every signer sandbox layer is enforced."),
    ("ephyr_signer_insecure", Type::Gauge, "1 if the signer runs with --insecure-no-sandbox."),
    ("ephyr_audit_events_total", Type::Counter, "Audit events recorded."),
    ("ephyr_audit_checkpoints_total", Type::Counter, "Signed audit checkpoints written."),
    ("ephyr_audit_failures_total", Type::Counter, "Audit write or sync failures."),
    ("ephyr_audit_available", Type::Gauge, "1 while the audit log can be written."),
    ("ephyr_audit_write_duration_seconds", Type::Histogram, "Time to write and fdatasync one audit batch."),
    ("ephyr_policy_reloads_total", Type::Counter, "Policy reloads by outcome."),
    ("ephyr_proxy_requests_total", Type::Counter, "Proxied HTTP requests by service and status class."),
    ("ephyr_federation_calls_total", Type::Counter, "Federated tool calls by remote and outcome."),
];

/// Histogram bucket bounds, seconds (50 µs .. 10 s).
pub const BUCKETS: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The registry.
#[derive(Default)]
pub struct Metrics {
    values: RefCell<BTreeMap<(&'static str, Labels), f64>>,
    histograms: RefCell<BTreeMap<(&'static str, Labels), Histogram>>,
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

fn declared(name: &str, t: Type) -> bool {
    METRICS.iter().any(|(n, ty, _)| *n == name && *ty == t)
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn fmt_labels(l: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") }
}

impl Metrics {
    /// Adds `by` to a counter.
    pub fn add(&self, name: &'static str, l: &[(&'static str, &str)], by: u64) {
        debug_assert!(declared(name, Type::Counter), "undeclared counter {name}");
        *self.values.borrow_mut().entry((name, labels(l))).or_insert(0.0) += by as f64;
    }

    /// Adds one to a counter.
    pub fn inc(&self, name: &'static str, l: &[(&'static str, &str)]) {
        self.add(name, l, 1);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, l: &[(&'static str, &str)], v: f64) {
        debug_assert!(declared(name, Type::Gauge), "undeclared gauge {name}");
        self.values.borrow_mut().insert((name, labels(l)), v);
    }

    /// Records a duration in seconds.
    pub fn observe(&self, name: &'static str, l: &[(&'static str, &str)], seconds: f64) {
        debug_assert!(declared(name, Type::Histogram), "undeclared histogram {name}");
        let mut hs = self.histograms.borrow_mut();
        let h = hs.entry((name, labels(l))).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// A counter's or gauge's current value (tests, status).
    pub fn get(&self, name: &'static str, l: &[(&'static str, &str)]) -> f64 {
        self.values.borrow().get(&(name, labels(l))).copied().unwrap_or(0.0)
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        let values = self.values.borrow();
        let hs = self.histograms.borrow();
        let mut out = String::with_capacity(8192);
        for (name, ty, help) in METRICS {
            let samples: Vec<_> = values.iter().filter(|((n, _), _)| n == name).collect();
            let hists: Vec<_> = hs.iter().filter(|((n, _), _)| n == name).collect();
            if samples.is_empty() && hists.is_empty() {
                continue;
            }
            let t = match ty {
                Type::Counter => "counter",
                Type::Gauge => "gauge",
                Type::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {t}");
            for ((_, l), v) in samples {
                let _ = writeln!(out, "{name}{} {}", fmt_labels(l, None), num(*v));
            }
            for ((_, l), h) in hists {
                for (i, b) in BUCKETS.iter().enumerate() {
                    let _ =
                        writeln!(out, "{name}_bucket{} {}", fmt_labels(l, Some(("le", format!("{b}")))), h.counts[i]);
                }
                let _ = writeln!(out, "{name}_bucket{} {}", fmt_labels(l, Some(("le", "+Inf".into()))), h.count);
                let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(l, None), h.sum);
                let _ = writeln!(out, "{name}_count{} {}", fmt_labels(l, None), h.count);
            }
        }
        out
    }
}

/// The broker's resident memory, bytes (from `/proc/self/statm`).
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.inc("ephyr_decisions_total", &[("decision", "deny"), ("code", "policy_denies_role")]);
        m.add("ephyr_decisions_total", &[("decision", "allow"), ("code", "")], 2);
        m.set("ephyr_signer_available", &[], 1.0);
        m.observe("ephyr_signer_request_duration_seconds", &[("kind", "sign")], 0.00007);
        m.observe("ephyr_signer_request_duration_seconds", &[("kind", "sign")], 3.0);
        let text = m.render();
        assert!(text.contains("# TYPE ephyr_decisions_total counter\n"), "{text}");
        assert!(text.contains("ephyr_decisions_total{decision=\"deny\",code=\"policy_denies_role\"} 1\n"));
        assert!(text.contains("ephyr_signer_available 1\n"));
        assert!(
            text.contains("ephyr_signer_request_duration_seconds_bucket{kind=\"sign\",le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("ephyr_signer_request_duration_seconds_bucket{kind=\"sign\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("ephyr_signer_request_duration_seconds_count{kind=\"sign\"} 2\n"));
        assert!(!text.contains("ephyr_tasks_active"), "metrics without samples are omitted");
        assert_eq!(m.get("ephyr_decisions_total", &[("decision", "allow"), ("code", "")]), 2.0);
        assert!(METRICS.iter().all(|(n, _, _)| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
