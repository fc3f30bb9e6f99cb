//! `ephyr audit verify`, `ephyr audit query` and `ephyr monitor`.
//!
//! What runs here: reads the audit files (root or the broker's user can), `keys/audit_checkpoint.pub`
//! and `audit/HEAD`; asks a running broker (local socket) for its live chain head and checkpoint
//! key when one answers.

use std::path::{Path, PathBuf};

use crate::broker::audit::{self, query, verify};

/// Options of `audit verify`.
#[derive(Debug, Default)]
pub struct VerifyOptions {
    /// Explicit files, in chain order (default: every file in `<data-dir>/audit`).
    pub files: Vec<PathBuf>,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Trusted checkpoint key: base64, or a file holding it.
    pub public_key: Option<String>,
    /// Local socket of a running broker.
    pub socket: PathBuf,
    /// JSON output.
    pub json: bool,
}

pub(crate) fn read_files(paths: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>, String> {
    paths
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| (p.file_name().map_or(p.display().to_string(), |n| n.to_string_lossy().into_owned()), b))
                .map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect()
}

fn decode_key(s: &str) -> Result<Vec<u8>, String> {
    let k = data_encoding::BASE64
        .decode(s.trim().as_bytes())
        .map_err(|_| "the checkpoint public key is not base64".to_string())?;
    if k.len() != 32 { Err("the checkpoint public key must be 32 bytes (Ed25519)".into()) } else { Ok(k) }
}

/// Runs `audit verify`; exit 0 verified, 1 tampering or damage found, 3 nothing to verify against.
pub fn verify_cmd(o: &VerifyOptions) -> Result<i32, String> {
    let dir = o.data_dir.join("audit");
    // The running broker's head first, the files after: what it vouches for is on disk by then
    // (asked the other way round, lines written in between would look like a truncation).
    let live = super::client::request(&o.socket, http::Method::GET, "/v1/status", None)
        .ok()
        .filter(|(c, _)| c.is_success())
        .map(|(_, v)| v);
    let paths = if o.files.is_empty() {
        audit::log_files(&dir).map_err(|e| format!("{}: {e}", dir.display()))?
    } else {
        o.files.clone()
    };
    if paths.is_empty() {
        return Err(format!("no audit files in {}", dir.display()));
    }
    let files = read_files(&paths)?;
    let (key, key_source) = if let Some(k) = &o.public_key {
        let text = if Path::new(k).exists() {
            std::fs::read_to_string(k).map_err(|e| format!("{k}: {e}"))?
        } else {
            k.clone()
        };
        (Some(decode_key(&text)?), "--public-key".to_string())
    } else if let Ok(text) =
        std::fs::read_to_string(crate::signer::protocol::KeyPaths::new(&o.data_dir).checkpoint_pub())
    {
        (Some(decode_key(&text)?), "keys/audit_checkpoint.pub".to_string())
    } else if let Some(k) = live.as_ref().and_then(|v| v["audit"]["checkpoint_public_key"].as_str()) {
        (Some(decode_key(k)?), "the running broker".to_string())
    } else {
        (None, "none".to_string())
    };
    let mut witnesses: Vec<verify::Witness> = Vec::new();
    if o.files.is_empty() {
        witnesses.extend(audit::read_head(&dir));
    }
    if let Some(v) = &live
        && let (Some(seq), Some(h)) = (v["audit"]["seq"].as_u64(), v["audit"]["head"].as_str())
        && let Some(hash) = data_encoding::HEXLOWER.decode(h.as_bytes()).ok().and_then(|b| b.try_into().ok())
        && seq > 0
    {
        witnesses.push(verify::Witness { source: "the running broker".into(), seq, hash });
    }
    let r = verify::verify(&files, key.as_deref(), &witnesses);
    if o.json {
        let list = |fs: &[verify::Finding]| fs.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        println!(
            "{}",
            serde_json::json!({
                "ok": r.ok(), "lines": r.lines, "checkpoints": r.checkpoints, "first_seq": r.first_seq, "last_seq": r.last_seq,
                "signed_through": r.signed_through, "ends_cleanly": r.ends_cleanly, "key_source": key_source,
                "witnesses": witnesses.iter().map(|w| w.source.clone()).collect::<Vec<_>>(),
                "errors": list(&r.errors), "warnings": list(&r.warnings),
            })
        );
    } else {
        for e in &r.errors {
            println!("error: {e}");
        }
        for w in &r.warnings {
            println!("warning: {w}");
        }
        println!(
            "{}: {} line(s) in {} file(s), seq {}..{}, {} valid checkpoint(s), signed through seq {}{} (key from {key_source})",
            if r.ok() { "OK" } else { "TAMPERED OR DAMAGED" },
            r.lines,
            files.len(),
            r.first_seq.unwrap_or(0),
            r.last_seq.unwrap_or(0),
            r.checkpoints,
            r.signed_through.unwrap_or(0),
            if r.ends_cleanly { ", ends with a final checkpoint" } else { "" },
        );
    }
    Ok(if key.is_none() {
        3
    } else if r.ok() {
        0
    } else {
        1
    })
}

