//! `ephyr run HOST [--agent NAME | -- COMMAND...] [PROMPT]`: an agent on another host with
//! nothing there worth stealing (docs/runs.md).
//!
//! What runs here, in the CLI process on the broker host: the run is started over the local
//! socket (`POST /v1/runs`: a task from the policy's run template, a certificate for a key made
//! here in memory, disposable keys where the template asks); this process connects to HOST
//! itself (the broker's SSH client on its own runtime thread, host key checked as the broker
//! would), sweeps its stale run directories, makes a private directory (0700, on tmpfs when
//! there is one) holding only the task token, an environment file (base URLs pointing the SDKs
//! at the broker's proxy routes) and an MCP client configuration, and starts the agent in it,
//! with a terminal or without, streaming both ways. A thread renews the run's lease; when the
//! agent exits, the connection drops, or a signal arrives, the run is ended (its task revoked:
//! the token is dead) and the directory removed. If this process dies, the lease runs out and
//! the broker ends the run; the next run on the host removes the directory.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::client;
use crate::broker::reactor::Signals;
use crate::broker::ssh::client::{self as ssh, HostCheck, Input, Output};

/// Exit code when the run could not start or was ended by the broker.
pub const FAILED: u8 = 125;

/// Options.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// The target.
    pub host: String,
    /// A known agent's name.
    pub agent: Option<String>,
    /// Or a command (after `--`).
    pub command: Vec<String>,
    /// A prompt (no terminal: the agent runs to its end).
    pub prompt: Option<String>,
    /// Run template.
    pub template: Option<String>,
    /// Shorter than the template's.
    pub ttl: Option<String>,
    /// Narrower than the template's (JSON).
    pub envelope: Option<String>,
    /// Working directory on the host.
    pub cwd: Option<String>,
    /// Only remove stale run directories on the host.
    pub cleanup: bool,
    /// Force a terminal (`Some(true)`) or none (`Some(false)`); default: when stdin is one.
    pub tty: Option<bool>,
    /// Where the broker is.
    pub broker: Via,
}

/// Where the broker is: its local socket (on the broker host: your uid picks the agent), or its
/// MCP/API listener with the agent's API key (`--url`, key in `EPHYR_TOKEN`).
#[derive(Clone, Debug)]
pub enum Via {
    /// The local socket.
    Socket(PathBuf),
    /// `http://broker:8554` and the agent's API key.
    Url {
        /// Base URL.
        base: String,
        /// The agent's API key (never printed).
        key: zeroize::Zeroizing<String>,
    },
}

impl Default for Via {
    fn default() -> Self {
        Via::Socket(PathBuf::new())
    }
}

impl Via {
    /// One request: (status, JSON body).
    fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(http::StatusCode, Value), String> {
        match self {
            Via::Socket(s) => client::request(s, method, path, body),
            Via::Url { base, key } => {
                let bearer = zeroize::Zeroizing::new(format!("Bearer {}", key.as_str()));
                let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
                let url = format!("{}{path}", base.trim_end_matches('/'));
                let headers = [("authorization", bearer.as_str()), ("content-type", "application/json")];
                let (status, raw) = client::request_tcp(method, &url, &headers, bytes, Duration::from_secs(60))?;
                let v = serde_json::from_slice(&raw)
                    .map_err(|_| format!("{url} answered {status}: {}", String::from_utf8_lossy(&raw).trim()))?;
                Ok((status, v))
            }
        }
    }

    /// One request that must succeed: its JSON body, or the refusal as one line.
    fn request_ok(&self, method: http::Method, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let (status, v) = self.request(method, path, body)?;
        if status.is_success() { Ok(v) } else { Err(client::refusal(status, &v)) }
    }
}

/// A coding agent `--agent` knows: how to start it, give it the MCP configuration and a prompt.
pub struct KnownAgent {
    /// `--agent NAME`.
    pub name: &'static str,
    /// Its program.
    pub program: &'static str,
    /// Arguments that give it the MCP server (`{dir}`: the run directory, `{mcp}`: its URL).
    pub mcp: &'static [&'static str],
    /// Arguments that run one prompt to the end (`{prompt}`).
    pub prompt: &'static [&'static str],
    /// What to know.
    pub note: &'static str,
}

