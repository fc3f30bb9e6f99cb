//! `ephyr audit query` and `ephyr monitor`: select events from the log files, say in one line
//! what each did, and follow the log as it grows (across rotation).
//!
//! `--task ULID` selects the whole task tree the task belongs to (every event whose `root` is the
//! tree's root, in log order); `--subtree ULID` only the task and its descendants (events whose
//! `lineage` names it); `--agent`, `--since`, `--until`, `--decision allow|deny|error`, `--kind`,
//! `--event`, `--target` narrow further. Events keep their raw bytes, so `--json` prints the log's
//! own lines, byte for byte.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::time::UnixMicros;

/// Selection criteria (all optional, all must hold).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// A task: its whole tree is selected.
    pub task: Option<String>,
    /// A task: it and its descendants.
    pub subtree: Option<String>,
    /// Agent name.
    pub agent: Option<String>,
    /// From this instant on.
    pub since: Option<UnixMicros>,
    /// Before this instant.
    pub until: Option<UnixMicros>,
    /// `allow`, `deny`, or `error` (an event with an error code and no decision).
    pub decision: Option<String>,
    /// Event kind.
    pub kind: Option<String>,
    /// Event name.
    pub event: Option<String>,
    /// SSH target (the action's `target`).
    pub target: Option<String>,
}

/// One line of the log: its bytes (without the newline) and its parsed form.
#[derive(Clone, Debug)]
pub struct Line {
    /// The line as written.
    pub raw: Vec<u8>,
    /// Parsed.
    pub event: Value,
}

/// Splits complete lines; damaged lines are skipped (`audit verify` reports them).
fn lines_of(bytes: &[u8]) -> impl Iterator<Item = Line> + '_ {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok().map(|event| Line { raw: l.to_vec(), event }))
}

/// Parses every complete line of every file.
pub fn parse_lines(files: &[(String, Vec<u8>)]) -> Vec<Line> {
    files.iter().flat_map(|(_, bytes)| lines_of(bytes).collect::<Vec<_>>()).collect()
}

/// Parses every complete line of every file (the events only).
pub fn parse_all(files: &[(String, Vec<u8>)]) -> Vec<Value> {
    parse_lines(files).into_iter().map(|l| l.event).collect()
}

/// The tree root of `task`, from any event that names it.
fn tree_root<'a>(events: impl Iterator<Item = &'a Value>, task: &str) -> Option<String> {
    events
        .filter(|e| e["task"].as_str() == Some(task) || e["root"].as_str() == Some(task))
        .find_map(|e| e["root"].as_str().map(str::to_owned))
}

impl Filter {
    /// Whether `e` matches; `root` is the `--task` tree's root (see [`Filter::root`]).
    pub fn matches(&self, e: &Value, root: Option<&str>) -> bool {
        let s = |k: &str| e[k].as_str();
        let decision = s("decision").or_else(|| s("code").map(|_| "error"));
        root.is_none_or(|r| s("root") == Some(r) || s("task") == Some(r))
            && self.subtree.as_deref().is_none_or(|t| {
                s("task") == Some(t) || e["lineage"].as_array().is_some_and(|l| l.iter().any(|x| x == t))
            })
            && self.agent.as_deref().is_none_or(|a| s("agent") == Some(a))
            && self.since.is_none_or(|t| e["ts"].as_i64().is_some_and(|x| x >= t.0))
            && self.until.is_none_or(|t| e["ts"].as_i64().is_some_and(|x| x < t.0))
            && self.decision.as_deref().is_none_or(|d| decision == Some(d))
            && self.kind.as_deref().is_none_or(|k| s("kind") == Some(k))
            && self.event.as_deref().is_none_or(|k| s("event") == Some(k))
            && self.target.as_deref().is_none_or(|t| e["action"]["target"].as_str() == Some(t))
    }

    /// The root of the `--task` tree as far as `events` tell (the task itself when none does).
    pub fn root<'a>(&self, events: impl Iterator<Item = &'a Value>) -> Option<String> {
        self.task.as_ref().map(|t| tree_root(events, t).unwrap_or_else(|| t.clone()))
    }
}

/// Applies the filter.
pub fn select(events: &[Value], f: &Filter) -> Vec<Value> {
    let root = f.root(events.iter());
    events.iter().filter(|e| f.matches(e, root.as_deref())).cloned().collect()
}

/// Applies the filter to lines.
pub fn select_lines(lines: &[Line], f: &Filter) -> Vec<Line> {
    let root = f.root(lines.iter().map(|l| &l.event));
    lines.iter().filter(|l| f.matches(&l.event, root.as_deref())).cloned().collect()
}

/// Keys of an action, in the order a person reads them.
const ACTION_KEYS: [&str; 13] = [
    "tool",
    "target",
    "role",
    "command",
    "session",
    "service",
    "method",
    "path",
    "host",
    "remote",
    "task_id",
    "by_task",
    "principal",
];

