//! Durable state: the one home for what the broker must not forget across a restart. Features
//! keep their state as named logs of records ([`Store`]: append, await durability) that are
//! replayed and compacted at start ([`Backend`]). Today: the task store (`tasks`) and the SSH
//! certificate registry (`certs`); what comes next (tool pins, approvals, enrolled agents,
//! freezes) opens its own log the same way. Each feature owns its record types; this module
//! only the framing, syncing and where the bytes live. The one backend is [`Files`], journal
//! files in the data dir; a replicated backend (ADR 0009) implements the same two traits and no
//! feature changes.
//!
//! What runs here: one file per log (`<data-dir>/state/<name>.journal`, 0600). At start-up
//! (before the executor serves anything) the file is read whole, a torn last record — a crash in
//! the middle of a write that was never acknowledged — is cut off, and the live state is written
//! to a fresh file that replaces the old one by `rename` (compaction; `fsync` of file and
//! directory). While serving, one flusher task per log (spawned on the executor by [`Files`])
//! writes batches with `write` + `fdatasync` on the blocking pool; `append` returns a
//! [`Durable`] that resolves once the batch holding the record is synced, and callers await it
//! before they acknowledge (DESIGN.md invariant 10).
//!
//! Frame: `len: u32 LE | check: first 8 bytes of SHA-256(payload) | payload (JSON, `len` bytes)`,
//! after an 8-byte file header `EPHYRJ1\n`. A bad frame that is not the last one is corruption:
//! start-up refuses with the offset rather than silently dropping revocations. The decision and
//! the alternatives are in `docs/decisions/0006-task-state-journal.md`.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use super::Error;
use super::blocking::BlockingPool;
use super::ports::Local;

/// An open log of records.
pub trait Store {
    /// Queues a record; the returned [`Durable`] resolves once it is durable. `Err` when the log
    /// has failed (`Error::Unavailable`): nothing was queued.
    fn append(&self, payload: &[u8]) -> Result<Durable, Error>;
}

/// Where logs live.
pub trait Backend {
    /// Replays log `name` (a log never written is empty). `Err` on corruption before the end,
    /// naming where; a torn last record is dropped and counted.
    fn replay<'a>(&'a self, name: &'a str) -> Local<'a, Result<Replayed, Error>>;

    /// Opens log `name` for appending; with `compacted`, first replaces its content with exactly
    /// those records (atomically: a crash leaves the old or the new content).
    fn open<'a>(&'a self, name: &'a str, compacted: Option<Vec<Vec<u8>>>) -> Local<'a, Result<Rc<dyn Store>, Error>>;
}

/// The data dir's journal files: `<dir>/<name>.journal`, flushed by a task on `ex`.
pub struct Files {
    dir: PathBuf,
    pool: BlockingPool,
    ex: Rc<smol::LocalExecutor<'static>>,
}

impl Files {
    /// Logs under `dir`, file work on `pool`, flushers spawned on `ex`.
    pub fn new(dir: PathBuf, pool: BlockingPool, ex: Rc<smol::LocalExecutor<'static>>) -> Self {
        Files { dir, pool, ex }
    }

    /// The file of log `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.journal"))
    }
}

fn pool_stopped() -> Error {
    Error::Unavailable("the blocking pool stopped".into())
}

impl Backend for Files {
    fn replay<'a>(&'a self, name: &'a str) -> Local<'a, Result<Replayed, Error>> {
        let p = self.path(name);
        Box::pin(async move { self.pool.run(move || read(&p)).await.unwrap_or_else(|| Err(pool_stopped())) })
    }

    fn open<'a>(&'a self, name: &'a str, compacted: Option<Vec<Vec<u8>>>) -> Local<'a, Result<Rc<dyn Store>, Error>> {
        let path = self.path(name);
        Box::pin(async move {
            // A log never written gets its header first (appends alone would leave a file
            // without one, which the next start refuses).
            let fresh = std::fs::metadata(&path).map_or(true, |m| m.len() == 0);
            let compacted = compacted.or_else(|| fresh.then(Vec::new));
            if let Some(records) = compacted {
                let p = path.clone();
                self.pool
                    .run(move || rewrite(&p, &records))
                    .await
                    .ok_or_else(pool_stopped)?
                    .map_err(|e| Error::Unavailable(format!("{}: compaction failed: {e}", path.display())))?;
            }
            let j = Journal::open(&path, self.pool.clone())?;
            self.ex.spawn(j.clone().run_flusher()).detach();
            Ok(j as Rc<dyn Store>)
        })
    }
}

