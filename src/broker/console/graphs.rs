//! The console's sparklines: a few of the broker's own counters and gauges, sampled every
//! [`EVERY`] into a fixed ring of [`KEEP`] samples (15 minutes), so a metrics page has history
//! the moment it opens. Counters are shown as the change per interval, gauges as they are.
//!
//! What runs here: one task on the executor ([`run`]), a handful of reads per sample; memory is
//! fixed (`KEEP` × series × 8 bytes).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Weak;
use std::time::Duration;

use crate::broker::Broker;

/// Sampling interval.
pub const EVERY: Duration = Duration::from_secs(10);
/// Samples kept.
pub const KEEP: usize = 90;

/// The series: (key, label, is a counter).
pub const SERIES: [(&str, &str, bool); 6] = [
    ("requests", "HTTP requests", true),
    ("tool_calls", "Tool calls", true),
    ("denials", "Denied decisions", true),
    ("audit", "Audit events", true),
    ("tasks", "Live tasks", false),
    ("rss_mib", "Broker memory (MiB)", false),
];

/// The ring of samples (one row of [`SERIES`] values each) and their Unix times.
#[derive(Default)]
pub struct Samples {
    rows: RefCell<VecDeque<(i64, [f64; SERIES.len()])>>,
}

impl Samples {
    /// Takes one sample now.
    pub fn sample(&self, broker: &Broker) {
        let m = &broker.metrics;
        let row = [
            m.sum("ephyr_http_requests_total", &[]),
            m.sum("ephyr_tool_calls_total", &[]),
            m.sum("ephyr_decisions_total", &[("decision", "deny")]),
            m.sum("ephyr_audit_events_total", &[]),
            broker.tasks.len() as f64,
            crate::broker::metrics::rss_bytes().map_or(0.0, |b| (b as f64 / 1048576.0 * 10.0).round() / 10.0),
        ];
        let mut rows = self.rows.borrow_mut();
        if rows.len() >= KEEP {
            rows.pop_front();
        }
        rows.push_back((crate::time::now().secs(), row));
    }

    /// Every series as points to draw: counters as per-interval changes, gauges as values.
    pub fn json(&self) -> serde_json::Value {
        let rows = self.rows.borrow();
        let series: Vec<serde_json::Value> = SERIES
            .iter()
            .enumerate()
            .map(|(i, (key, label, counter))| {
                let points: Vec<f64> = if *counter {
                    rows.iter().zip(rows.iter().skip(1)).map(|(a, b)| (b.1[i] - a.1[i]).max(0.0)).collect()
                } else {
                    rows.iter().map(|r| r.1[i]).collect()
                };
                serde_json::json!({ "key": key, "label": label, "counter": counter, "points": points })
            })
            .collect();
        serde_json::json!({ "every_secs": EVERY.as_secs(), "series": series, "last": rows.back().map(|r| r.0) })
    }
}

/// Samples every [`EVERY`] until the broker is gone.
pub async fn run(broker: Weak<Broker>) {
    loop {
        match broker.upgrade() {
            Some(b) => b.console.graphs.sample(&b),
            None => return,
        }
        crate::broker::deadline::Deadline::after(EVERY).await;
    }
}
