//! The audit trail: tamper-evident JSON lines, group-committed to disk, with signed checkpoints.
//!
//! What runs here: appends to `<data-dir>/audit/audit.jsonl` (O_APPEND, 0600) and `fdatasync`
//! on the bounded blocking pool; renames for rotation (`audit-<first seq>.jsonl`) and for the
//! `HEAD` watermark; on start, reads back the last complete line (backwards, however long) and
//! cuts off a torn partial line left by a crash. One flusher task writes batches; one checkpoint
//! task asks the signer to sign the chain head every [`AuditConfig::checkpoint_every`] events or
//! [`AuditConfig::checkpoint_interval`], and at clean shutdown.
//!
//! Durability (DESIGN.md invariant 10): `record` returns a [`Ticket`]; its `durable()` resolves
//! after the batch holding the event has been written and `fdatasync`ed. Callers that acknowledge
//! a request await it first. Group commit: while one batch is being synced, new events gather in
//! the next, so one `fdatasync` covers many requests.
//!
//! Fail closed: once a write or sync fails (disk full, unwritable file), every pending and later
//! `record` fails with [`AuditError::Unavailable`] until the broker restarts, and actions that
//! require audit are refused with that error.
//!
//! Authorship: a broker process signs only lines it wrote. Each checkpoint names the first line
//! of its process (`from_seq`, inside the signed digest), the broker checkpoints as soon as it
//! starts and at a clean stop, and at start it compares the log's end with what it recorded at its
//! last stop (`HEAD`): lines after the last checkpoint are reported ([`AuditLog::unsigned_tail`])
//! and never signed later. `verify` then refuses lines after a clean stop that no broker signed,
//! and a log with no checkpoint at all.

pub(crate) mod event;
pub mod query;
pub(crate) mod verify;

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub use event::{Event, Kind, Verdict};

use super::blocking::BlockingPool;
use super::metrics::Metrics;

/// The active file's name.
pub const ACTIVE: &str = "audit.jsonl";
/// The watermark file's name.
pub const HEAD_FILE: &str = "HEAD";

/// Why an event could not be recorded. Callers refuse the action and say so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditError {
    /// The log cannot be written (the reason names the OS error); the broker fails closed.
    Unavailable(String),
}

impl std::fmt::Display for AuditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditError::Unavailable(r) => {
                write!(f, "audit log unavailable ({r}); refusing actions that must be audited")
            }
        }
    }
}

impl std::error::Error for AuditError {}

/// A recorded event; `durable()` waits until it is on disk.
pub struct Ticket(async_channel::Receiver<Result<(), AuditError>>);

impl Ticket {
    /// Waits for the event's batch to be written and synced.
    pub async fn durable(self) -> Result<(), AuditError> {
        self.0.recv().await.unwrap_or_else(|_| Err(AuditError::Unavailable("the audit writer stopped".into())))
    }

    /// A ticket that is already settled (in-memory sinks, tests).
    pub fn ready(r: Result<(), AuditError>) -> Ticket {
        let (tx, rx) = async_channel::bounded(1);
        let _ = tx.try_send(r);
        Ticket(rx)
    }
}

/// Where the rest of the broker sends events. Tests use [`MemorySink`].
pub trait AuditSink {
    /// Appends `e` to the chain now; the ticket says when it is durable.
    fn record(&self, e: Event) -> Result<Ticket, AuditError>;

    /// Records `e` without waiting for it to be durable (events that gate nothing: read-only
    /// tool calls, refusals). It is written with the next batch all the same.
    fn note(&self, e: Event) -> Result<(), AuditError> {
        self.record(e).map(drop)
    }

    /// Why the trail cannot take records, if it has failed (requests are refused then).
    fn failure(&self) -> Option<String> {
        None
    }
}

/// An in-memory sink for tests.
#[derive(Default)]
pub struct MemorySink(pub RefCell<Vec<Event>>);

