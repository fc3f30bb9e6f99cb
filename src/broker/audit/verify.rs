//! Verification of an audit log: pure, over the bytes of its files in order.
//!
//! It checks, and says exactly where it fails:
//! - every line is a JSON object of format version 1 with a `seq` one higher than the line before;
//! - `prev` equals the SHA-256 of the previous line's bytes (an edit, a deleted line or a swap
//!   breaks it at the first line after the change);
//! - every checkpoint line names a line (`covers_seq`) whose hash is `covers_hash`, and carries a
//!   valid Ed25519 signature by the trusted checkpoint key over that pair: a chain recomputed
//!   without the signer fails here;
//! - authorship: a checkpoint vouches that its broker process wrote lines `from_seq..=covers_seq`
//!   (v1 checkpoints, without `from_seq`, vouch for everything before them). Lines no checkpoint
//!   vouches for are reported: as an **error** right after a final checkpoint (a broker that stopped
//!   cleanly wrote nothing more, and the next one signs only its own lines: someone added them),
//!   otherwise as a warning (written before a crash; they cannot be told from forged ones);
//! - a log with lines but no valid checkpoint is an error (a rewritten history stripped of its
//!   checkpoints): the broker checkpoints as soon as it starts;
//! - the end: a log that ends with a final checkpoint is fully signed; otherwise the lines after
//!   the last checkpoint are reported as unsigned, and a `HEAD` watermark or a running broker that
//!   vouches for a later line proves that the tail was truncated.

use std::collections::HashMap;

use serde_json::Value;

use super::event::{checkpoint_digest, line_hash};
use crate::signer::protocol::verify_checkpoint;

/// A line-independent fact about the log's end (from `audit/HEAD` or a running broker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    /// Where it came from (for messages).
    pub source: String,
    /// A line that must exist.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

/// One problem, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// File name.
    pub file: String,
    /// 1-based line number in that file (0 = the whole log).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

/// The result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Lines read.
    pub lines: u64,
    /// Valid checkpoints.
    pub checkpoints: u64,
    /// First and last `seq`.
    pub first_seq: Option<u64>,
    /// Last `seq`.
    pub last_seq: Option<u64>,
    /// Highest `seq` covered by a valid checkpoint.
    pub signed_through: Option<u64>,
    /// The log ends with a final (shutdown) checkpoint covering everything before it.
    pub ends_cleanly: bool,
    /// Tampering or damage. Empty = the log verifies.
    pub errors: Vec<Finding>,
    /// Things to know that are not proof of tampering (an unsigned tail after a crash).
    pub warnings: Vec<Finding>,
}

