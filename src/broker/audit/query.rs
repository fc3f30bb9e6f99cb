//! `ephyr audit query`: select events from the log files.
//!
//! `--task ULID` selects the whole task tree the task belongs to (every event whose `root` is the
//! tree's root, in log order), `--agent`, `--since`, `--until`, `--decision allow|deny`,
//! `--kind`, `--event` narrow further.

use serde_json::Value;

use crate::time::UnixMicros;

/// Selection criteria (all optional, all must hold).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// A task: its whole tree is selected.
    pub task: Option<String>,
    /// Agent name.
    pub agent: Option<String>,
    /// From this instant on.
    pub since: Option<UnixMicros>,
    /// Before this instant.
    pub until: Option<UnixMicros>,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    /// Event kind.
    pub kind: Option<String>,
    /// Event name.
    pub event: Option<String>,
}

/// Parses every complete line of every file (damaged lines are skipped: `audit verify` reports them).
pub fn parse_all(files: &[(String, Vec<u8>)]) -> Vec<Value> {
    files
        .iter()
        .flat_map(|(_, bytes)| {
            bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        })
        .collect()
}

/// Applies the filter.
pub fn select(events: &[Value], f: &Filter) -> Vec<Value> {
    // The tree root of the task, found from any event naming it.
    let root = f.task.as_ref().map(|t| {
        events
            .iter()
            .find(|e| e["task"].as_str() == Some(t) || e["root"].as_str() == Some(t))
            .and_then(|e| e["root"].as_str().map(str::to_owned))
            .unwrap_or_else(|| t.clone())
    });
    events
        .iter()
        .filter(|e| root.as_ref().is_none_or(|r| e["root"].as_str() == Some(r) || e["task"].as_str() == Some(r)))
        .filter(|e| f.agent.as_ref().is_none_or(|a| e["agent"].as_str() == Some(a)))
        .filter(|e| f.since.is_none_or(|s| e["ts"].as_i64().is_some_and(|t| t >= s.0)))
        .filter(|e| f.until.is_none_or(|s| e["ts"].as_i64().is_some_and(|t| t < s.0)))
        .filter(|e| f.decision.as_ref().is_none_or(|d| e["decision"].as_str() == Some(d)))
        .filter(|e| f.kind.as_ref().is_none_or(|k| e["kind"].as_str() == Some(k)))
        .filter(|e| f.event.as_ref().is_none_or(|k| e["event"].as_str() == Some(k)))
        .cloned()
        .collect()
}
