//! Prometheus metrics, rendered in the text exposition format at `GET /metrics` (dashboard
//! listener).
//!
//! What runs here: counters and histograms kept in the executor thread (no atomics, no locks);
//! `render` also reads `/proc/self/statm` for RSS. Every metric is declared once in [`METRICS`]
//! with its type and help text; recording an undeclared name is a programming error caught by
//! tests.

use std::cell::RefCell;
use std::collections::HashMap;
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
    ("ephyr_connections_open", Type::Gauge, "Open TCP connections on the MCP/API and dashboard listeners."),
    (
        "ephyr_connections_refused_total",
        Type::Counter,
        "TCP connections refused at accept, by reason (per-source or global caps).",
    ),
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
    ("ephyr_tasks_total", Type::Counter, "Task operations by op (create, delegate, handoff, bind, revoke)."),
    ("ephyr_pop_total", Type::Counter, "Proof-of-possession checks by form and outcome."),
    ("ephyr_certificates_issued_total", Type::Counter, "SSH certificates issued, by requester kind."),
    ("ephyr_certificates_refused_total", Type::Counter, "SSH certificates the signer refused or failed to issue."),
    ("ephyr_ssh_connects_total", Type::Counter, "SSH connections by outcome (ok or the error code)."),
    ("ephyr_ssh_recordings_total", Type::Counter, "SSH command recordings written, by outcome (ok, error)."),
    (
        "ephyr_ssh_files_total",
        Type::Counter,
        "File tool operations (SFTP), by op (file_read, file_write, file_list) and outcome (ok, failed).",
    ),
    ("ephyr_ssh_commands_total", Type::Counter, "SSH commands by how they ended."),
    ("ephyr_ssh_sessions", Type::Gauge, "Open SSH sessions."),
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
    ("ephyr_freezes_total", Type::Counter, "Freezes (the kill switch) by kind."),
    ("ephyr_agent_transitions_total", Type::Counter, "Agent lifecycle transitions by the state reached."),
    ("ephyr_agent_enrollments_total", Type::Counter, "Agents enrolled (join tokens issued)."),
    ("ephyr_agent_joins_total", Type::Counter, "Join token exchanges by outcome."),
    ("ephyr_oauth_requests_total", Type::Counter, "OAuth authorization server requests by endpoint and outcome."),
    ("ephyr_reaper_pending", Type::Gauge, "Lifecycle steps the agent reaper would take (0 after it applied them)."),
    ("ephyr_approval_notifications_total", Type::Counter, "Approval notifications (webhook, ntfy) by outcome."),
    ("ephyr_approvals_pending", Type::Gauge, "Approval requests waiting for an operator."),
    (
        "ephyr_approvals_total",
        Type::Counter,
        "Approval requests by outcome (requested, approved, partly, denied, expired, used, waived).",
    ),
    (
        "ephyr_approval_decision_seconds_total",
        Type::Counter,
        "Seconds from request to decision, summed over decisions (divide by approved + denied).",
    ),
    ("ephyr_console_logins_total", Type::Counter, "Console sign-ins by outcome."),
    ("ephyr_console_sessions", Type::Gauge, "Signed-in console sessions."),
    ("ephyr_proxy_requests_total", Type::Counter, "Proxied HTTP requests by service and status class."),
    ("ephyr_federation_calls_total", Type::Counter, "Federated tool calls by remote and outcome."),
    ("ephyr_federation_call_duration_seconds", Type::Histogram, "Federated tool call time by remote."),
    ("ephyr_remote_state", Type::Gauge, "1 for each remote's state (connected, degraded, quarantined, down, unknown)."),
    ("ephyr_remote_tools", Type::Gauge, "Tools a remote serves through the broker."),
    ("ephyr_remote_quarantined_tools", Type::Gauge, "Tools of a remote quarantined until an operator approves them."),
    ("ephyr_remote_starts_total", Type::Counter, "Starts of a stdio remote's process."),
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