/// The agents `--agent` knows. Any other program works with `-- COMMAND...`.
pub const AGENTS: &[KnownAgent] = &[
    KnownAgent {
        name: "claude",
        program: "claude",
        mcp: &["--mcp-config", "{dir}/mcp.json"],
        prompt: &["-p", "{prompt}"],
        note: "Claude Code: ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY; the broker's tools through --mcp-config",
    },
    KnownAgent {
        name: "codex",
        program: "codex",
        mcp: &["-c", "mcp_servers.ephyr.url=\"{mcp}\"", "-c", "mcp_servers.ephyr.bearer_token_env_var=\"EPHYR_TOKEN\""],
        prompt: &["exec", "{prompt}"],
        note: "Codex CLI: OPENAI_BASE_URL and OPENAI_API_KEY; the broker's tools as MCP server `ephyr`",
    },
    KnownAgent {
        name: "aider",
        program: "aider",
        mcp: &[],
        prompt: &["--yes-always", "--message", "{prompt}"],
        note: "aider: OPENAI_API_BASE/OPENAI_BASE_URL and ANTHROPIC_BASE_URL; it has no MCP client",
    },
    KnownAgent {
        name: "pi",
        program: "pi",
        mcp: &[],
        prompt: &["-p", "{prompt}"],
        note: "pi: OPENAI_* and ANTHROPIC_* variables; it has no MCP client (EPHYR_MCP_CONFIG names the file)",
    },
];

/// A word as the host's POSIX shell reads it, whatever it holds.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The command line that starts the agent on the host, in the run directory's environment.
pub fn agent_command(o: &RunOptions, dir: &str, mcp_url: &str) -> Result<String, String> {
    let words: Vec<String> = match (&o.agent, o.command.is_empty()) {
        (Some(_), false) => return Err("give --agent NAME or -- COMMAND..., not both".into()),
        (None, true) => return Err("nothing to run: give --agent NAME or -- COMMAND...".into()),
        (None, false) => {
            let mut w = o.command.clone();
            if let Some(p) = &o.prompt {
                w.push(p.clone());
            }
            w
        }
        (Some(name), true) => {
            let a = AGENTS.iter().find(|a| a.name == name).ok_or_else(|| {
                format!(
                    "unknown agent {name:?}; known: {} (or run any program with -- COMMAND...)",
                    AGENTS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
                )
            })?;
            let fill = |t: &&str| t.replace("{dir}", dir).replace("{mcp}", mcp_url);
            let mut w = vec![a.program.to_owned()];
            w.extend(a.mcp.iter().map(fill));
            if let Some(p) = &o.prompt {
                w.extend(a.prompt.iter().map(|t| t.replace("{prompt}", p)));
            }
            w
        }
    };
    let cd = match &o.cwd {
        Some(d) => format!("cd {} || exit 1", quote(d)),
        None => "cd 2>/dev/null".into(),
    };
    let argv: Vec<String> = words.iter().map(|w| quote(w)).collect();
    Ok(format!("{cd}; . {}/env && exec {}", quote(dir), argv.join(" ")))
}