impl AuditSink for MemorySink {
    fn record(&self, e: Event) -> Result<Ticket, AuditError> {
        self.0.borrow_mut().push(e);
        Ok(Ticket::ready(Ok(())))
    }
}

/// (signature, public key) of a checkpoint, or why it could not be signed.
pub type Signed<'a> = Pin<Box<dyn Future<Output = Result<(Vec<u8>, Vec<u8>), String>> + 'a>>;

/// Signs checkpoint digests (the broker passes the signer; tests pass a local key).
pub trait CheckpointSigner {
    /// Signs `digest` with the checkpoint key.
    fn sign<'a>(&'a self, digest: [u8; 32]) -> Signed<'a>;
}

/// Longest time an event nobody waits for stays in memory before it is written and synced.
pub const LINGER: Duration = Duration::from_millis(10);
/// Buffered bytes that end the linger early.
const LINGER_BYTES: usize = 256 * 1024;

/// Tuning.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// Checkpoint after this many events.
    pub checkpoint_every: u64,
    /// Checkpoint at least this often while events arrive.
    pub checkpoint_interval: Duration,
    /// Rotate when the active file exceeds this size.
    pub max_file_bytes: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { checkpoint_every: 1000, checkpoint_interval: Duration::from_secs(60), max_file_bytes: 64 << 20 }
    }
}

struct State {
    seq: u64,
    head: [u8; 32],
    buf: Vec<u8>,
    waiters: Vec<async_channel::Sender<Result<(), AuditError>>>,
    file: Option<File>,
    file_len: u64,
    file_first_seq: u64,
    failed: Option<String>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    signed_through: u64,
    /// The first line this process writes: its checkpoints vouch from here.
    from_seq: u64,
    /// The last line written and synced, and its hash (what a witness may vouch for).
    durable: (u64, [u8; 32]),
    /// How long to wait before the next attempt to resume after a failure (doubles while
    /// attempts keep failing, back to [`RESUME_FIRST`] after a batch is written).
    backoff: Duration,
}

/// The first wait before resuming a failed log, and the longest.
const RESUME_FIRST: Duration = Duration::from_secs(1);
const RESUME_MAX: Duration = Duration::from_secs(30);

/// What the log's end looked like when it was opened, when something is wrong with it: lines
/// after the last checkpoint (written before a crash, or added by someone who can write the data
/// dir: this process never signs them), or a `HEAD` that disagrees with the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsignedTail {
    /// First and last line after the last checkpoint, if any.
    pub lines: Option<(u64, u64)>,
    /// The last checkpoint before them is a final one (a clean stop): no broker wrote them.
    pub after_clean_stop: bool,
    /// What `HEAD` (the last stop's record) says, when it disagrees with the log.
    pub head_mismatch: Option<String>,
}

/// A function that sees every event as it is recorded.
pub type Observer = Box<dyn Fn(&Event)>;

/// The audit log.
pub struct AuditLog {
    dir: PathBuf,
    pool: BlockingPool,
    config: AuditConfig,
    state: RefCell<State>,
    kick: event_listener::Event,
    urgent: event_listener::Event,
    idle: event_listener::Event,
    metrics: Rc<Metrics>,
    ids: crate::ids::Monotonic,
    unsigned_tail: Option<UnsignedTail>,
    /// Live copies of each line for the console's feeds (bounded; a slow reader misses lines).
    taps: RefCell<Vec<std::rc::Weak<Tap>>>,
    /// Sees every event as it is recorded (the agent directory notes which grants were used).
    observer: RefCell<Option<Observer>>,
}

/// Most live feeds at once.
pub const MAX_TAPS: usize = 16;
/// Bytes of lines a live feed may hold before it misses some.
pub const TAP_BYTES: usize = 256 * 1024;