/// What an event did, in one line: `tool=exec target=web role=read command="uptime"`, then the
/// outcome's key facts (exit code, status, cascade, a certificate serial in hex and decimal, as
/// OpenSSH prints it).
pub fn summary(e: &Value) -> String {
    let mut parts = Vec::new();
    let (a, o) = (&e["action"], &e["outcome"]);
    for k in ACTION_KEYS {
        match &a[k] {
            Value::Null => {}
            Value::String(v) if k == "command" || k == "path" => parts.push(format!("{k}={v:?}")),
            Value::String(v) => parts.push(format!("{k}={v}")),
            other => parts.push(format!("{k}={other}")),
        }
    }
    for k in ["exit_code", "status", "cascade_count", "reason"] {
        if !o[k].is_null() {
            parts.push(format!("{k}={}", o[k].as_str().map_or_else(|| o[k].to_string(), str::to_owned)));
        }
    }
    if let Some(hex) = o["serial"].as_str().or_else(|| a["serial"].as_str()) {
        match u64::from_str_radix(hex, 16) {
            Ok(n) => parts.push(format!("serial={hex} ({n})")),
            Err(_) => parts.push(format!("serial={hex}")),
        }
    }
    parts.join(" ")
}

/// Follows a log directory's active file (`audit.jsonl`) as it grows: complete new lines, in
/// order. When the broker rotates (the file is renamed and a new one begins), the rest of the
/// old file is read through the open handle before the new file is opened, so nothing is missed.
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    inode: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Starts at the current end of `dir/audit.jsonl` (what is there already was read with
    /// [`parse_lines`]).
    pub fn at_end(dir: &Path) -> Follower {
        let path = dir.join(super::ACTIVE);
        let mut f = Follower { path, file: None, inode: 0, partial: Vec::new() };
        if let Ok(mut file) = File::open(&f.path) {
            let _ = file.seek(SeekFrom::End(0));
            f.inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
            f.file = Some(file);
        }
        f
    }

    /// Lines written since the last call (possibly none).
    pub fn poll(&mut self) -> Vec<Line> {
        let mut bytes = Vec::new();
        if let Some(file) = &mut self.file {
            let _ = file.read_to_end(&mut bytes);
        }
        // Rotated (or created): finish the old handle above, then start the new file.
        let current = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
        if current.is_some()
            && current != Some(self.inode)
            && let Ok(mut file) = File::open(&self.path)
        {
            let _ = file.read_to_end(&mut bytes);
            self.inode = current.unwrap_or(0);
            self.file = Some(file);
        }
        if bytes.is_empty() {
            return Vec::new();
        }
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else { return Vec::new() };
        let rest = self.partial.split_off(end + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        lines_of(&complete).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_summary_says_what_was_done() {
        let e = json!({"action": {"tool": "exec", "target": "web", "role": "read", "command": "uptime -p"},
                       "outcome": {"exit_code": 0, "serial": "00000000000000ff"}});
        assert_eq!(
            summary(&e),
            "tool=exec target=web role=read command=\"uptime -p\" exit_code=0 serial=00000000000000ff (255)"
        );
        let h =
            json!({"action": {"service": "openai", "method": "POST", "path": "/v1/chat"}, "outcome": {"status": 200}});
        assert_eq!(summary(&h), "service=openai method=POST path=\"/v1/chat\" status=200");
        assert_eq!(summary(&json!({})), "");
    }

    #[test]
    fn filters_for_subtree_target_and_errors() {
        let events = [
            json!({"task": "A", "root": "A", "lineage": ["A"], "decision": "allow", "action": {"target": "web"}}),
            json!({"task": "B", "root": "A", "lineage": ["A", "B"], "decision": "deny"}),
            json!({"task": "C", "root": "A", "lineage": ["A", "B", "C"], "code": "upstream_failed"}),
            json!({"task": "D", "root": "A", "lineage": ["A", "D"]}),
        ];
        let n = |f: Filter| select(&events, &f).len();
        assert_eq!(n(Filter { task: Some("C".into()), ..Default::default() }), 4, "--task: the whole tree");
        assert_eq!(n(Filter { subtree: Some("B".into()), ..Default::default() }), 2, "--subtree: B and C");
        assert_eq!(n(Filter { target: Some("web".into()), ..Default::default() }), 1);
        assert_eq!(n(Filter { decision: Some("error".into()), ..Default::default() }), 1);
    }

    #[test]
    fn the_follower_reads_across_a_rotation_without_losing_a_line() {
        let dir = std::env::temp_dir().join(format!("ephyr-follow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let active = dir.join(super::super::ACTIVE);
        let line = |n: u32| format!("{{\"seq\":{n}}}\n");
        std::fs::write(&active, line(1)).unwrap();
        let mut f = Follower::at_end(&dir);
        assert!(f.poll().is_empty(), "starts at the end");
        use std::io::Write as _;
        let mut w = std::fs::OpenOptions::new().append(true).open(&active).unwrap();
        w.write_all(line(2).as_bytes()).unwrap();
        w.write_all(b"{\"seq\":").unwrap();
        let got: Vec<_> = f.poll().iter().map(|l| l.event["seq"].clone()).collect();
        assert_eq!(got, [json!(2)], "a partial line waits");
        w.write_all(b"3}\n").unwrap();
        // Rotation: the active file is renamed, more is written to the old handle's file first,
        // then a new active file begins.
        std::fs::rename(&active, dir.join("audit-1.jsonl")).unwrap();
        w.write_all(line(4).as_bytes()).unwrap();
        std::fs::write(&active, line(5)).unwrap();
        let got: Vec<_> = f.poll().iter().map(|l| l.event["seq"].clone()).collect();
        assert_eq!(got, [json!(3), json!(4), json!(5)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
