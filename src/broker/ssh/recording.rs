//! Recordings of SSH commands: every command an agent runs (one-shot or on a session) is kept as
//! an asciicast v2 file in `<data-dir>/recordings/`, its SHA-256 in the audit line that announces
//! it, so an edit after the fact shows (`ephyr recording show` compares the two).
//!
//! What runs here: [`cast`] is pure (header, timed output events from the result's arrival
//! timeline, an exit marker; secret values the policy names are masked first); [`Store::save`]
//! runs on the blocking pool: an atomic 0600 write, then rotation (oldest first) down to the
//! policy's size and count caps. Reading for the CLI ([`load`], [`list`]) is plain file I/O.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::client::ExecResult;
use crate::secret::SecretBytes;

/// The file name suffix.
pub const SUFFIX: &str = ".cast";
/// Terminal size written in the header (exec has no PTY; players need one).
const WIDTH: u32 = 120;
const HEIGHT: u32 = 40;
/// What a masked secret becomes (one `*` per byte, so offsets stay valid).
const MASK: u8 = b'*';
/// Secrets shorter than this are not masked (they would mask ordinary text).
const MIN_MASKED: usize = 6;

/// What the recording is of.
#[derive(Clone, Copy, Debug)]
pub struct About<'a> {
    /// Started at (Unix seconds).
    pub started: u64,
    /// Agent.
    pub agent: &'a str,
    /// Target name.
    pub target: &'a str,
    /// Role name.
    pub role: &'a str,
    /// The command as sent.
    pub command: &'a str,
    /// The session, if any.
    pub session: Option<&'a str>,
    /// A terminal session's size (columns, rows) and the keystrokes sent (recorded as an `i`
    /// event before the output); `None` for commands.
    pub terminal: Option<((u32, u32), &'a [u8])>,
}

/// Replaces every occurrence of each secret in `buf` by as many `*`.
pub fn mask(buf: &mut [u8], secrets: &[SecretBytes]) {
    for s in secrets.iter().map(|s| s.expose()).filter(|s| s.len() >= MIN_MASKED) {
        let mut i = 0;
        while i + s.len() <= buf.len() {
            if &buf[i..i + s.len()] == s {
                buf[i..i + s.len()].fill(MASK);
                i += s.len();
            } else {
                i += 1;
            }
        }
    }
}

/// The end of the longest prefix of `b[from..to]` that does not end inside a UTF-8 sequence.
fn char_boundary(b: &[u8], from: usize, to: usize) -> usize {
    match std::str::from_utf8(&b[from..to]) {
        Ok(_) => to,
        // An incomplete sequence at the end waits for the next piece; an invalid one is shown
        // as U+FFFD where it is.
        Err(e) if e.error_len().is_none() => from + e.valid_up_to(),
        Err(_) => to,
    }
}

fn secs(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e6
}

/// The asciicast v2 text of a command's result, secrets masked.
pub fn cast(about: &About<'_>, r: &ExecResult, secrets: &[SecretBytes]) -> Vec<u8> {
    let (mut out, mut err) = (r.stdout.clone(), r.stderr.clone());
    mask(&mut out, secrets);
    mask(&mut err, secrets);
    let mut command = about.command.as_bytes().to_vec();
    mask(&mut command, secrets);
    let command = String::from_utf8_lossy(&command).into_owned();
    let (width, height) = about.terminal.map_or((WIDTH, HEIGHT), |t| t.0);
    let header = json!({
        "version": 2,
        "width": width,
        "height": height,
        "timestamp": about.started,
        "duration": secs(r.duration),
        "command": command,
        "title": format!("{} on {} as {}{}", about.agent, about.target, about.role,
            about.session.map(|s| format!(" (session {s})")).unwrap_or_default()),
    });
    let mut text = header.to_string();
    text.push('\n');
    if let Some((_, keys)) = about.terminal {
        let mut keys = keys.to_vec();
        mask(&mut keys, secrets);
        text.push_str(&json!([0.0, "i", String::from_utf8_lossy(&keys)]).to_string());
        text.push('\n');
    }
    let mut pos = [0usize, 0usize];
    let mut event = |text: &mut String, at: Duration, stream: usize, end: usize, last: bool| {
        let buf = if stream == 1 { &err } else { &out };
        let end = end.min(buf.len()).max(pos[stream]);
        let cut = if last { end } else { char_boundary(buf, pos[stream], end) };
        if cut > pos[stream] {
            let piece = String::from_utf8_lossy(&buf[pos[stream]..cut]);
            text.push_str(&json!([secs(at), "o", piece]).to_string());
            text.push('\n');
            pos[stream] = cut;
        }
    };
    for c in &r.timeline {
        event(&mut text, c.at, usize::from(c.stderr), c.end, false);
    }
    // What the timeline did not time (past its cap, or an incomplete character) ends the output.
    event(&mut text, r.duration, 0, out.len(), true);
    event(&mut text, r.duration, 1, err.len(), true);
    let end = match (r.exit_status, &r.exit_signal, r.timed_out) {
        (_, _, true) => "timed out".to_owned(),
        (_, Some(s), _) => format!("signal {s}"),
        (Some(c), _, _) => format!("exit {c}"),
        _ => "ended".to_owned(),
    };
    text.push_str(&json!([secs(r.duration), "m", end]).to_string());
    text.push('\n');
    text.into_bytes()
}