/// The run directory's environment file: the task token as every SDK's API key, their base URLs
/// on the broker's proxy routes, the MCP endpoint; a disposable key replaces the token (and the
/// base URL) for its service.
pub fn env_file(started: &Value, dir: &str) -> String {
    let token = started["token"].as_str().unwrap_or_default();
    let mut vars: Vec<(String, String)> = vec![
        ("EPHYR_URL".into(), started["broker_url"].as_str().unwrap_or_default().into()),
        ("EPHYR_MCP_URL".into(), started["mcp_url"].as_str().unwrap_or_default().into()),
        ("EPHYR_MCP_CONFIG".into(), format!("{dir}/mcp.json")),
        ("EPHYR_RUN_ID".into(), started["run_id"].as_str().unwrap_or_default().into()),
        ("EPHYR_TOKEN".into(), token.into()),
    ];
    let keys = &started["keys"];
    let mut seen = std::collections::BTreeSet::new();
    for s in started["services"].as_array().into_iter().flatten() {
        let (Some(name), Some(kind), Some(url)) = (s["service"].as_str(), s["kind"].as_str(), s["base_url"].as_str())
        else {
            continue;
        };
        let upper: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        vars.push((format!("EPHYR_SERVICE_{upper}_URL"), url.into()));
        // The first service of each provider shape sets that provider's variables.
        if !seen.insert(kind.to_owned()) {
            continue;
        }
        let minted = keys[name].as_str();
        match kind {
            "openai" => match minted {
                Some(k) => vars.push(("OPENAI_API_KEY".into(), k.into())),
                None => {
                    vars.push(("OPENAI_BASE_URL".into(), url.into()));
                    vars.push(("OPENAI_API_BASE".into(), url.into()));
                    vars.push(("OPENAI_API_KEY".into(), token.into()));
                }
            },
            "anthropic" => match minted {
                Some(k) => vars.push(("ANTHROPIC_API_KEY".into(), k.into())),
                None => {
                    vars.push(("ANTHROPIC_BASE_URL".into(), url.into()));
                    vars.push(("ANTHROPIC_API_KEY".into(), token.into()));
                }
            },
            _ => {}
        }
    }
    let mut out = String::from("# ephyr run: this run's environment (the token dies with the run)\n");
    for (k, v) in vars {
        out.push_str(&format!("export {k}={}\n", quote(&v)));
    }
    out
}

/// The MCP client configuration (`mcpServers`, as Claude Code, Cursor and the SDK examples read it).
pub fn mcp_config(started: &Value) -> String {
    let token = started["token"].as_str().unwrap_or_default();
    let v = json!({ "mcpServers": { "ephyr": {
        "type": "http",
        "url": started["mcp_url"],
        "headers": { "Authorization": format!("Bearer {token}") },
    }}});
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

/// The host side of a run's directory, in POSIX shell. It removes the account's stale run
/// directories — those of runs this broker knows are over, and those of runs it does not know
/// (another broker's, or forgotten) once they are a day old; never a live run's — and then (the
/// `@RUN@` part) makes this run's, 0700, and prints its path. Candidates in order:
/// `$XDG_RUNTIME_DIR`, `/run/user/<uid>`, `/dev/shm` (tmpfs), then `$TMPDIR` or `/tmp`.
const PREPARE: &str = r#"umask 077
live='@LIVE@ '
ended='@ENDED@ '
for b in @BASES@; do
  [ -n "$b" ] && [ -d "$b" ] || continue
  for d in "$b"/ephyr-run-*; do
    [ -d "$d" ] && [ -O "$d" ] || continue
    id=${d##*/ephyr-run-}; id=${id%%.*}
    case "$live" in *" $id "*) continue ;; esac
    case "$ended" in
      *" $id "*) ;;
      *) [ -n "$(find "$d" -maxdepth 0 -mmin +1440 2>/dev/null)" ] || continue ;;
    esac
    rm -rf -- "$d" && echo "removed $d" >&2
  done
done
"#;

/// Makes this run's directory (appended to [`PREPARE`]).
const MAKE: &str = r#"for b in @BASES@; do
  [ -n "$b" ] && [ -d "$b" ] && [ -w "$b" ] || continue
  d=$(mktemp -d "$b/ephyr-run-@RUN@.XXXXXXXX" 2>/dev/null) || continue
  chmod 700 "$d" && printf '%s\n' "$d" && exit 0
done
echo 'no writable temporary directory' >&2
exit 1
"#;