/// A live feed of audit lines: lines recorded since it was opened, appended to one buffer (a
/// copy per line, no task woken per line); the reader takes them in batches. Lines that would
/// overflow [`TAP_BYTES`] are counted as skipped, not kept.
#[derive(Default)]
pub struct Tap {
    buf: RefCell<Vec<u8>>,
    skipped: std::cell::Cell<u64>,
    wake: event_listener::Event,
}

impl Tap {
    /// Waits until a line is there (returns at once if one is).
    pub async fn ready(&self) {
        loop {
            if !self.buf.borrow().is_empty() || self.skipped.get() > 0 {
                return;
            }
            let l = self.wake.listen();
            if !self.buf.borrow().is_empty() || self.skipped.get() > 0 {
                return;
            }
            l.await;
        }
    }

    /// Takes every line buffered so far (newline-terminated) and how many were skipped.
    pub fn take(&self) -> (Vec<u8>, u64) {
        (std::mem::take(&mut *self.buf.borrow_mut()), self.skipped.replace(0))
    }

    fn push(&self, line: &[u8]) {
        let mut b = self.buf.borrow_mut();
        if b.len() + line.len() > TAP_BYTES {
            self.skipped.set(self.skipped.get() + 1);
            return;
        }
        let was_empty = b.is_empty();
        b.extend_from_slice(line);
        if was_empty {
            self.wake.notify(1);
        }
    }
}

fn io_ctx(path: &Path) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

/// Reads the last complete line of `f` (scanning backwards in 64 KiB steps, however long the line
/// is) and cuts off any torn bytes after it. Returns (line bytes, bytes cut).
fn recover_tail(f: &mut File) -> io::Result<(Option<Vec<u8>>, u64)> {
    let len = f.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((None, 0));
    }
    const STEP: u64 = 64 * 1024;
    // Find the last newline.
    let mut pos = len;
    let mut last_nl = None;
    while pos > 0 && last_nl.is_none() {
        let start = pos.saturating_sub(STEP);
        let mut chunk = vec![0u8; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk)?;
        last_nl = chunk.iter().rposition(|b| *b == b'\n').map(|i| start + i as u64);
        pos = start;
    }
    let Some(nl) = last_nl else {
        // No complete line at all: the whole file is a torn write.
        f.set_len(0)?;
        return Ok((None, len));
    };
    let cut = len - (nl + 1);
    if cut > 0 {
        f.set_len(nl + 1)?;
    }
    // Find the newline before it (or the file start).
    let mut pos = nl;
    let mut prev_nl = None;
    while pos > 0 && prev_nl.is_none() {
        let start = pos.saturating_sub(STEP);
        let mut chunk = vec![0u8; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk)?;
        prev_nl = chunk.iter().rposition(|b| *b == b'\n').map(|i| start + i as u64);
        pos = start;
    }
    let line_start = prev_nl.map_or(0, |p| p + 1);
    let mut line = vec![0u8; (nl - line_start) as usize];
    f.seek(SeekFrom::Start(line_start))?;
    f.read_exact(&mut line)?;
    f.seek(SeekFrom::End(0))?;
    Ok((Some(line), cut))
}

/// The log's files in chain order: rotated `audit-<seq>.jsonl` by seq, then `audit.jsonl`.
pub fn log_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if let Some(seq) =
            name.strip_prefix("audit-").and_then(|n| n.strip_suffix(".jsonl")).and_then(|n| n.parse::<u64>().ok())
        {
            rotated.push((seq, p));
        }
    }
    rotated.sort();
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let active = dir.join(ACTIVE);
    if active.exists() {
        out.push(active);
    }
    Ok(out)
}

fn open_active(dir: &Path) -> Result<File, String> {
    let p = dir.join(ACTIVE);
    OpenOptions::new().create(true).read(true).append(true).mode(0o600).open(&p).map_err(io_ctx(&p))
}