/// SHA-256 of a recording, lower-case hex.
pub fn digest(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Whether `id` can name a recording (a ULID: no path tricks).
pub fn id_ok(id: &str) -> bool {
    id.len() == 26 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The recordings directory and its caps.
#[derive(Clone, Debug)]
pub struct Store {
    /// `<data-dir>/recordings`.
    pub dir: PathBuf,
}

/// A recording written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    /// SHA-256, hex.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
    /// Older recordings removed to stay within the caps.
    pub rotated: usize,
}

impl Store {
    /// Writes recording `id` (atomically, 0600), then removes the oldest ones until at most
    /// `max_files` recordings of at most `max_bytes` in all remain (never the new one).
    /// Blocking: call it on the pool.
    pub fn save(&self, id: &str, bytes: &[u8], max_bytes: u64, max_files: usize) -> Result<Saved, String> {
        let ctx = |e: std::io::Error| format!("{}: {e}", self.dir.display());
        let name = format!("{id}{SUFFIX}");
        crate::files::write_atomic(&self.dir.join(&name), bytes, 0o600).map_err(ctx)?;
        let mut all = list_files(&self.dir).map_err(ctx)?;
        all.sort();
        let (mut total, mut count) = (all.iter().map(|(_, len)| len).sum::<u64>(), all.len());
        let mut rotated = 0;
        for (old, len) in &all {
            if (total <= max_bytes && count <= max_files) || *old == name {
                break;
            }
            match fs::remove_file(self.dir.join(old)) {
                Ok(()) => rotated += 1,
                // Another save, rotating at the same moment, removed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => continue,
            }
            total -= len;
            count -= 1;
        }
        Ok(Saved { sha256: digest(bytes), bytes: bytes.len() as u64, rotated })
    }
}

/// `(file name, size)` of every recording in `dir`.
fn list_files(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_suffix(SUFFIX).is_some_and(id_ok) {
            // Saves run on the pool's threads at once: one may rotate away what this one listed.
            match e.metadata() {
                Ok(m) => out.push((name, m.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// The ids of the recordings in `dir`, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut ids: Vec<String> =
        list_files(dir)?.into_iter().map(|(n, _)| n.trim_end_matches(SUFFIX).to_owned()).collect();
    ids.sort();
    Ok(ids)
}

/// A recording's bytes.
pub fn load(dir: &Path, id: &str) -> Result<Vec<u8>, String> {
    if !id_ok(id) {
        return Err(format!("{id:?} is not a recording id (a ULID)"));
    }
    let path = dir.join(format!("{id}{SUFFIX}"));
    fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
}

/// One event of a recording: seconds since the start, type (`o` output, `m` marker), text.
pub type CastEvent = (f64, String, String);

/// The header and events of a recording. `Err` names the line.
pub fn events(bytes: &[u8]) -> Result<(Value, Vec<CastEvent>), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the recording is not UTF-8".to_owned())?;
    let mut lines = text.lines();
    let header: Value = lines
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .filter(|h: &Value| h["version"] == 2)
        .ok_or("line 1 is not an asciicast v2 header")?;
    let mut out = Vec::new();
    for (n, l) in lines.enumerate() {
        let v: Value = serde_json::from_str(l).map_err(|e| format!("line {}: {e}", n + 2))?;
        match (v[0].as_f64(), v[1].as_str(), v[2].as_str()) {
            (Some(t), Some(k), Some(s)) => out.push((t, k.to_owned(), s.to_owned())),
            _ => return Err(format!("line {}: not [time, type, text]", n + 2)),
        }
    }
    Ok((header, out))
}

#[cfg(test)]
mod tests {
    use super::super::client::Chunk;
    use super::*;

    fn result() -> ExecResult {
        let ms = Duration::from_millis;
        ExecResult {
            stdout: "héllo\nworld token=SECRET-VALUE-1\n".as_bytes().to_vec(),
            stderr: b"oops\n".to_vec(),
            exit_status: Some(3),
            duration: ms(900),
            // The first piece ends inside the two-byte é.
            timeline: vec![
                Chunk { at: ms(100), stderr: false, end: 2 },
                Chunk { at: ms(200), stderr: true, end: 5 },
                Chunk { at: ms(300), stderr: false, end: 13 },
            ],
            ..Default::default()
        }
    }

    fn about() -> About<'static> {
        About {
            started: 1_700_000_000,
            agent: "alice",
            target: "web",
            role: "read",
            command: "cat x # SECRET-VALUE-1",
            session: None,
            terminal: None,
        }
    }

    #[test]
    fn a_cast_has_the_output_in_order_with_times_secrets_masked_and_characters_whole() {
        let secrets = vec![SecretBytes::new(b"SECRET-VALUE-1".to_vec()), SecretBytes::new(b"abc".to_vec())];
        let bytes = cast(&about(), &result(), &secrets);
        let (h, ev) = events(&bytes).unwrap();
        assert_eq!(h["command"], "cat x # **************");
        assert_eq!(h["title"], "alice on web as read");
        let o: Vec<(f64, &str)> = ev.iter().filter(|e| e.1 == "o").map(|e| (e.0, e.2.as_str())).collect();
        assert_eq!(o, [(0.1, "h"), (0.2, "oops\n"), (0.3, "éllo\nworld "), (0.9, "token=**************\n")]);
        assert_eq!(ev.last().unwrap(), &(0.9, "m".to_owned(), "exit 3".to_owned()));
        assert!(!String::from_utf8_lossy(&bytes).contains("SECRET"));
        // Short secrets are not masked (they would hide ordinary words).
        assert!(String::from_utf8_lossy(&bytes).contains("oops"));
    }

    #[test]
    fn saving_rotates_the_oldest_within_the_caps() {
        let dir = std::env::temp_dir().join(format!("ephyr-rec-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let store = Store { dir: dir.clone() };
        let ids: Vec<String> = (0..5).map(|i| format!("01ARZ3NDEKTSV4RRFFQ69G5FA{i}")).collect();
        for id in &ids {
            let s = store.save(id, &[b'x'; 100], 350, 10).unwrap();
            assert_eq!(s.sha256, digest(&[b'x'; 100]));
        }
        assert_eq!(list(&dir).unwrap(), &ids[2..]);
        let s = store.save("01ARZ3NDEKTSV4RRFFQ69G5FB0", b"y", 10_000, 2).unwrap();
        assert_eq!(s.rotated, 2);
        assert_eq!(list(&dir).unwrap(), ["01ARZ3NDEKTSV4RRFFQ69G5FA4", "01ARZ3NDEKTSV4RRFFQ69G5FB0"]);
        // A new recording larger than the cap is kept (it is the evidence of what just ran).
        store.save("01ARZ3NDEKTSV4RRFFQ69G5FB1", &[b'z'; 500], 100, 10).unwrap();
        assert_eq!(list(&dir).unwrap(), ["01ARZ3NDEKTSV4RRFFQ69G5FB1"]);
        assert!(load(&dir, "../../etc/passwd").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The pool saves recordings on several threads: one save rotating away a file another has
    /// just listed is no error for either (found by the soak: "recordings: No such file or
    /// directory" for a recording that was written, so its audit line said it was not).
    #[test]
    fn saves_on_several_threads_at_once_all_succeed_and_keep_the_caps() {
        let dir = std::env::temp_dir().join(format!("ephyr-rec-threads-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let store = Store { dir: dir.clone() };
        std::thread::scope(|s| {
            for t in 0..4 {
                let store = store.clone();
                s.spawn(move || {
                    for i in 0..150 {
                        let id = format!("01ARZ3NDEKTSV4RRFF{t}{i:07}");
                        if let Err(e) = store.save(&id, &[b'x'; 64], 1 << 20, 3) {
                            panic!("save {id} on thread {t}: {e}");
                        }
                    }
                });
            }
        });
        let left = list(&dir).unwrap();
        assert!((1..=3 + 3).contains(&left.len()), "{} recordings left for a cap of 3", left.len());
        fs::remove_dir_all(&dir).unwrap();
    }
}