/// File header.
pub const MAGIC: &[u8; 8] = b"EPHYRJ1\n";
/// Largest record (a task record with its caveats is well under this).
pub const MAX_RECORD: usize = 64 * 1024;

fn check(payload: &[u8]) -> [u8; 8] {
    let d = ring::digest::digest(&ring::digest::SHA256, payload);
    d.as_ref()[..8].try_into().unwrap_or([0; 8])
}

/// Encodes one frame.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&check(payload));
    out.extend_from_slice(payload);
    out
}

/// What reading a journal found.
#[derive(Debug)]
pub struct Replayed {
    /// Record payloads, in order.
    pub records: Vec<Vec<u8>>,
    /// Bytes of a torn last record that were dropped (0 when the file ended cleanly).
    pub torn_bytes: usize,
}

/// Splits a journal's bytes into record payloads. A damaged frame followed by further data is
/// corruption (`Err` names the offset); a damaged or short frame at the very end is a torn write.
pub fn parse(bytes: &[u8]) -> Result<Replayed, String> {
    if bytes.is_empty() {
        return Ok(Replayed { records: vec![], torn_bytes: 0 });
    }
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not an ephyr task journal (bad header)".into());
    }
    let mut at = MAGIC.len();
    let mut records = Vec::new();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let torn = |what: &str| -> Result<Replayed, String> {
            Err(format!("record at byte {at}: {what}, and more data follows (the journal is corrupt)"))
        };
        if rest.len() < 12 {
            return Ok(Replayed { records, torn_bytes: rest.len() });
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or([0; 4])) as usize;
        if len > MAX_RECORD {
            // A garbage length: torn if nothing plausible could follow, corrupt otherwise.
            return if rest.len() <= 12 + MAX_RECORD {
                Ok(Replayed { records, torn_bytes: rest.len() })
            } else {
                torn("impossible length")
            };
        }
        if rest.len() < 12 + len {
            return Ok(Replayed { records, torn_bytes: rest.len() });
        }
        let payload = &rest[12..12 + len];
        if rest[4..12] != check(payload) {
            if rest.len() == 12 + len {
                return Ok(Replayed { records, torn_bytes: rest.len() });
            }
            return torn("checksum mismatch");
        }
        records.push(payload.to_vec());
        at += 12 + len;
    }
    Ok(Replayed { records, torn_bytes: 0 })
}

/// Reads the journal at `path` (a missing file is an empty journal).
pub fn read(path: &Path) -> Result<Replayed, Error> {
    let mut bytes = Vec::new();
    let failed = |e: io::Error| Error::Unavailable(format!("{}: {e}", path.display()));
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(failed)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    parse(&bytes).map_err(|e| {
        Error::Unavailable(format!("{}: {e}; move it aside to start without the state it holds", path.display()))
    })
}

/// Replaces the journal at `path` with exactly these records (`datadir::write_atomic`), so a
/// crash leaves either the old or the new file.
pub fn rewrite(path: &Path, records: &[Vec<u8>]) -> io::Result<()> {
    let mut buf = MAGIC.to_vec();
    for r in records {
        buf.extend_from_slice(&frame(r));
    }
    super::datadir::write_atomic(path, &buf)
}

/// Resolves when a record is durable (or the journal failed).
pub struct Durable(async_channel::Receiver<Result<(), String>>);

impl Durable {
    /// Already settled (a backend that writes synchronously, or failed).
    pub fn settled(r: Result<(), Error>) -> Durable {
        let (tx, rx) = async_channel::bounded(1);
        let _ = tx.try_send(r.map_err(|e| e.message()));
        Durable(rx)
    }

    /// Waits for the record's batch to be written and synced; `Err` (`Error::Unavailable`) when
    /// the log failed: the record may or may not be on disk.
    pub async fn wait(self) -> Result<(), Error> {
        self.0.recv().await.unwrap_or_else(|_| Err("the journal writer stopped".into())).map_err(Error::Unavailable)
    }
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    waiters: Vec<async_channel::Sender<Result<(), String>>>,
    failed: Option<String>,
}