impl AuditLog {
    /// Opens (or creates) the log in `dir`, resuming the chain from the last complete line.
    pub fn open(
        dir: &Path,
        pool: BlockingPool,
        config: AuditConfig,
        metrics: Rc<Metrics>,
    ) -> Result<Rc<AuditLog>, String> {
        fs::create_dir_all(dir).map_err(io_ctx(dir))?;
        let mut file = open_active(dir)?;
        let (mut last, cut) = recover_tail(&mut file).map_err(io_ctx(&dir.join(ACTIVE)))?;
        if cut > 0 {
            log::warn!(
                "audit: cut {cut} bytes of a torn line at the end of {} (a crash during a write)",
                dir.join(ACTIVE).display()
            );
        }
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if last.is_none() {
            // The active file is empty: continue from the newest rotated file, if any.
            let files = log_files(dir).map_err(io_ctx(dir))?;
            if let Some(rot) = files.iter().rev().find(|p| p.file_name().is_some_and(|n| n != ACTIVE)) {
                let mut rf = File::open(rot).map_err(io_ctx(rot))?;
                last = recover_tail(&mut rf).map_err(io_ctx(rot))?.0;
            }
        }
        let (seq, head, signed_through, clean) = match &last {
            None => (0, [0u8; 32], 0, true),
            Some(line) => {
                let v: serde_json::Value = serde_json::from_slice(line)
                    .map_err(|e| format!("audit: the last line does not parse ({e}); run `ephyr audit verify`"))?;
                let seq = v["seq"].as_u64().ok_or("audit: the last line has no seq; run `ephyr audit verify`")?;
                let covers = if v["kind"] == "checkpoint" { v["outcome"]["covers_seq"].as_u64() } else { None };
                let clean = v["event"] == "final_checkpoint" && covers == Some(seq - 1);
                (seq, event::line_hash(line), covers.unwrap_or(0), clean)
            }
        };
        let unsigned_tail = tail_check(dir, seq, clean);
        if let Some(t) = &unsigned_tail {
            log::error!("audit: {}", t.describe());
        }
        let first = if file_len == 0 { seq + 1 } else { seq };
        Ok(Rc::new(AuditLog {
            dir: dir.to_owned(),
            pool,
            config,
            state: RefCell::new(State {
                seq,
                head,
                buf: Vec::with_capacity(64 * 1024),
                waiters: Vec::new(),
                file: Some(file),
                file_len,
                file_first_seq: first,
                failed: None,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                signed_through,
                from_seq: seq + 1,
                durable: (seq, head),
                backoff: RESUME_FIRST,
            }),
            kick: event_listener::Event::new(),
            urgent: event_listener::Event::new(),
            idle: event_listener::Event::new(),
            ids: crate::ids::Monotonic::default(),
            metrics,
            unsigned_tail,
            taps: RefCell::new(Vec::new()),
            observer: RefCell::new(None),
        }))
    }

    /// Lines after the last signature found at open, if any (see [`UnsignedTail`]).
    pub fn unsigned_tail(&self) -> Option<&UnsignedTail> {
        self.unsigned_tail.as_ref()
    }

    /// The last sequence number and chain head (what a live broker vouches for).
    pub fn head(&self) -> (u64, [u8; 32]) {
        let st = self.state.borrow();
        (st.seq, st.head)
    }

    /// The last line on disk (written and synced) and its hash: what the running broker can
    /// vouch for to `ephyr audit verify`. Lines after it are still in memory (a read-only call's
    /// line lingers up to a few milliseconds), so they cannot be asked of the file yet.
    pub fn durable_head(&self) -> (u64, [u8; 32]) {
        self.state.borrow().durable
    }

    /// Whether the log has failed (and why).
    pub fn failure(&self) -> Option<String> {
        self.state.borrow().failed.clone()
    }

