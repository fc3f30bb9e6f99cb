//! `ephyr recording list|show|play`: the SSH command recordings in `<data-dir>/recordings/`, each
//! checked against the SHA-256 its audit line (`ssh_recording`) carries before it is shown.
//!
//! Reads files only (as root or the broker's user); no broker needs to run.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::broker::audit;
use crate::broker::ssh::recording;

/// Options.
#[derive(Debug, Default)]
pub struct Options {
    /// `list`, `show` or `play`.
    pub sub: String,
    /// The recording (show, play).
    pub id: Option<String>,
    /// JSON output (list, show).
    pub json: bool,
    /// Playback speed (play); 1 = as recorded.
    pub speed: f64,
    /// Longest pause shown (play), seconds.
    pub max_pause: f64,
}

/// What the audit log says about each recording: its `ssh_recording` event, by recording id.
fn audited(data_dir: &Path) -> Result<HashMap<String, Value>, String> {
    let dir = data_dir.join("audit");
    let files = audit::log_files(&dir)
        .map_err(|e| format!("{}: {e}  (the audit log is readable by root and the broker's user)", dir.display()))?;
    let events = audit::query::parse_all(&super::audit::read_files(&files)?);
    Ok(events
        .into_iter()
        .filter(|e| e["event"] == "ssh_recording")
        .filter_map(|e| e["outcome"]["recording"].as_str().map(str::to_owned).map(|id| (id, e)))
        .collect())
}

/// Checks a recording's bytes against its audit line. `Err` says what is wrong.
fn check(id: &str, bytes: &[u8], line: Option<&Value>) -> Result<(), String> {
    let Some(line) = line else {
        return Err(format!(
            "recording {id} has no audit line (ssh_recording): it was not written by this broker, or its line was removed"
        ));
    };
    let want = line["outcome"]["sha256"].as_str().unwrap_or("");
    let got = recording::digest(bytes);
    if want != got {
        return Err(format!(
            "recording {id} was changed after it was written: its SHA-256 is {got}, the audit line (seq {}) says {want}",
            line["seq"]
        ));
    }
    Ok(())
}

/// Runs the command. Exit 0 ok, 1 a recording does not match its audit line.
pub fn run(data_dir: &Path, o: &Options) -> Result<i32, String> {
    let dir = data_dir.join("recordings");
    let lines = audited(data_dir)?;
    match o.sub.as_str() {
        "list" => {
            let ids = recording::list(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let mut bad = 0;
            let mut rows = Vec::new();
            for id in &ids {
                let bytes = recording::load(&dir, id)?;
                let line = lines.get(id);
                let status = match check(id, &bytes, line) {
                    Ok(()) => "ok",
                    Err(_) if line.is_none() => "unaudited",
                    Err(_) => "TAMPERED",
                };
                bad += usize::from(status != "ok");
                let (e, a) = (line.cloned().unwrap_or(Value::Null), line.map(|l| &l["action"]));
                rows.push(json!({
                    "id": id, "ts": e["ts"], "agent": e["agent"], "task": e["task"],
                    "target": a.map(|a| &a["target"]), "role": a.map(|a| &a["role"]), "session": a.map(|a| &a["session"]),
                    "command": a.map(|a| &a["command"]), "exit_code": e["outcome"]["exit_code"],
                    "bytes": bytes.len(), "status": status,
                }));
            }
            if o.json {
                println!("{}", Value::Array(rows));
            } else {
                for r in &rows {
                    let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
                    println!(
                        "{}  {:<9} {:<20} {:<10} {}/{}  exit={}  {}",
                        s("id"),
                        s("status"),
                        s("ts"),
                        s("agent"),
                        s("target"),
                        s("role"),
                        r["exit_code"],
                        s("command")
                    );
                }
                eprintln!("{} recording(s) in {}", rows.len(), dir.display());
            }
            Ok(if bad > 0 { 1 } else { 0 })
        }
        "show" | "play" => {
            let id = o.id.as_deref().ok_or("which recording? (ephyr recording list)")?;
            let bytes = recording::load(&dir, id)?;
            if let Err(e) = check(id, &bytes, lines.get(id)) {
                eprintln!("ephyr: {e}");
                return Ok(1);
            }
            let (header, events) = recording::events(&bytes)?;
            let line = &lines[id];
            if o.sub == "show" && o.json {
                println!("{}", json!({ "id": id, "header": header, "audit": line, "events": events }));
                return Ok(0);
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "# {} — {} at {} (seq {}, sha256 verified)\n# $ {}",
                id,
                header["title"].as_str().unwrap_or(""),
                line["ts"].as_str().unwrap_or(""),
                line["seq"],
                header["command"].as_str().unwrap_or("")
            );
            let mut at = 0.0f64;
            for (t, kind, text) in &events {
                if o.sub == "play" {
                    let pause = ((t - at) / o.speed.max(0.01)).clamp(0.0, o.max_pause);
                    let _ = out.flush();
                    std::thread::sleep(Duration::from_secs_f64(pause));
                    at = *t;
                }
                match kind.as_str() {
                    "o" => {
                        let _ = out.write_all(text.as_bytes());
                    }
                    "m" => {
                        let _ = writeln!(out, "\n# [{text}]");
                    }
                    // Keystrokes sent to a terminal session: shown by `show`, not replayed.
                    "i" if o.sub == "show" => {
                        let _ = writeln!(out, "# [input {}]", serde_json::Value::from(text.as_str()));
                    }
                    _ => {}
                }
            }
            let _ = out.flush();
            Ok(0)
        }
        other => Err(format!("unknown recording command {other:?} (list, show, play)")),
    }
}