/// [`PREPARE`] with these runs' ids (only ULID characters pass), and [`MAKE`] for `run`.
pub fn prepare_script(live: &[String], ended: &[String], run: Option<&str>) -> String {
    let words = |ids: &[String]| -> String {
        ids.iter().filter(|i| i.bytes().all(|b| b.is_ascii_alphanumeric())).map(|i| format!(" {i}")).collect()
    };
    let mut s = PREPARE.replace("@LIVE@", &words(live)).replace("@ENDED@", &words(ended));
    if let Some(id) = run.filter(|i| i.bytes().all(|b| b.is_ascii_alphanumeric())) {
        s.push_str(&MAKE.replace("@RUN@", id));
    }
    s.replace("@BASES@", r#""${XDG_RUNTIME_DIR:-}" "/run/user/$(id -u)" /dev/shm "${TMPDIR:-/tmp}""#)
}

enum Event {
    Out(Option<Output>),
    Signal(i32),
    Ended(String),
}

/// Runs a command on `conn` with `input` on its stdin; (exit status, stdout, stderr).
async fn exec_with_input(
    conn: &ssh::Conn,
    command: String,
    input: &[u8],
) -> Result<(Option<u32>, Vec<u8>, Vec<u8>), String> {
    let mut a = conn.attach(command, None).await.map_err(|e| e.to_string())?;
    for piece in input.chunks(16 * 1024) {
        a.input.send(Input::Data(piece.to_vec())).await.map_err(|_| "the host closed the channel".to_string())?;
    }
    let _ = a.input.send(Input::Eof).await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(o) = a.output.recv().await {
        match o {
            Output::Stdout(d) => out.extend_from_slice(&d),
            Output::Stderr(d) => err.extend_from_slice(&d),
            Output::Exit { status, .. } => return Ok((status, out, err)),
            Output::Failed(e) => return Err(e),
        }
    }
    Err("the channel ended without an exit status".into())
}

/// The ids of live and of ended runs (for the sweep: a live run's directory is never touched).
fn run_ids(broker: &Via) -> Result<(Vec<String>, Vec<String>), String> {
    let v = broker.request_ok(http::Method::GET, "/v1/runs", None)?;
    let ids = |k: &str| v[k].as_array().into_iter().flatten().filter_map(|i| i.as_str().map(str::to_owned)).collect();
    Ok((ids("live_ids"), ids("ended_ids")))
}

/// Ends the run (the task is revoked); the broker's view of it, or why not.
fn end(broker: &Via, id: &str, reason: &str, exit: Option<i64>) -> Result<Value, String> {
    broker.request_ok(
        http::Method::POST,
        &format!("/v1/runs/{id}/end"),
        Some(&json!({ "reason": reason, "exit_code": exit })),
    )
}

/// Ends the run on every path out (a panic, an early return): the token must not outlive us.
struct EndGuard<'a> {
    broker: &'a Via,
    id: String,
    armed: bool,
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = end(self.broker, &self.id, "cli_failed", None);
        }
    }
}

/// Runs it; returns the exit code (the agent's, or [`FAILED`]).
pub fn run(o: &RunOptions) -> Result<u8, String> {
    // Checked before anything starts.
    if !o.cleanup {
        agent_command(o, "/dir", "http://x/mcp")?;
    }
    let envelope: Option<Value> = match &o.envelope {
        Some(e) => Some(serde_json::from_str(e).map_err(|e| format!("--envelope: not JSON: {e}"))?),
        None => None,
    };
    let key = ssh::ephemeral_key().map_err(|e| e.to_string())?;
    let label = match (&o.agent, o.command.first()) {
        _ if o.cleanup => "cleanup".to_owned(),
        (Some(a), _) => a.clone(),
        (None, Some(c)) => c.rsplit('/').next().unwrap_or(c).to_owned(),
        (None, None) => "agent".to_owned(),
    };
    let body = json!({
        "host": o.host, "template": o.template, "ttl": o.ttl, "envelope": envelope,
        "label": label, "public_key": ssh::public_openssh(&key),
    });
    let started = o.broker.request_ok(http::Method::POST, "/v1/runs", Some(&body))?;
    let id = started["run_id"].as_str().ok_or("the broker answered without a run id")?.to_owned();
    let mut guard = EndGuard { broker: &o.broker, id: id.clone(), armed: true };
    let lease = Duration::from_secs_f64(started["lease_secs"].as_f64().unwrap_or(30.0).max(3.0));
    eprintln!(
        "ephyr run: run {id} on {} (lease {}s, ends by {})",
        o.host,
        lease.as_secs(),
        started["expires_at"].as_str().unwrap_or("?")
    );
    // From here a signal ends the run properly (delivered to the agent's stream once it runs;
    // during set-up it is read as soon as the stream starts).
    let signals = Signals::new(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH])
        .map_err(|e| format!("signal handlers: {e}"));
    let outcome = signals.and_then(|signals| connected(o, &started, key, &id, lease, &signals));
    guard.armed = false;
    let (code, reason, exit) = match &outcome {
        Ok(Finished { code, reason, exit, .. }) => (*code, reason.clone(), *exit),
        Err(_) => (FAILED, "cli_failed".to_owned(), None),
    };
    let ended = end(&o.broker, &id, &reason, exit);
    if let Ok(Finished { conn: Some(conn), dir: Some(dir), .. }) = &outcome {
        // The token is dead now; its directory goes too.
        let rm = crate::broker::reactor::block_on(exec_with_input(conn, format!("rm -rf -- {}", quote(dir)), b""));
        if !matches!(rm, Ok((Some(0), _, _))) {
            eprintln!("ephyr run: could not remove {dir} on {} (the next run there will)", o.host);
        }
        crate::broker::reactor::block_on(conn.close());
    }
    match ended {
        Ok(v) => {
            let u = &v["usage"];
            eprintln!(
                "ephyr run: run {id} ended ({reason}) after {}s: {} LLM requests, {} input and {} output tokens, {} tool calls ({} commands)",
                v["duration_secs"],
                u["requests"],
                u["input_tokens"],
                u["output_tokens"],
                u["tool_calls"],
                u["commands"]
            );
        }
        Err(e) => eprintln!("ephyr run: ending run {id}: {e}"),
    }
    outcome.map(|_| code)
}