    fn append(&self, e: &Event, wait: bool) -> Result<Option<Ticket>, AuditError> {
        let mut st = self.state.borrow_mut();
        if let Some(f) = &st.failed {
            return Err(AuditError::Unavailable(f.clone()));
        }
        let now = crate::time::now();
        let id = self.ids.next(now).to_string();
        st.seq += 1;
        let line = event::encode(e, st.seq, &id, now.0, &st.head);
        st.head = event::line_hash(&line);
        st.buf.extend_from_slice(&line);
        st.since_checkpoint += 1;
        self.feed(&line);
        self.metrics.inc("ephyr_audit_events_total", &[]);
        let ticket = wait.then(|| {
            let (tx, rx) = async_channel::bounded(1);
            st.waiters.push(tx);
            Ticket(rx)
        });
        drop(st);
        self.kick.notify(1);
        if wait {
            self.urgent.notify(1);
        }
        if let Some(f) = &*self.observer.borrow() {
            f(e);
        }
        Ok(ticket)
    }

    /// Sets the one function that sees every event recorded from now on (it must not record).
    pub fn observe(&self, f: Observer) {
        *self.observer.borrow_mut() = Some(f);
    }

    /// A live feed of every line recorded from now on (the console's); `None` when
    /// [`MAX_TAPS`] feeds are open. Dropping the last `Rc` closes it.
    pub fn tap(&self) -> Option<std::rc::Rc<Tap>> {
        let mut taps = self.taps.borrow_mut();
        taps.retain(|t| t.strong_count() > 0);
        if taps.len() >= MAX_TAPS {
            return None;
        }
        let t = std::rc::Rc::new(Tap::default());
        taps.push(std::rc::Rc::downgrade(&t));
        Some(t)
    }

    fn feed(&self, line: &[u8]) {
        let taps = self.taps.borrow();
        for t in taps.iter().filter_map(std::rc::Weak::upgrade) {
            t.push(line);
        }
    }

    /// The flusher: writes and syncs batches until the log fails. Spawn it once.
    pub async fn run_flusher(self: Rc<Self>) {
        loop {
            if self.state.borrow().failed.is_some() {
                self.resume().await;
            }
            let listener = self.kick.listen();
            // Only events nobody waits for (`note`): let more gather, up to LINGER, so a stream
            // of read-only calls costs one write and one sync per LINGER, not one per call. An
            // event someone waits for, or a full buffer, ends the wait at once.
            let lingering = {
                let st = self.state.borrow();
                !st.buf.is_empty() && st.waiters.is_empty() && st.buf.len() < LINGER_BYTES && st.failed.is_none()
            };
            if lingering {
                let urgent = self.urgent.listen();
                let still_lingering = {
                    let st = self.state.borrow();
                    st.waiters.is_empty() && st.buf.len() < LINGER_BYTES
                };
                if still_lingering {
                    futures_lite::future::or(urgent, async {
                        crate::broker::deadline::Deadline::after(LINGER).await;
                    })
                    .await;
                }
            }
            let batch = {
                let mut st = self.state.borrow_mut();
                if st.buf.is_empty() {
                    None
                } else {
                    let file = st.file.take();
                    let upto = (st.seq, st.head);
                    Some((std::mem::take(&mut st.buf), std::mem::take(&mut st.waiters), file, upto))
                }
            };
            let Some((buf, waiters, file, upto)) = batch else {
                self.idle.notify(usize::MAX);
                listener.await;
                continue;
            };
            let Some(mut file) = file else {
                self.fail("the audit file is closed".into(), waiters);
                continue;
            };
            let len = buf.len() as u64;
            let started = Instant::now();
            let result = self
                .pool
                .run(move || -> Result<File, String> {
                    file.write_all(&buf).map_err(|e| e.to_string())?;
                    file.sync_data().map_err(|e| e.to_string())?;
                    Ok(file)
                })
                .await
                .unwrap_or_else(|| Err("the blocking pool stopped".into()));
            match result {
                Ok(file) => {
                    let rotate = {
                        let mut st = self.state.borrow_mut();
                        st.file = Some(file);
                        st.file_len += len;
                        st.durable = upto;
                        st.backoff = RESUME_FIRST;
                        self.metrics.observe(
                            "ephyr_audit_write_duration_seconds",
                            &[],
                            started.elapsed().as_secs_f64(),
                        );
                        st.file_len >= self.config.max_file_bytes
                    };
                    for w in waiters {
                        let _ = w.try_send(Ok(()));
                    }
                    if rotate && let Err(e) = self.rotate() {
                        self.fail(e, Vec::new());
                    }
                }
                Err(e) => self.fail(format!("{}: {e}", self.dir.join(ACTIVE).display()), waiters),
            }
        }
    }