impl Report {
    /// Whether no error was found.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

fn hex32(v: &Value) -> Option<[u8; 32]> {
    let s = v.as_str()?;
    let b = data_encoding::HEXLOWER.decode(s.as_bytes()).ok()?;
    b.try_into().ok()
}

/// Verifies `files` (name, bytes) in chain order. `key` is the trusted checkpoint public key (raw
/// 32 bytes); without it signatures cannot be checked and that is an error.
pub fn verify(files: &[(String, Vec<u8>)], key: Option<&[u8]>, witnesses: &[Witness]) -> Report {
    let mut r = Report::default();
    let mut prev: Option<(u64, [u8; 32])> = None;
    let mut hashes: HashMap<u64, [u8; 32]> = HashMap::new();
    let mut last_kind_final = false;
    let mut last_pos = (String::new(), 0usize);
    // Authorship: ranges vouched for by valid checkpoints, valid checkpoint lines (final or not).
    let mut vouched: Vec<(u64, u64)> = Vec::new();
    let mut checkpoint_lines: HashMap<u64, bool> = HashMap::new();
    let mut positions: HashMap<u64, (String, usize)> = HashMap::new();
    if key.is_none() {
        r.errors.push(Finding { file: "log".into(), line: 0, message: "no trusted checkpoint public key: signatures cannot be checked (pass --public-key or run on the broker host)".into() });
    }
    for (name, bytes) in files {
        let mut start = 0usize;
        let mut lineno = 0usize;
        while start < bytes.len() {
            lineno += 1;
            let end = bytes[start..].iter().position(|b| *b == b'\n').map(|i| start + i);
            let Some(end) = end else {
                r.errors.push(Finding {
                    file: name.clone(),
                    line: lineno,
                    message: format!("incomplete last line ({} bytes without a newline)", bytes.len() - start),
                });
                break;
            };
            let line = &bytes[start..end];
            start = end + 1;
            last_pos = (name.clone(), lineno);
            r.lines += 1;
            let at = |msg: String| Finding { file: name.clone(), line: lineno, message: msg };
            let v: Value = match serde_json::from_slice(line) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    r.errors.push(at("not a JSON object (damaged or edited)".into()));
                    prev = None;
                    continue;
                }
            };
            let (Some(seq), Some(p)) = (v["seq"].as_u64(), hex32(&v["prev"])) else {
                r.errors.push(at("missing seq or prev".into()));
                prev = None;
                continue;
            };
            if v["v"].as_u64() != Some(1) {
                r.errors.push(at(format!("unknown line format version {}", v["v"])));
            }
            let hash = line_hash(line);
            match prev {
                None if r.lines == 1 => {
                    r.first_seq = Some(seq);
                    if seq == 1 && p != [0; 32] {
                        r.errors.push(at("the first line of the chain must have prev = 0".into()));
                    } else if seq != 1 {
                        r.warnings.push(at(format!(
                            "the chain starts at seq {seq}: earlier files are not part of this check"
                        )));
                    }
                }
                None => {}
                Some((pseq, phash)) => {
                    if seq != pseq + 1 {
                        r.errors.push(at(format!(
                            "seq {seq} follows seq {pseq}: {} line(s) missing or lines reordered",
                            seq.abs_diff(pseq + 1).max(1)
                        )));
                    }
                    if p != phash {
                        r.errors.push(at(format!("prev does not match the hash of the line before (seq {pseq}): a line before this one was edited, deleted or moved")));
                    }
                }
            }
            hashes.insert(seq, hash);
            positions.insert(seq, (name.clone(), lineno));
            last_kind_final = false;
            if v["kind"] == "checkpoint" {
                let o = &v["outcome"];
                let covers = o["covers_seq"].as_u64();
                let covers_hash = hex32(&o["covers_hash"]);
                let sig = o["sig"].as_str().and_then(|s| data_encoding::BASE64.decode(s.as_bytes()).ok());
                let from = o["from_seq"].as_u64();
                if o.get("from_seq").is_some_and(|f| !f.is_u64()) || from.zip(covers).is_some_and(|(f, c)| f > c) {
                    r.errors.push(at("checkpoint with an invalid from_seq".into()));
                }
                match (covers, covers_hash, sig) {
                    (Some(cs), Some(ch), Some(sig)) => {
                        match hashes.get(&cs) {
                            None => r.errors.push(at(format!("checkpoint covers seq {cs}, which is not in the log"))),
                            Some(h) if *h != ch => r.errors.push(at(format!("checkpoint covers seq {cs} but that line's hash differs: the chain before this checkpoint was rewritten"))),
                            Some(_) => {}
                        }
                        if let Some(k) = key {
                            if verify_checkpoint(k, &checkpoint_digest(from, cs, &ch), &sig) {
                                if hashes.get(&cs) == Some(&ch) {
                                    r.checkpoints += 1;
                                    r.signed_through = Some(r.signed_through.map_or(cs, |x| x.max(cs)));
                                    last_kind_final = v["event"] == "final_checkpoint" && cs + 1 == seq;
                                    vouched.push((from.unwrap_or(0), cs));
                                    checkpoint_lines.insert(seq, last_kind_final);
                                }
                            } else {
                                r.errors.push(at("checkpoint signature is not valid for the trusted key (forged checkpoint or rebuilt chain)".into()));
                            }
                        }
                    }
                    _ => r.errors.push(at("checkpoint line without covers_seq, covers_hash and sig".into())),
                }
            }
            prev = Some((seq, hash));
        }
    }
    r.last_seq = prev.map(|(s, _)| s);
    r.ends_cleanly = last_kind_final;
    if let (Some(first), Some(last)) = (r.first_seq, r.last_seq)
        && key.is_some()
    {
        if r.checkpoints == 0 {
            r.errors.push(Finding {
                file: last_pos.0.clone(),
                line: 0,
                message: format!("no valid checkpoint in {} line(s): nothing in this log is signed (a history rewritten without its checkpoints; a broker checkpoints as soon as it starts)", r.lines),
            });
        } else {
            unvouched(&mut r, first, last, &vouched, &checkpoint_lines, &positions);
        }
    }
    for w in witnesses {
        match (hashes.get(&w.seq), r.last_seq) {
            (Some(h), _) if *h == w.hash => {}
            (Some(_), _) => r.errors.push(Finding {
                file: w.source.clone(),
                line: 0,
                message: format!("line seq {} differs from what {} recorded", w.seq, w.source),
            }),
            (None, Some(last)) if w.seq > last => r.errors.push(Finding {
                file: w.source.clone(),
                line: 0,
                message: format!(
                    "truncated: {} vouches for seq {} but the log ends at seq {last} ({} line(s) missing)",
                    w.source,
                    w.seq,
                    w.seq - last
                ),
            }),
            (None, _) => r.errors.push(Finding {
                file: w.source.clone(),
                line: 0,
                message: format!("{} vouches for seq {}, which is not in the log", w.source, w.seq),
            }),
        }
    }
    if r.lines == 0 {
        r.warnings.push(Finding { file: "log".into(), line: 0, message: "the log is empty".into() });
    }
    r
}