struct Finished {
    code: u8,
    reason: String,
    exit: Option<i64>,
    conn: Option<ssh::Conn>,
    dir: Option<String>,
}

fn connected(
    o: &RunOptions,
    started: &Value,
    key: ssh::Key,
    id: &str,
    lease: Duration,
    signals: &Signals,
) -> Result<Finished, String> {
    let s = &started["ssh"];
    let spec = ssh::ConnectSpec {
        host: s["host"].as_str().unwrap_or_default().to_owned(),
        port: s["port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(22),
        user: s["user"].as_str().unwrap_or_default().to_owned(),
        key,
        cert: ssh::parse_cert(s["certificate"].as_str().unwrap_or_default()).map_err(|e| e.to_string())?,
        host_check: HostCheck::from_json(&s["host_check"])?,
        timeout: Duration::from_secs(15),
    };
    let conn = crate::broker::reactor::block_on(ssh::connect(spec)).map_err(|e| format!("{}: {e}", o.host))?;
    let (live, ended) = run_ids(&o.broker)?;
    let script = prepare_script(&live, &ended, (!o.cleanup).then_some(id));
    let (status, out, err) = crate::broker::reactor::block_on(exec_with_input(&conn, script, b""))?;
    let removed = String::from_utf8_lossy(&err).into_owned();
    for line in removed.lines() {
        eprintln!("ephyr run: {} {line}", o.host);
    }
    if o.cleanup {
        return Ok(Finished { code: 0, reason: "cleanup".into(), exit: Some(0), conn: Some(conn), dir: None });
    }
    let dir = String::from_utf8_lossy(&out).trim().to_owned();
    // Exactly what the script makes (this path is removed at the end: nothing else may pass).
    let ours = dir.rsplit_once('/').is_some_and(|(parent, name)| {
        parent.starts_with('/')
            && !parent.split('/').any(|c| c == ".." || c == ".")
            && name
                .strip_prefix(&format!("ephyr-run-{id}."))
                .is_some_and(|s| s.len() == 8 && s.bytes().all(|b| b.is_ascii_alphanumeric()))
    });
    if status != Some(0) || !ours {
        return Err(format!("{}: no private directory for the run ({})", o.host, removed.trim()));
    }
    let mut finished =
        Finished { code: FAILED, reason: "cli_failed".into(), exit: None, conn: None, dir: Some(dir.clone()) };
    let token = zeroize::Zeroizing::new(started["token"].as_str().unwrap_or_default().as_bytes().to_vec());
    let env = zeroize::Zeroizing::new(env_file(started, &dir).into_bytes());
    let mcp = zeroize::Zeroizing::new(mcp_config(started).into_bytes());
    for (name, content) in [("token", &token), ("env", &env), ("mcp.json", &mcp)] {
        let cmd = format!("umask 077 && cat > {}", quote(&format!("{dir}/{name}")));
        match crate::broker::reactor::block_on(exec_with_input(&conn, cmd, content)) {
            Ok((Some(0), _, _)) => {}
            other => {
                finished.conn = Some(conn);
                let why = match other {
                    Err(e) => e,
                    Ok((_, _, e)) => String::from_utf8_lossy(&e).trim().to_owned(),
                };
                eprintln!("ephyr run: writing {dir}/{name} on {}: {why}", o.host);
                return Ok(finished);
            }
        }
    }
    let command = agent_command(o, &dir, started["mcp_url"].as_str().unwrap_or_default())?;
    let stdin_tty = std::io::stdin().is_terminal();
    let tty = o.tty.unwrap_or(stdin_tty && o.prompt.is_none());
    let size = crate::os::terminal_size(std::os::fd::AsFd::as_fd(&std::io::stdout())).unwrap_or((80, 24));
    let pty = tty.then(|| (std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()), size.0, size.1));
    let (code, reason, exit) = crate::broker::reactor::block_on(stream(
        &conn,
        command,
        pty,
        (&o.broker, id, lease),
        signals,
        stdin_tty && tty,
    ))?;
    finished.code = code;
    finished.reason = reason;
    finished.exit = exit;
    finished.conn = Some(conn);
    Ok(finished)
}

