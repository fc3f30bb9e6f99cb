//! A stdio remote's process as the broker drives it: started as `ephyr __remote-sandbox SPEC`
//! (which confines itself, `confine`, then executes the configured command) with a clean
//! environment, spoken to with one JSON-RPC message per line on its standard input and output.
//!
//! What runs here: the executor thread. Per process three tasks: a writer (one line at a time
//! from a bounded queue), a reader (answers matched to waiting calls by id; `ping` answered;
//! other requests from the server refused, since nothing is relayed to agents;
//! `notifications/{tools,resources,prompts}/list_changed` mark the remote for a re-read;
//! `notifications/progress` for a call that asked for it is relayed) and a logger for its
//! standard error (rate limited, control characters and injected secrets removed). A call whose
//! caller goes away, or that times out, sends `notifications/cancelled` for its request. The
//! [`Proc`] owns the child: dropping it (the remote removed, its command changed, the broker
//! stopping) kills the process and reaps it; `PR_SET_PDEATHSIG` kills it if the broker dies.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt as _;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::broker::reactor::Io;
use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _, FutureExt as _};
use serde_json::{Value, json};

use super::confine::Spec;
use crate::broker::Error;
use crate::broker::policy::StdioCommand;
use crate::broker::upstream::scrub::Scrubber;
use crate::secret::SecretBytes;

/// Lines of standard error logged per [`LOG_WINDOW`]; the rest are counted and dropped.
const LOG_LINES: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);
/// Messages queued for the process before a caller waits.
const QUEUE: usize = 64;

/// What the tasks of one process share with its handle.
#[derive(Default)]
struct Shared {
    /// Calls waiting for their answer, by request id.
    pending: RefCell<HashMap<u64, async_channel::Sender<(Value, usize)>>>,
    /// Calls whose progress notifications are relayed, by request id (= their progress token).
    progress: RefCell<HashMap<u64, crate::broker::dispatch::Progress>>,
    /// Why the process can no longer be spoken to.
    dead: RefCell<Option<String>>,
    /// The server said its tools changed.
    list_changed: Cell<bool>,
    /// Its last line on standard error (sanitized): why it stopped, usually.
    last_words: RefCell<String>,
    /// Standard error reached its end (the process is gone or going).
    stderr_closed: event_listener::Event,
    closed: Cell<bool>,
}

impl Shared {
    fn die(&self, why: String) {
        self.dead.borrow_mut().get_or_insert(why);
        // Waiting calls see their channel close.
        self.pending.borrow_mut().clear();
    }
}