/// How `audit query` and `monitor` print.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueryOptions {
    /// The log's raw lines (byte for byte).
    pub json: bool,
    /// Keep reading as the log grows (across rotation).
    pub follow: bool,
    /// Only the last N matches of what is there already (then follow).
    pub last: Option<usize>,
    /// ANSI colours.
    pub color: bool,
}

/// One event as a line for a person: seq, time, kind, event, agent, task, decision, and what
/// was done.
pub fn human_line(e: &serde_json::Value, color: bool) -> String {
    let ts = e["ts"].as_i64().map(|t| crate::time::UnixMicros(t).to_rfc3339_micros()).unwrap_or_default();
    let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
    let (verdict, paint) = match (e["decision"].as_str(), e["code"].as_str()) {
        (Some("deny"), c) => (format!("DENY {}: {}", c.unwrap_or("-"), s("reason")), "31"),
        (Some(d), Some(c)) => (format!("{d} {c}: {}", s("reason")), "33"),
        (Some(d), None) => (d.to_owned(), "32"),
        (None, Some(c)) => (format!("ERROR {c}: {}", s("reason")), "33"),
        (None, None) => (String::new(), "0"),
    };
    let did = query::summary(e);
    let task = e["task"].as_str().map(|t| format!(" task={t}")).unwrap_or_default();
    let head = format!("{:>6} {ts} {:<8} {:<18} agent={}{task}", e["seq"], s("kind"), s("event"), s("agent"));
    if color {
        format!("\x1b[2m{head}\x1b[0m \x1b[{paint}m{verdict}\x1b[0m {did}")
    } else {
        format!("{head} {verdict} {did}").trim_end().to_owned()
    }
}

fn emit(l: &query::Line, o: &QueryOptions) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if o.json {
        let _ = out.write_all(&l.raw);
        let _ = out.write_all(b"\n");
    } else {
        let _ = writeln!(out, "{}", human_line(&l.event, o.color));
    }
    if o.follow {
        let _ = out.flush();
    }
}

/// Runs `audit query` (and `monitor`, which is `query --follow --last 10` in colour).
pub fn query_cmd(data_dir: &Path, files: &[PathBuf], f: &query::Filter, o: &QueryOptions) -> Result<i32, String> {
    let dir = data_dir.join("audit");
    let paths = if files.is_empty() {
        audit::log_files(&dir)
            .map_err(|e| format!("{}: {e}  (the audit log is readable by root and the broker's user)", dir.display()))?
    } else {
        files.to_vec()
    };
    let mut follower = (o.follow && files.is_empty()).then(|| query::Follower::at_end(&dir));
    let mut all = query::parse_lines(&read_files(&paths)?);
    let hits = query::select_lines(&all, f);
    let skip = o.last.map_or(0, |n| hits.len().saturating_sub(n));
    for l in &hits[skip..] {
        emit(l, o);
    }
    if !o.json && !o.follow {
        eprintln!("{} event(s)", hits.len());
    }
    let Some(follower) = follower.as_mut() else {
        if o.follow {
            return Err("--follow needs the data dir's log, not FILE arguments".into());
        }
        return Ok(0);
    };
    if !o.json {
        eprintln!("following {} (Ctrl-C to stop)", dir.join("audit.jsonl").display());
    }
    loop {
        let fresh = follower.poll();
        if fresh.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        }
        // A --task tree's root may first appear in a new line.
        all.extend(fresh.iter().cloned());
        let root = f.root(all.iter().map(|l| &l.event));
        for l in fresh.iter().filter(|l| f.matches(&l.event, root.as_deref())) {
            emit(l, o);
        }
        if all.len() > 100_000 {
            all.drain(..50_000);
        }
    }
}

/// Parses `--since`/`--until`: RFC 3339, or a duration meaning "that long ago".
pub fn parse_when(s: &str) -> Result<crate::time::UnixMicros, String> {
    if let Ok(t) = crate::time::parse_rfc3339(s) {
        return Ok(t);
    }
    crate::time::parse_duration(s)
        .map(|d| crate::time::now().minus(d))
        .map_err(|_| format!("{s:?}: use an RFC 3339 time or a duration like 1h (meaning one hour ago)"))
}
