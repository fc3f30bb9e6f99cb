//! Trust-on-first-use host keys for targets that pin nothing: `<data-dir>/state/known_hosts`,
//! one line per target, `<target> <host>:<port> <SHA256 fingerprint>`.
//!
//! What runs here: read once at start; a new line is written (whole file, temporary file +
//! rename) on the blocking pool the first time a target is reached. A recorded key is then
//! enforced like a pinned one; the operator removes the line to accept a changed key.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The recorded fingerprints.
#[derive(Debug, Default)]
pub struct KnownHosts {
    path: Option<PathBuf>,
    entries: RefCell<BTreeMap<(String, String), String>>,
}

fn parse(text: &str) -> BTreeMap<(String, String), String> {
    let mut m = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let mut f = line.split_whitespace();
        if let (Some(t), Some(a), Some(fp), None) = (f.next(), f.next(), f.next(), f.next()) {
            m.insert((t.to_owned(), a.to_owned()), fp.to_owned());
        }
    }
    m
}

fn render(m: &BTreeMap<(String, String), String>) -> String {
    let mut s = String::from("# ephyr: host keys recorded on first use (remove a line to accept a changed key)\n");
    for ((t, a), fp) in m {
        s.push_str(&format!("{t} {a} {fp}\n"));
    }
    s
}

impl KnownHosts {
    /// Reads `path` (missing = empty).
    pub fn load(path: &Path) -> Result<KnownHosts, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(KnownHosts { path: Some(path.to_owned()), entries: RefCell::new(parse(&text)) })
    }

    /// The fingerprint recorded for `target` at `addr` (`host:port`).
    pub fn get(&self, target: &str, addr: &str) -> Option<String> {
        self.entries.borrow().get(&(target.to_owned(), addr.to_owned())).cloned()
    }

    /// Records a first-use fingerprint; returns the file's new text to write (or `None` when
    /// there is no file, or the entry exists).
    pub fn record(&self, target: &str, addr: &str, fingerprint: &str) -> Option<(PathBuf, String)> {
        let mut e = self.entries.borrow_mut();
        let key = (target.to_owned(), addr.to_owned());
        if e.contains_key(&key) {
            return None;
        }
        e.insert(key, fingerprint.to_owned());
        self.path.clone().map(|p| (p, render(&e)))
    }
}

/// Writes the file atomically (blocking).
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    crate::broker::datadir::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_are_recorded_once() {
        let k = KnownHosts::default();
        assert_eq!(k.get("web", "10.0.0.1:22"), None);
        assert!(k.record("web", "10.0.0.1:22", "SHA256:abc").is_none(), "no file: nothing to write");
        assert_eq!(k.get("web", "10.0.0.1:22").as_deref(), Some("SHA256:abc"));
        let text = render(&k.entries.borrow());
        let back = parse(&text);
        assert_eq!(back.get(&("web".into(), "10.0.0.1:22".into())).map(String::as_str), Some("SHA256:abc"));
        assert!(parse("only two\n# comment\n").is_empty());
    }
}