/// A running stdio remote.
pub struct Proc {
    name: String,
    /// The command and confinement it was started with (a reload that changes them restarts it).
    pub command: StdioCommand,
    /// When it started.
    pub started: Instant,
    pid: u32,
    child: RefCell<Option<Child>>,
    out: async_channel::Sender<Vec<u8>>,
    shared: Rc<Shared>,
    /// `initialize` was answered.
    pub initialized: Cell<bool>,
    /// The capabilities it answered `initialize` with.
    pub capabilities: RefCell<Value>,
    _tasks: [smol::Task<()>; 3],
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc").field("name", &self.name).field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Proc {
    /// Starts `command` for remote `name` through `exe __remote-sandbox` with exactly `env`
    /// (secrets included; their values are also removed from its logged standard error), as
    /// the broker's own (unprivileged) account.
    pub fn spawn(
        ex: &smol::LocalExecutor<'static>,
        exe: &std::path::Path,
        name: &str,
        command: &StdioCommand,
        env: Vec<(String, SecretBytes)>,
        max_message: usize,
    ) -> Result<Proc, Error> {
        let spec = Spec {
            argv: command.argv.clone(),
            cwd: command.cwd.clone().unwrap_or_else(|| "/".into()),
            read: command.read.clone(),
            write: command.write.clone(),
            network: command.network,
            memory: command.memory,
            open_files: command.open_files,
            processes: command.processes,
            parent: std::process::id(),
        };
        let spec = serde_json::to_string(&spec).map_err(|e| Error::upstream(e.to_string()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("__remote-sandbox").arg(spec).env_clear();
        if !command.env.contains_key("PATH") {
            cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        cmd.envs(&command.env);
        let mut needles = Vec::new();
        for (k, v) in &env {
            cmd.env(k, std::ffi::OsStr::from_bytes(v.expose()));
            needles
                .extend(crate::broker::upstream::plan::secret_forms(&crate::broker::policy::CredentialKind::Bearer, v));
        }
        drop(env);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let failed = |what: &str, e: std::io::Error| Error::Upstream {
            code: "remote_failed",
            message: format!("remote {name:?}: {what}: {e}"),
        };
        let mut child = cmd.spawn().map_err(|e| failed("starting its command", e))?;
        drop(cmd);
        let pid = child.id();
        let (stdin, stdout, stderr) = match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(i), Some(o), Some(e)) => (i, o, e),
            _ => return Err(Error::upstream(format!("remote {name:?}: no pipes"))),
        };
        let asyncs = (Io::new(stdin), Io::new(stdout), Io::new(stderr));
        let (stdin, stdout, stderr) = match asyncs {
            (Ok(i), Ok(o), Ok(e)) => (i, o, e),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                let _ = child.kill();
                reap(child);
                return Err(failed("its pipes", e));
            }
        };
        let shared = Rc::new(Shared::default());
        let (out, queue) = async_channel::bounded::<Vec<u8>>(QUEUE);
        let tasks = [
            ex.spawn(write_lines(stdin, queue, shared.clone())),
            ex.spawn(read_messages(stdout, out.clone(), shared.clone(), name.to_owned(), max_message)),
            ex.spawn(log_stderr(stderr, shared.clone(), name.to_owned(), Scrubber::new(needles))),
        ];
        log::info!("remote {name:?}: started (pid {pid})");
        Ok(Proc {
            name: name.to_owned(),
            command: command.clone(),
            started: Instant::now(),
            pid,
            child: RefCell::new(Some(child)),
            out,
            shared,
            initialized: Cell::new(false),
            capabilities: RefCell::new(Value::Null),
            _tasks: tasks,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Why it cannot be spoken to, if it cannot.
    pub fn dead(&self) -> Option<String> {
        self.shared.dead.borrow().clone()
    }

    /// Whether the server said its tools changed since they were last read.
    pub fn list_changed(&self) -> bool {
        self.shared.list_changed.get()
    }

    /// Takes the server's "my tools changed" mark.
    pub fn take_list_changed(&self) -> bool {
        self.shared.list_changed.replace(false)
    }

    /// How it ended, as far as known within a second: exit status and last line of standard
    /// error.
    async fn death(&self, why: String) -> String {
        if !self.shared.closed.get() {
            let listener = self.shared.stderr_closed.listen();
            if !self.shared.closed.get() {
                listener
                    .or(async {
                        crate::broker::deadline::Deadline::after(Duration::from_secs(1)).await;
                    })
                    .await;
            }
        }
        let status = self.child.borrow_mut().as_mut().and_then(|c| c.try_wait().ok().flatten());
        let words = self.shared.last_words.borrow().clone();
        let mut out = why;
        if let Some(s) = status {
            out.push_str(&format!(" ({s})"));
        }
        if !words.is_empty() {
            out.push_str(&format!(": {words}"));
        }
        out
    }

    /// Sends one request and waits for its answer (the whole JSON-RPC message, and its size in
    /// bytes) up to `timeout`.
    pub async fn call(
        &self,
        msg: &Value,
        id: u64,
        timeout: Duration,
        progress: Option<(&crate::broker::dispatch::Progress, u64)>,
    ) -> Result<(Value, usize), Error> {
        let gone = |why: String| Error::Upstream {
            code: "remote_failed",
            message: format!("remote {:?} is not running: {why}", self.name),
        };
        if let Some(why) = self.dead() {
            return Err(gone(self.death(why).await));
        }
        let (tx, rx) = async_channel::bounded(1);
        self.shared.pending.borrow_mut().insert(id, tx);
        if let Some((p, token)) = progress {
            self.shared.progress.borrow_mut().insert(token, p.clone());
        }
        let mut guard = InFlight { shared: &self.shared, out: &self.out, id, answered: false };
        let mut line = serde_json::to_vec(msg).map_err(|e| Error::upstream(e.to_string()))?;
        line.push(b'\n');
        let name = &self.name;
        let answer = crate::broker::deadline::within(timeout, async {
            self.out.send(line).await.map_err(|_| ())?;
            rx.recv().await.map_err(|_| ())
        })
        .await
        .unwrap_or(Err(()));
        match answer {
            Ok(v) => {
                guard.answered = true;
                Ok(v)
            }
            Err(()) => match self.dead() {
                Some(why) => Err(gone(self.death(why).await)),
                None => Err(Error::Timeout(format!("remote {name:?} did not answer within {}s", timeout.as_secs()))),
            },
        }
    }

    /// Sends one notification (no answer).
    pub async fn notify(&self, msg: &Value) -> Result<(), Error> {
        let mut line = serde_json::to_vec(msg).map_err(|e| Error::upstream(e.to_string()))?;
        line.push(b'\n');
        self.out.send(line).await.map_err(|_| Error::upstream(format!("remote {:?} is not running", self.name)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.borrow_mut().take() {
            let _ = child.kill();
            reap(child);
            log::info!("remote {:?}: stopped (pid {})", self.name, self.pid);
        }
    }
}

/// Waits for a killed child off the executor thread (it is gone within milliseconds).
fn reap(mut child: Child) {
    let spawned = std::thread::Builder::new().name("ephyr-reap".into()).spawn(move || {
        let _ = child.wait();
    });
    if let Err(e) = spawned {
        log::warn!("could not start a thread to reap a remote's process: {e}");
    }
}

/// A call waiting for its answer. If it is dropped unanswered (its caller went away, or it timed
/// out), the server is told to stop working on it.
struct InFlight<'a> {
    shared: &'a Shared,
    out: &'a async_channel::Sender<Vec<u8>>,
    id: u64,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.pending.borrow_mut().remove(&self.id);
        self.shared.progress.borrow_mut().remove(&self.id);
        if !self.answered && self.shared.dead.borrow().is_none() {
            let note = json!({
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": { "requestId": self.id, "reason": "the caller went away or the call timed out" },
            });
            let mut line = note.to_string().into_bytes();
            line.push(b'\n');
            let _ = self.out.try_send(line);
        }
    }
}

async fn write_lines(mut stdin: Io<ChildStdin>, queue: async_channel::Receiver<Vec<u8>>, shared: Rc<Shared>) {
    while let Ok(line) = queue.recv().await {
        if let Err(e) = stdin.write_all(&line).await.and(stdin.flush().await) {
            shared.die(format!("writing to it failed: {e}"));
            return;
        }
    }
}

async fn read_messages(
    mut stdout: Io<ChildStdout>,
    out: async_channel::Sender<Vec<u8>>,
    shared: Rc<Shared>,
    name: String,
    max_message: usize,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let why = loop {
        let n = match stdout.read(&mut chunk).await {
            Ok(0) => break "it exited".to_owned(),
            Ok(n) => n,
            Err(e) => break format!("reading from it failed: {e}"),
        };
        let scanned = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        let mut from = scanned;
        while let Some(pos) = buf[from..].iter().position(|b| *b == b'\n') {
            let end = from + pos;
            handle(&buf[start..end], &out, &shared, &name);
            start = end + 1;
            from = start;
        }
        buf.drain(..start);
        if buf.len() > max_message {
            break format!("it sent a message over its max_response ({max_message} bytes)");
        }
    };
    log::warn!("remote {name:?}: {why}");
    shared.die(why);
}

/// One line from the server.
fn handle(line: &[u8], out: &async_channel::Sender<Vec<u8>>, shared: &Shared, name: &str) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    let Ok(msg) = serde_json::from_slice::<Value>(line) else {
        log::debug!("remote {name:?}: a line that is not JSON on its output, skipped");
        return;
    };
    let method = msg["method"].as_str();
    match (method, msg.get("id")) {
        (None, Some(id)) => {
            if let Some(tx) = id.as_u64().and_then(|id| shared.pending.borrow_mut().remove(&id)) {
                let _ = tx.try_send((msg, line.len()));
            }
        }
        (Some(m), Some(id)) => {
            // A request from the server: only `ping` is answered; nothing reaches agents.
            let answer = if m == "ping" {
                json!({ "jsonrpc": "2.0", "id": id, "result": {} })
            } else {
                json!({ "jsonrpc": "2.0", "id": id, "error": { "code": -32601, "message": format!("ephyr does not relay {m} to its agents") } })
            };
            let mut bytes = answer.to_string().into_bytes();
            bytes.push(b'\n');
            let _ = out.try_send(bytes);
        }
        (Some(m), None) if m.starts_with("notifications/") && m.ends_with("/list_changed") => {
            shared.list_changed.set(true)
        }
        (Some("notifications/progress"), None) => {
            let token = msg["params"]["progressToken"].as_u64();
            if let Some(p) = token.and_then(|t| shared.progress.borrow().get(&t).cloned()) {
                p.relay(&msg["params"]);
            }
        }
        _ => {}
    }
}

async fn log_stderr(mut stderr: Io<ChildStderr>, shared: Rc<Shared>, name: String, mut scrub: Scrubber) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let (mut window, mut logged, mut dropped) = (Instant::now(), 0u32, 0u64);
    loop {
        let n = match stderr.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&scrub.push(&chunk[..n]));
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let text = sanitize(&line);
            if text.is_empty() {
                continue;
            }
            if window.elapsed() >= LOG_WINDOW {
                if dropped > 0 {
                    log::info!("remote {name:?}: {dropped} line(s) of its standard error not logged");
                }
                (window, logged, dropped) = (Instant::now(), 0, 0);
            }
            if logged < LOG_LINES {
                log::info!("remote {name:?}: {text}");
                logged += 1;
            } else {
                dropped += 1;
            }
            *shared.last_words.borrow_mut() = text;
        }
        if buf.len() > 64 * 1024 {
            buf.clear();
        }
    }
    let rest = scrub.finish();
    buf.extend_from_slice(&rest);
    let text = sanitize(&buf);
    if !text.is_empty() {
        log::info!("remote {name:?}: {text}");
        *shared.last_words.borrow_mut() = text;
    }
    shared.closed.set(true);
    shared.stderr_closed.notify(usize::MAX);
}