    /// After a failed write (a full disk, an I/O error): waits, then cuts the active file back to
    /// its last synced line (a batch that failed may have left part of itself) and resumes the
    /// chain from that line, recording what happened. The lines that were lost were never
    /// acknowledged: whoever waited for them was refused. Returns once the log takes records
    /// again; while it waits, audited actions are refused with the reason.
    async fn resume(&self) {
        loop {
            let wait = {
                let mut st = self.state.borrow_mut();
                let w = st.backoff;
                st.backoff = (w * 2).min(RESUME_MAX);
                w
            };
            crate::broker::deadline::Deadline::after(wait).await;
            let (written, dir) = (self.state.borrow().file_len, self.dir.clone());
            let reopened = self
                .pool
                .run(move || -> Result<(File, u64), String> {
                    let path = dir.join(ACTIVE);
                    let f = open_active(&dir)?;
                    // Empty after a rotation that failed half way: a new file.
                    let keep = crate::files::cut_back(&f, written, true)
                        .map_err(|e| format!("{}: {e}; run `ephyr audit verify`", path.display()))?;
                    Ok((f, keep))
                })
                .await
                .unwrap_or_else(|| Err("the blocking pool stopped".into()));
            let (file, len) = match reopened {
                Ok(x) => x,
                Err(e) => {
                    log::error!("audit log: cannot resume yet: {e}");
                    self.state.borrow_mut().failed = Some(e);
                    continue;
                }
            };
            let (reason, lost) = {
                let mut st = self.state.borrow_mut();
                let (seq, head) = st.durable;
                let lost = st.seq - seq;
                if len == 0 && st.file_len > 0 {
                    st.file_first_seq = seq + 1;
                }
                st.file = Some(file);
                st.file_len = len;
                st.seq = seq;
                st.head = head;
                (st.failed.take().unwrap_or_default(), lost)
            };
            log::warn!(
                "audit log resumed after a failure ({reason}); {lost} line(s) nobody was told were durable were not written"
            );
            let e = Event::new(Kind::Broker, "audit_resumed")
                .outcome(serde_json::json!({ "after": reason, "lost_lines": lost }));
            let _ = self.append(&e, false);
            return;
        }
    }

    fn fail(&self, reason: String, waiters: Vec<async_channel::Sender<Result<(), AuditError>>>) {
        log::error!("audit log failed, refusing audited actions: {reason}");
        let pending = {
            let mut st = self.state.borrow_mut();
            st.failed = Some(reason.clone());
            self.metrics.inc("ephyr_audit_failures_total", &[]);
            st.buf.clear();
            std::mem::take(&mut st.waiters)
        };
        for w in waiters.into_iter().chain(pending) {
            let _ = w.try_send(Err(AuditError::Unavailable(reason.clone())));
        }
        self.idle.notify(usize::MAX);
    }