/// The open journal (executor thread only).
pub struct Journal {
    path: PathBuf,
    pool: BlockingPool,
    file: RefCell<Option<File>>,
    /// The file's length up to the last batch written and synced.
    synced: Cell<u64>,
    pending: RefCell<Pending>,
    kick: event_listener::Event,
}

/// Most bytes of records that may wait while a write keeps failing; past it the journal fails
/// for good (changes refused until a restart, which replays what is on disk).
const MAX_STALLED: usize = 1 << 20;
/// The first wait before a failed write is tried again, and the longest.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Opens `path` for appending, first cutting it back to `len` bytes (what a failed batch left
/// after the last synced one goes).
fn reopen(path: &Path, len: u64) -> Result<File, String> {
    let f = OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(|e| e.to_string())?;
    crate::files::cut_back(&f, len, false).map_err(|e| e.to_string())?;
    Ok(f)
}

impl Journal {
    /// Opens `path` for appending (after [`read`] and [`rewrite`] at start-up).
    pub fn open(path: &Path, pool: BlockingPool) -> Result<Rc<Journal>, Error> {
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?;
        let synced = f.metadata().map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?.len();
        Ok(Rc::new(Journal {
            path: path.to_owned(),
            pool,
            file: RefCell::new(Some(f)),
            synced: Cell::new(synced),
            pending: RefCell::default(),
            kick: event_listener::Event::new(),
        }))
    }

    /// Queues a record; the returned [`Durable`] resolves once it is on disk.
    pub fn append(&self, payload: &[u8]) -> Result<Durable, Error> {
        let mut p = self.pending.borrow_mut();
        if let Some(f) = &p.failed {
            return Err(Error::Unavailable(f.clone()));
        }
        p.buf.extend_from_slice(&frame(payload));
        let (tx, rx) = async_channel::bounded(1);
        p.waiters.push(tx);
        drop(p);
        self.kick.notify(1);
        Ok(Durable(rx))
    }