/// A line fit for the log: printable characters only, at most 300 of them.
fn sanitize(line: &[u8]) -> String {
    String::from_utf8_lossy(line).chars().filter(|c| !c.is_control()).take(300).collect::<String>().trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_reach_their_caller_and_requests_from_the_server_are_answered_not_relayed() {
        let shared = Shared::default();
        let (out, queue) = async_channel::bounded(4);
        let (tx, rx) = async_channel::bounded(1);
        shared.pending.borrow_mut().insert(7, tx);
        handle(br#"{"jsonrpc":"2.0","id":7,"result":{"ok":true}}"#, &out, &shared, "r");
        assert_eq!(rx.try_recv().unwrap().0["result"]["ok"], true);
        handle(br#"{"jsonrpc":"2.0","id":"s1","method":"ping"}"#, &out, &shared, "r");
        handle(br#"{"jsonrpc":"2.0","id":9,"method":"sampling/createMessage","params":{}}"#, &out, &shared, "r");
        let pong: Value = serde_json::from_slice(&queue.try_recv().unwrap()).unwrap();
        assert_eq!(pong, json!({"jsonrpc":"2.0","id":"s1","result":{}}));
        let refused: Value = serde_json::from_slice(&queue.try_recv().unwrap()).unwrap();
        assert_eq!(refused["error"]["code"], -32601);
        handle(b"not json at all", &out, &shared, "r");
        handle(br#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#, &out, &shared, "r");
        assert!(shared.list_changed.get());
        assert!(queue.try_recv().is_err(), "nothing else was written");
    }

    #[test]
    fn logged_lines_lose_control_characters_and_length() {
        assert_eq!(sanitize(b"\x1b[31mred\x1b[0m\r\n"), "[31mred[0m");
        assert_eq!(sanitize(&[b'a'; 1000]).len(), 300);
    }
}