    /// Renames the active file to `audit-<first seq>.jsonl` and starts a new one; the chain goes on.
    fn rotate(&self) -> Result<(), String> {
        let first = self.state.borrow().file_first_seq;
        let from = self.dir.join(ACTIVE);
        let to = self.dir.join(format!("audit-{first:020}.jsonl"));
        fs::rename(&from, &to).map_err(io_ctx(&from))?;
        let f = open_active(&self.dir)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_ctx(&self.dir))?;
        let mut st = self.state.borrow_mut();
        st.file = Some(f);
        st.file_len = 0;
        st.file_first_seq = st.seq + 1;
        log::info!("audit: rotated to {}", to.display());
        Ok(())
    }

    /// Waits until everything recorded so far is durable (or the log failed).
    pub async fn flushed(&self) -> Result<(), AuditError> {
        self.urgent.notify(usize::MAX);
        loop {
            let listener = self.idle.listen();
            {
                let st = self.state.borrow();
                if let Some(f) = &st.failed {
                    return Err(AuditError::Unavailable(f.clone()));
                }
                if st.buf.is_empty() && st.file.is_some() {
                    return Ok(());
                }
            }
            listener.await;
        }
    }

    /// Signs the current head and appends a checkpoint line covering it; writes `HEAD` once it is
    /// durable. `final_` marks the last checkpoint of a clean shutdown.
    pub async fn checkpoint(&self, signer: &dyn CheckpointSigner, final_: bool) -> Result<(), String> {
        let (seq, head) = self.head();
        let from = self.state.borrow().from_seq;
        // Nothing of this process to vouch for (it signs only lines it wrote), or nothing new.
        if seq < from || (seq == self.state.borrow().signed_through && !final_) {
            return Ok(());
        }
        let digest = event::checkpoint_digest(Some(from), seq, &head);
        let (sig, key) = signer.sign(digest).await?;
        let b64 = |b: &[u8]| data_encoding::BASE64.encode(b);
        let outcome = serde_json::json!({
            "from_seq": from,
            "covers_seq": seq,
            "covers_hash": data_encoding::HEXLOWER.encode(&head),
            "sig": b64(&sig),
            "key": b64(&key),
        });
        // Also outside the data dir (journald under systemd): a full rewrite of the log and HEAD
        // still disagrees with what was logged here.
        log::info!(
            "audit checkpoint: lines {from}..={seq} hash {} sig {}",
            outcome["covers_hash"].as_str().unwrap_or(""),
            outcome["sig"].as_str().unwrap_or("")
        );
        let name = if final_ { "final_checkpoint" } else { "checkpoint" };
        let ticket =
            self.record(Event::new(Kind::Checkpoint, name).outcome(outcome.clone())).map_err(|e| e.to_string())?;
        {
            let mut st = self.state.borrow_mut();
            st.since_checkpoint = 0;
            st.last_checkpoint = Instant::now();
            st.signed_through = seq;
            self.metrics.inc("ephyr_audit_checkpoints_total", &[]);
        }
        ticket.durable().await.map_err(|e| e.to_string())?;
        // The watermark: what a verifier must find, even if the tail is cut later.
        let head_json = serde_json::json!({ "seq": seq, "hash": outcome["covers_hash"], "sig": outcome["sig"], "key": outcome["key"] });
        let path = self.dir.join(HEAD_FILE);
        let bytes = serde_json::to_vec_pretty(&head_json).unwrap_or_default();
        self.pool
            .run(move || crate::files::write_atomic(&path, &bytes, 0o600))
            .await
            .unwrap_or_else(|| Err(io::Error::other("pool stopped")))
            .map_err(|e| format!("writing audit HEAD: {e}"))
    }

    /// Checkpoints whenever enough events or time have accumulated. Spawn it once.
    pub async fn run_checkpoints(self: Rc<Self>, signer: Rc<dyn CheckpointSigner>) {
        loop {
            crate::broker::deadline::Deadline::after(Duration::from_millis(500)).await;
            let due = {
                let st = self.state.borrow();
                st.failed.is_none()
                    && st.seq > st.signed_through
                    && (st.since_checkpoint >= self.config.checkpoint_every
                        || st.last_checkpoint.elapsed() >= self.config.checkpoint_interval)
            };
            if due && let Err(e) = self.checkpoint(signer.as_ref(), false).await {
                log::warn!("audit checkpoint failed: {e}");
            }
        }
    }
}