/// Reports the lines no checkpoint vouches for (see the module header).
fn unvouched(
    r: &mut Report,
    first: u64,
    last: u64,
    vouched: &[(u64, u64)],
    checkpoint_lines: &HashMap<u64, bool>,
    positions: &HashMap<u64, (String, usize)>,
) {
    let mut ranges: Vec<(u64, u64)> = vouched.to_vec();
    ranges.extend(checkpoint_lines.keys().map(|&s| (s, s)));
    ranges.sort_unstable();
    let mut gaps = Vec::new();
    let mut next = first;
    for (a, b) in ranges {
        if a > next {
            gaps.push((next, a - 1));
        }
        next = next.max(b.saturating_add(1));
    }
    if next <= last {
        gaps.push((next, last));
    }
    // Lines after the last one any checkpoint vouches for are the unsigned tail, even where a
    // checkpoint line sits among them (a line appended while that checkpoint was being signed
    // is covered by the next one): one finding, unless a clean stop precedes them.
    let last_vouched = vouched.iter().map(|v| v.1).max().unwrap_or(0);
    let mut tail: Option<(u64, u64)> = None;
    let mut kept = Vec::new();
    for (a, b) in gaps {
        let after_final = a > 0 && checkpoint_lines.get(&(a - 1)) == Some(&true);
        if a > last_vouched && !after_final {
            let (first, n) = tail.unwrap_or((a, 0));
            tail = Some((first, n + b - a + 1));
        } else {
            kept.push((a, b));
        }
    }
    if let Some((a, n)) = tail {
        let (file, line) = positions.get(&a).cloned().unwrap_or_default();
        r.warnings.push(Finding {
            file,
            line,
            message: format!(
                "the last {n} line(s) are after the last checkpoint: not yet signed (broker running or crashed), or the tail was truncated"
            ),
        });
    }
    for (a, b) in kept {
        let (file, line) = positions.get(&a).cloned().unwrap_or_default();
        let n = b - a + 1;
        let after_final = a > 0 && checkpoint_lines.get(&(a - 1)) == Some(&true);
        let message = if after_final {
            format!(
                "{n} line(s) (seq {a}..={b}) follow a clean stop (final checkpoint at seq {}) and no broker signed them: added by someone with write access to the data dir",
                a - 1
            )
        } else {
            format!(
                "{n} line(s) (seq {a}..={b}) were never signed by the broker that wrote them (written before a crash, or inserted): they cannot be told apart from forged lines"
            )
        };
        let f = Finding { file, line, message };
        if after_final { r.errors.push(f) } else { r.warnings.push(f) }
    }
}