/// Streams the agent both ways until it ends, the run ends, or a signal arrives:
/// (exit code, end reason, the agent's exit status).
async fn stream(
    conn: &ssh::Conn,
    command: String,
    pty: Option<(String, u32, u32)>,
    (broker, id, lease): (&Via, &str, Duration),
    signals: &Signals,
    raw: bool,
) -> Result<(u8, String, Option<i64>), String> {
    let mut a = conn.attach(command, pty).await.map_err(|e| e.to_string())?;
    // Keystrokes go through as bytes (Ctrl-C reaches the agent); restored on every way out.
    let _raw = if raw { crate::os::RawTerminal::enter(std::os::fd::AsFd::as_fd(&std::io::stdin())).ok() } else { None };
    let input = a.input.clone();
    std::thread::Builder::new()
        .name("ephyr-run-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = input.blocking_send(Input::Eof);
                        return;
                    }
                    Ok(n) => {
                        if input.blocking_send(Input::Data(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .map_err(|e| format!("stdin thread: {e}"))?;
    // The lease: renewed three times per lease; a refusal means the broker ended the run.
    let (ended_tx, ended_rx) = async_channel::bounded::<String>(1);
    {
        let (broker, id) = (broker.clone(), id.to_owned());
        std::thread::Builder::new()
            .name("ephyr-run-lease".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(lease / 3);
                    if ended_tx.is_closed() {
                        return;
                    }
                    match broker.request(http::Method::POST, &format!("/v1/runs/{id}/renew"), None) {
                        Ok((s, _)) if s.is_success() => {}
                        Ok((s, v)) if s.is_client_error() => {
                            let _ = ended_tx.send_blocking(client::refusal(s, &v));
                            return;
                        }
                        // The broker is restarting: keep trying (its lease starts again with it).
                        _ => {}
                    }
                }
            })
            .map_err(|e| format!("lease thread: {e}"))?;
    }
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    loop {
        let next = futures_lite::future::or(async { Event::Out(a.output.recv().await) }, async {
            futures_lite::future::or(
                async { signals.next().await.map(Event::Signal).unwrap_or(Event::Signal(0)) },
                async { Event::Ended(ended_rx.recv().await.unwrap_or_default()) },
            )
            .await
        })
        .await;
        match next {
            Event::Out(Some(Output::Stdout(d))) => {
                let _ = out.write_all(&d);
                let _ = out.flush();
            }
            Event::Out(Some(Output::Stderr(d))) => {
                let _ = err.write_all(&d);
                let _ = err.flush();
            }
            Event::Out(Some(Output::Exit { status, signal })) => {
                let code = match (status, &signal) {
                    (Some(s), _) => u8::try_from(s).unwrap_or(255),
                    (None, Some(_)) => 255,
                    (None, None) => FAILED,
                };
                let reason = match signal {
                    Some(sig) => format!("agent_killed_by_{sig}"),
                    None => "agent_exited".into(),
                };
                return Ok((code, reason, status.map(i64::from)));
            }
            Event::Out(Some(Output::Failed(e))) => return Err(e),
            Event::Out(None) => return Ok((FAILED, "disconnected".into(), None)),
            Event::Signal(s) if s == libc::SIGWINCH => {
                if let Some((c, r)) = crate::os::terminal_size(std::os::fd::AsFd::as_fd(&std::io::stdout())) {
                    let _ = a.input.send(Input::Resize(c, r)).await;
                }
            }
            Event::Signal(s) => {
                let name = match s {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    libc::SIGHUP => "SIGHUP",
                    _ => "signal",
                };
                eprintln!("\r\nephyr run: {name}: ending the run");
                let _ = a.input.send(Input::HangUp).await;
                return Ok((130, format!("interrupted_{}", name.to_ascii_lowercase()), None));
            }
            Event::Ended(why) => {
                eprintln!("\r\nephyr run: the broker ended the run: {why}");
                let _ = a.input.send(Input::HangUp).await;
                return Ok((FAILED, "ended_by_broker".into(), None));
            }
        }
    }
}

/// `ephyr runs`.
pub fn list(broker: &Via, as_json: bool) -> Result<(), String> {
    let v = broker.request_ok(http::Method::GET, "/v1/runs", None)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v["runs"]).unwrap_or_default());
        return Ok(());
    }
    let runs = v["runs"].as_array().cloned().unwrap_or_default();
    if runs.is_empty() {
        println!("no runs in the last day");
        return Ok(());
    }
    println!(
        "{:<26}  {:<12}  {:<10}  {:<22}  {:>7}  {:>8}  {:>10}  {:>6}",
        "RUN", "HOST", "AGENT", "STATE", "SECS", "REQUESTS", "TOKENS", "TOOLS"
    );
    for r in runs {
        let state = match r["end_reason"].as_str() {
            Some(why) => why.to_owned(),
            None => format!("live (lease {}s)", r["lease_left_ms"].as_u64().unwrap_or(0) / 1000),
        };
        let u = &r["usage"];
        let tokens = u["input_tokens"].as_u64().unwrap_or(0) + u["output_tokens"].as_u64().unwrap_or(0);
        println!(
            "{:<26}  {:<12}  {:<10}  {:<22}  {:>7}  {:>8}  {:>10}  {:>6}",
            r["id"].as_str().unwrap_or(""),
            r["host"].as_str().unwrap_or(""),
            r["label"].as_str().unwrap_or(""),
            state,
            r["duration_secs"],
            u["requests"],
            tokens,
            u["tool_calls"]
        );
    }
    Ok(())
}