    /// Writes batches, in order. A batch whose write fails (a full disk, an I/O error) is cut
    /// from the file and written again after a wait (1 s, doubling up to 30 s) until it lands:
    /// nobody waiting for it is answered before, and what is queued meanwhile follows it, so the
    /// records on disk stay in the order their changes were made. Past [`MAX_STALLED`] bytes
    /// waiting, the journal fails for good. Spawn once.
    pub async fn run_flusher(self: Rc<Self>) {
        let mut retry = RETRY_FIRST;
        loop {
            let listener = self.kick.listen();
            let (buf, waiters) = {
                let mut p = self.pending.borrow_mut();
                (std::mem::take(&mut p.buf), std::mem::take(&mut p.waiters))
            };
            if buf.is_empty() {
                listener.await;
                continue;
            }
            let len = buf.len() as u64;
            let file = self.file.borrow_mut().take();
            let (path, synced) = (self.path.clone(), self.synced.get());
            let result = self
                .pool
                .run(move || -> Result<File, (String, Vec<u8>)> {
                    let write = || -> Result<File, String> {
                        let mut f = match file {
                            Some(f) => f,
                            None => reopen(&path, synced)?,
                        };
                        f.write_all(&buf).map_err(|e| e.to_string())?;
                        f.sync_data().map_err(|e| e.to_string())?;
                        Ok(f)
                    };
                    write().map_err(|e| (e, buf))
                })
                .await
                // The batch is gone with the pool: nothing to write again (an empty batch below).
                .unwrap_or_else(|| Err(("the blocking pool stopped".into(), Vec::new())));
            match result {
                Ok(f) => {
                    *self.file.borrow_mut() = Some(f);
                    self.synced.set(synced + len);
                    retry = RETRY_FIRST;
                    for w in waiters {
                        let _ = w.try_send(Ok(()));
                    }
                }
                Err((e, buf)) => {
                    let reason = format!("journal {} failed: {e}", self.path.display());
                    // Past the cap: fail for good. Else the batch goes back in front of what
                    // came since; the file is reopened and cut back to its synced length before
                    // the next try.
                    let given_up = {
                        let mut p = self.pending.borrow_mut();
                        if buf.is_empty() || buf.len() + p.buf.len() > MAX_STALLED {
                            p.failed = Some(reason.clone());
                            let later = std::mem::take(&mut p.waiters);
                            Some(waiters.into_iter().chain(later).collect::<Vec<_>>())
                        } else {
                            let mut again = buf;
                            again.extend_from_slice(&p.buf);
                            p.buf = again;
                            let mut w = waiters;
                            w.append(&mut p.waiters);
                            p.waiters = w;
                            None
                        }
                    };
                    if let Some(told) = given_up {
                        log::error!("{reason}; refusing changes to its state until restart");
                        for w in told {
                            let _ = w.try_send(Err(reason.clone()));
                        }
                        return;
                    }
                    log::error!("{reason}; writing it again in {}s (its changes wait until then)", retry.as_secs());
                    crate::broker::deadline::Deadline::after(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

impl Store for Journal {
    fn append(&self, payload: &[u8]) -> Result<Durable, Error> {
        Journal::append(self, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(records: &[&[u8]]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        for r in records {
            b.extend_from_slice(&frame(r));
        }
        b
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_is_dropped() {
        let b = file(&[b"one", b"two", b"three"]);
        let r = parse(&b).unwrap();
        assert_eq!(r.records, vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
        assert_eq!(r.torn_bytes, 0);
        // Every cut inside the last record leaves the first two.
        let last = frame(b"three").len();
        for cut in 1..last {
            let r = parse(&b[..b.len() - cut]).unwrap();
            assert_eq!(r.records.len(), 2, "cut {cut}");
            assert_eq!(r.torn_bytes, last - cut);
        }
        // A flipped bit in the last payload is a torn write too.
        let mut bad = b.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(parse(&bad).unwrap().records.len(), 2);
    }

    #[test]
    fn damage_before_the_end_is_corruption_not_truncation() {
        let mut b = file(&[b"one", b"two", b"three"]);
        b[MAGIC.len() + 12] ^= 0x20; // first payload byte
        let e = parse(&b).unwrap_err();
        assert!(e.contains("byte 8") && e.contains("corrupt"), "{e}");
        assert!(parse(b"garbage!").unwrap_err().contains("bad header"));
        assert!(parse(b"").unwrap().records.is_empty());
    }

    /// A full disk (a 64 KiB tmpfs; needs root, skipped otherwise): the write fails, nobody is
    /// told anything, the partial write is cut, and once space returns the record lands once,
    /// followed by what was queued meanwhile.
    #[test]
    fn a_write_on_a_full_disk_waits_for_space_and_lands_once() {
        if !crate::broker::privileges::is_root() {
            eprintln!("skipped: needs root to mount a tmpfs");
            return;
        }
        let dir = std::env::temp_dir().join(format!("ephyr-journal-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here");
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _guard = Unmount(dir.clone());
        let path = dir.join("tasks.journal");
        rewrite(&path, &[b"a".to_vec()]).unwrap();
        let filler = dir.join("filler");
        {
            let mut f = File::create(&filler).unwrap();
            while f.write_all(&[0u8; 512]).is_ok() {}
        }
        let j = Journal::open(&path, BlockingPool::new(1, 4)).unwrap();
        let ex = smol::LocalExecutor::new();
        let record = vec![b'x'; 8 * 1024];
        crate::broker::reactor::block_on(ex.run(async {
            ex.spawn(j.clone().run_flusher()).detach();
            let d1 = j.append(&record).unwrap();
            let waited =
                crate::broker::deadline::before(std::time::Instant::now() + Duration::from_millis(1500), d1.0.recv())
                    .await;
            assert!(waited.is_none(), "answered on a full disk: {waited:?}");
            let d2 = j.append(b"c").unwrap();
            std::fs::remove_file(&filler).unwrap();
            d2.wait().await.unwrap();
        }));
        assert_eq!(read(&path).unwrap().records, vec![b"a".to_vec(), record, b"c".to_vec()]);
    }

    #[test]
    fn rewrite_replaces_atomically_and_appends_are_durable() {
        let dir = std::env::temp_dir().join(format!("ephyr-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tasks.journal");
        rewrite(&path, &[b"a".to_vec()]).unwrap();
        let pool = BlockingPool::new(1, 4);
        let j = Journal::open(&path, pool).unwrap();
        let ex = smol::LocalExecutor::new();
        crate::broker::reactor::block_on(ex.run(async {
            ex.spawn(j.clone().run_flusher()).detach();
            let d1 = j.append(b"b").unwrap();
            let d2 = j.append(b"c").unwrap();
            d1.wait().await.unwrap();
            d2.wait().await.unwrap();
        }));
        assert_eq!(read(&path).unwrap().records, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