impl Histogram {
    fn record(&mut self, seconds: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// One time series: a metric name and its label values.
#[derive(Debug)]
struct Series {
    name: &'static str,
    labels: Labels,
    value: f64,
    hist: Histogram,
}

/// The registry. Updating an existing series allocates nothing: series are found by a hash of
/// the borrowed name and labels (the hot path runs several updates per request).
#[derive(Default)]
pub struct Metrics {
    series: RefCell<Vec<Series>>,
    index: RefCell<HashMap<u64, Vec<usize>>>,
}

/// A label value that varies at run time: a name the policy defines. Only the constructors here
/// make one, and they borrow the policy's own string, so request input cannot become a label
/// value (DESIGN.md invariant 14: a series per made-up service name would grow without bound);
/// a name the policy does not define is counted as [`UNKNOWN`]. Every other label value is a
/// `&'static str` of the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyName<'a>(&'a str);

/// The label value for a name the policy does not define.
pub const UNKNOWN: &str = "(unknown)";

impl<'a> PolicyName<'a> {
    /// The policy's service `name`, or [`UNKNOWN`].
    pub fn service(policy: &'a super::policy::Policy, name: &str) -> PolicyName<'a> {
        PolicyName(policy.services.get_key_value(name).map_or(UNKNOWN, |(k, _)| k.as_str()))
    }

    /// The policy's remote `name`, or [`UNKNOWN`].
    pub fn remote(policy: &'a super::policy::Policy, name: &str) -> PolicyName<'a> {
        PolicyName(policy.remotes.get_key_value(name).map_or(UNKNOWN, |(k, _)| k.as_str()))
    }

    /// The value.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

/// FNV-1a over the name and labels. Names and label values come from fixed sets in the code
/// (methods, tools, codes) or from the policy ([`PolicyName`]), never from request input, so a
/// fast non-keyed hash is safe here.
fn key_hash(name: &str, l: &[(&'static str, &str)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(name.as_bytes());
    for (k, v) in l {
        eat(k.as_bytes());
        eat(v.as_bytes());
    }
    h
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

fn same(s: &Series, name: &str, l: &[(&'static str, &str)]) -> bool {
    s.name == name
        && s.labels.len() == l.len()
        && s.labels.iter().zip(l).all(|((k1, v1), (k2, v2))| k1 == k2 && v1 == v2)
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
    /// Runs `f` on the series `name{l}`, creating it on first use.
    fn with<R>(&self, name: &'static str, l: &[(&'static str, &str)], f: impl FnOnce(&mut Series) -> R) -> R {
        let h = key_hash(name, l);
        let mut series = self.series.borrow_mut();
        let mut index = self.index.borrow_mut();
        let slot = index.entry(h).or_default();
        let i = match slot.iter().copied().find(|&i| same(&series[i], name, l)) {
            Some(i) => i,
            None => {
                series.push(Series { name, labels: labels(l), value: 0.0, hist: Histogram::default() });
                slot.push(series.len() - 1);
                series.len() - 1
            }
        };
        f(&mut series[i])
    }

    /// Adds `by` to a counter.
    pub fn add(&self, name: &'static str, l: &[(&'static str, &'static str)], by: u64) {
        debug_assert!(declared(name, Type::Counter), "undeclared counter {name}");
        self.with(name, l, |s| s.value += by as f64);
    }

    /// Adds one to a counter.
    pub fn inc(&self, name: &'static str, l: &[(&'static str, &'static str)]) {
        self.add(name, l, 1);
    }

    /// Adds one to a counter with one label value from the policy (first) and fixed ones.
    pub fn inc_named(
        &self,
        name: &'static str,
        named: (&'static str, PolicyName<'_>),
        l: &[(&'static str, &'static str)],
    ) {
        debug_assert!(declared(name, Type::Counter), "undeclared counter {name}");
        debug_assert!(l.len() < 4, "at most 3 fixed labels");
        let mut all: [(&'static str, &str); 4] = [("", ""); 4];
        all[0] = (named.0, named.1.as_str());
        for (slot, kv) in all[1..].iter_mut().zip(l) {
            *slot = *kv;
        }
        self.with(name, &all[..=l.len().min(3)], |s| s.value += 1.0);
    }

    /// Sets a gauge with one label value from the policy (first) and fixed ones.
    pub fn set_named(
        &self,
        name: &'static str,
        named: (&'static str, PolicyName<'_>),
        l: &[(&'static str, &'static str)],
        v: f64,
    ) {
        debug_assert!(declared(name, Type::Gauge), "undeclared gauge {name}");
        let mut all: [(&'static str, &str); 4] = [("", ""); 4];
        all[0] = (named.0, named.1.as_str());
        for (slot, kv) in all[1..].iter_mut().zip(l) {
            *slot = *kv;
        }
        self.with(name, &all[..=l.len().min(3)], |s| s.value = v);
    }

    /// Records a duration in seconds in a histogram with one label value from the policy.
    pub fn observe_named(&self, name: &'static str, named: (&'static str, PolicyName<'_>), seconds: f64) {
        debug_assert!(declared(name, Type::Histogram), "undeclared histogram {name}");
        self.with(name, &[(named.0, named.1.as_str())], |s| s.hist.record(seconds));
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, l: &[(&'static str, &'static str)], v: f64) {
        debug_assert!(declared(name, Type::Gauge), "undeclared gauge {name}");
        self.with(name, l, |s| s.value = v);
    }

    /// Records a duration in seconds.
    pub fn observe(&self, name: &'static str, l: &[(&'static str, &'static str)], seconds: f64) {
        debug_assert!(declared(name, Type::Histogram), "undeclared histogram {name}");
        self.with(name, l, |s| s.hist.record(seconds));
    }

    /// A counter's or gauge's current value (tests, status).
    pub fn get(&self, name: &'static str, l: &[(&'static str, &str)]) -> f64 {
        let h = key_hash(name, l);
        let series = self.series.borrow();
        let index = self.index.borrow();
        index
            .get(&h)
            .and_then(|slot| slot.iter().find(|&&i| same(&series[i], name, l)))
            .map_or(0.0, |&i| series[i].value)
    }

    /// The sum of every series of a counter or gauge whose labels include all of `l`.
    pub fn sum(&self, name: &'static str, l: &[(&'static str, &str)]) -> f64 {
        self.series
            .borrow()
            .iter()
            .filter(|s| s.name == name && l.iter().all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v)))
            .map(|s| s.value)
            .sum::<f64>()
            + 0.0 // an empty sum is -0.0
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        let series = self.series.borrow();
        let mut out = String::with_capacity(8192);
        for (name, ty, help) in METRICS {
            let mut mine: Vec<&Series> = series.iter().filter(|s| s.name == *name).collect();
            if mine.is_empty() {
                continue;
            }
            mine.sort_by(|a, b| a.labels.cmp(&b.labels));
            let t = match ty {
                Type::Counter => "counter",
                Type::Gauge => "gauge",
                Type::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {t}");
            for s in mine {
                let l = &s.labels;
                if *ty != Type::Histogram {
                    let _ = writeln!(out, "{name}{} {}", fmt_labels(l, None), num(s.value));
                    continue;
                }
                let h = &s.hist;
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