/// `ephyr keys list`.
pub fn keys_list(socket: &std::path::Path, as_json: bool) -> Result<(), String> {
    let v = client::request_ok(socket, http::Method::GET, "/v1/keys", None)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v["keys"]).unwrap_or_default());
        return Ok(());
    }
    let keys = v["keys"].as_array().cloned().unwrap_or_default();
    if keys.is_empty() {
        println!("no disposable keys in the last day");
    }
    for k in keys {
        let state = match k["revoked"].as_str() {
            Some(how) => format!("revoked ({how})"),
            None if k["account"].is_null() => "asked for (no answer yet)".to_owned(),
            None => "live".to_owned(),
        };
        println!(
            "{}  run {}  service {}  account {}  {state}",
            k["id"].as_str().unwrap_or(""),
            k["run_id"].as_str().unwrap_or(""),
            k["service"].as_str().unwrap_or(""),
            k["account"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}

/// `ephyr keys cleanup`: exit 0 when nothing that should be revoked is left.
pub fn keys_cleanup(socket: &std::path::Path, all: bool) -> Result<u8, String> {
    let (status, v) = client::request(socket, http::Method::POST, "/v1/keys/cleanup", Some(&json!({ "all": all })))?;
    if status == http::StatusCode::FORBIDDEN {
        return Err(client::refusal(status, &v));
    }
    println!("revoked {} key(s); {} outstanding", v["revoked"], v["outstanding"]);
    for f in v["failures"].as_array().into_iter().flatten() {
        eprintln!("failed: {}", f.as_str().unwrap_or(""));
    }
    Ok(if status.is_success() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_reach_the_host_shell_intact_and_known_agents_get_their_flags() {
        let o = RunOptions {
            command: vec!["python3".into(), "a b'c".into()],
            prompt: Some("$(rm -rf /)".into()),
            ..Default::default()
        };
        let c = agent_command(&o, "/run/user/1/ephyr-run-X.ab", "http://b/mcp").unwrap();
        assert_eq!(c, "cd 2>/dev/null; . '/run/user/1/ephyr-run-X.ab'/env && exec 'python3' 'a b'\\''c' '$(rm -rf /)'");
        let o = RunOptions {
            agent: Some("claude".into()),
            prompt: Some("fix it".into()),
            cwd: Some("/srv/app".into()),
            ..Default::default()
        };
        let c = agent_command(&o, "/d", "http://b/mcp").unwrap();
        assert_eq!(
            c,
            "cd '/srv/app' || exit 1; . '/d'/env && exec 'claude' '--mcp-config' '/d/mcp.json' '-p' 'fix it'"
        );
        let o = RunOptions { agent: Some("nope".into()), ..Default::default() };
        assert!(agent_command(&o, "/d", "u").unwrap_err().contains("known: claude, codex, aider, pi"));
        let o = RunOptions { agent: Some("pi".into()), command: vec!["x".into()], ..Default::default() };
        assert!(agent_command(&o, "/d", "u").unwrap_err().contains("not both"));
    }

    #[test]
    fn the_environment_points_sdks_at_the_broker_and_holds_no_provider_key() {
        let started = json!({
            "token": "mac_tok", "run_id": "01RUN", "broker_url": "http://b:8554", "mcp_url": "http://b:8554/mcp",
            "services": [
                {"service": "openai", "kind": "openai", "base_url": "http://b:8554/v1/proxy/openai"},
                {"service": "anthropic", "kind": "anthropic", "base_url": "http://b:8554/v1/proxy/anthropic"},
                {"service": "gitea", "kind": "other", "base_url": "http://b:8554/v1/proxy/gitea"}],
            "keys": {},
        });
        let env = env_file(&started, "/d");
        for line in [
            "export OPENAI_BASE_URL='http://b:8554/v1/proxy/openai'",
            "export OPENAI_API_KEY='mac_tok'",
            "export ANTHROPIC_BASE_URL='http://b:8554/v1/proxy/anthropic'",
            "export ANTHROPIC_API_KEY='mac_tok'",
            "export EPHYR_SERVICE_GITEA_URL='http://b:8554/v1/proxy/gitea'",
            "export EPHYR_MCP_CONFIG='/d/mcp.json'",
        ] {
            assert!(env.lines().any(|l| l == line), "{line} missing from\n{env}");
        }
        let mut minted = started.clone();
        minted["keys"] = json!({ "openai": "sk-disposable" });
        let env = env_file(&minted, "/d");
        assert!(env.contains("export OPENAI_API_KEY='sk-disposable'") && !env.contains("OPENAI_BASE_URL"));
        let cfg: Value = serde_json::from_str(&mcp_config(&started)).unwrap();
        assert_eq!(cfg["mcpServers"]["ephyr"]["headers"]["Authorization"], "Bearer mac_tok");
    }

    #[test]
    fn the_sweep_keeps_live_runs_and_ignores_ids_that_are_not_ulids() {
        let s = prepare_script(&["01AAA".into(), "x' ; rm -rf ~".into()], &["01CCC".into()], Some("01BBB"));
        assert!(s.contains("live=' 01AAA '") && s.contains("ended=' 01CCC '"), "{s}");
        assert!(!s.contains("rm -rf ~"));
        assert!(s.contains("ephyr-run-01BBB.XXXXXXXX"));
    }
}