impl AuditSink for AuditLog {
    fn record(&self, e: Event) -> Result<Ticket, AuditError> {
        self.append(&e, true).map(|t| t.unwrap_or_else(|| Ticket::ready(Ok(()))))
    }

    fn note(&self, e: Event) -> Result<(), AuditError> {
        self.append(&e, false).map(drop)
    }

    fn failure(&self) -> Option<String> {
        AuditLog::failure(self)
    }
}

impl UnsignedTail {
    /// What it means, for the log and the audit trail.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.lines {
            Some((a, b)) if self.after_clean_stop => parts.push(format!(
                "lines {a}..={b} follow a clean stop and no broker wrote them: someone with write access to the data dir added them; they stay unsigned (`ephyr audit verify` reports them)"
            )),
            Some((a, b)) => parts.push(format!(
                "lines {a}..={b} were never signed (written before a crash, or added to the file); they stay unsigned and cannot be told apart from forged lines"
            )),
            None => {}
        }
        parts.extend(self.head_mismatch.clone());
        parts.join("; ")
    }
}

/// Compares the log's end with `HEAD` (what the broker recorded at its last checkpoint). `clean`:
/// the last line (`seq`) is a final checkpoint covering the line before it.
fn tail_check(dir: &Path, seq: u64, clean: bool) -> Option<UnsignedTail> {
    let head = read_head(dir);
    // The last checkpoint line of the active file: (its seq, what it covers, final). Read only
    // when the end is not clean (a crash or tampering: rare), or to compare with HEAD.
    let last_ckpt = match seq {
        0 => None,
        _ if clean => Some((seq, seq - 1, true)),
        _ => last_checkpoint(dir),
    };
    let covered = last_ckpt.map_or(0, |c| c.1);
    let head_mismatch = match &head {
        Some(h) if h.seq > seq => {
            Some(format!("HEAD vouches for seq {} but the log ends at seq {seq}: it was truncated", h.seq))
        }
        Some(h) if h.seq > covered => Some(format!(
            "HEAD vouches for seq {} but the last checkpoint in the log covers seq {covered}: checkpoints were removed",
            h.seq
        )),
        None if seq > 0 && clean => Some("HEAD is missing although the log ends with a clean stop".into()),
        _ => None,
    };
    let lines = match last_ckpt {
        _ if clean => None,
        Some((at, _, _)) if at >= seq => None,
        Some((at, _, _)) => Some((at + 1, seq)),
        None if seq == 0 => None,
        None => Some((head.as_ref().map_or(1, |h| h.seq + 1).min(seq), seq)),
    };
    let after_clean_stop = lines.is_some() && last_ckpt.is_some_and(|c| c.2);
    (lines.is_some() || head_mismatch.is_some()).then_some(UnsignedTail { lines, after_clean_stop, head_mismatch })
}

/// The last checkpoint line of the active file: (seq, covers_seq, is final). Start-up only.
fn last_checkpoint(dir: &Path) -> Option<(u64, u64, bool)> {
    let text = fs::read(dir.join(ACTIVE)).ok()?;
    text.split(|b| *b == b'\n').rev().filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok()).find_map(
        |v| {
            (v["kind"] == "checkpoint").then(|| {
                (
                    v["seq"].as_u64().unwrap_or(0),
                    v["outcome"]["covers_seq"].as_u64().unwrap_or(0),
                    v["event"] == "final_checkpoint",
                )
            })
        },
    )
}

/// Reads `audit/HEAD` as a verification witness.
pub fn read_head(dir: &Path) -> Option<verify::Witness> {
    let text = fs::read(dir.join(HEAD_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let hash = data_encoding::HEXLOWER.decode(v["hash"].as_str()?.as_bytes()).ok()?.try_into().ok()?;
    Some(verify::Witness { source: dir.join(HEAD_FILE).display().to_string(), seq: v["seq"].as_u64()?, hash })
}

#[cfg(test)]
mod tests;
