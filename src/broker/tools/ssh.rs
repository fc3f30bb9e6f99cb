//! SSH tools: `exec`, `session_create`, `session_input`, `session_close`, `list_sessions`,
//! `list_certs`. The
//! work is in `broker::ssh`; these turn arguments into calls and results into the Go project's
//! output shapes (plus our additions: truncation flags, exit signal, timeout, certificate serial).

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Ctx, Needs, Output, OutputShape, Param, ParamType, ToolDef};
use crate::broker::Error;
use crate::broker::ssh::{self, Ran};
use crate::mcp::types::Annotations;

/// A terminal's columns or rows.
const TERMINAL_SIZE: ParamType = ParamType::Integer { min: ssh::pty::MIN_SIZE as i64, max: ssh::pty::MAX_SIZE as i64 };

const READ_ONLY: Annotations = Annotations { read_only: true, destructive: false, idempotent: true, open_world: false };

/// `exec`.
pub static EXEC: ToolDef = ToolDef {
    name: "exec",
    title: "Run a command over SSH",
    description: "Run a shell command on a target as a role, with a fresh short-lived certificate (or on an open \
                  session with session_id). Returns stdout, stderr (each capped at limits.output_max, 1 MiB by default, with a truncation flag), \
                  the exit code and timings. No terminal, no stdin.",
    params: &[
        Param {
            name: "target",
            ty: ParamType::String,
            required: false,
            description: "Target name from list_targets (not needed with session_id)",
        },
        Param {
            name: "role",
            ty: ParamType::String,
            required: false,
            description: "Role to use on the target (not needed with session_id)",
        },
        Param { name: "command", ty: ParamType::String, required: true, description: "Shell command to run" },
        Param {
            name: "timeout",
            ty: ParamType::Integer { min: 1, max: ssh::MAX_TIMEOUT_SECS },
            required: false,
            description: "Seconds before the command is killed (default 30)",
        },
        Param { name: "session_id", ty: ParamType::String, required: false, description: "Run on this open session" },
    ],
    annotations: Annotations { read_only: false, destructive: true, idempotent: false, open_world: true },
    output: OutputShape::Object(&[
        ("stdout", "string"),
        ("stderr", "string"),
        ("exit_code", "integer"),
        ("target", "string"),
        ("role", "string"),
        ("timed_out", "boolean"),
        ("cert_serial", "string"),
    ]),
    needs: Needs::AnyTarget,
    run: |cx| Box::pin(exec(cx)),
};

/// `session_create`.
pub static SESSION_CREATE: ToolDef = ToolDef {
    name: "session_create",
    title: "Open an SSH session",
    description: "Open a persistent SSH connection to a target as a role; pass its session_id to exec to run \
                  commands without reconnecting (much faster). mode \"exec\" (default): each command runs in a \
                  fresh shell, nothing carries over between commands. mode \"shell\": one shell runs every command \
                  in turn, so the working directory (cd), shell variables and exported environment (export) carry \
                  over; every command is still checked by the policy; a command that exits the shell, times out or \
                  passes the output cap ends the session; it lasts at most as long as its certificate. mode \
                  \"pty\": a terminal (cols x rows, default 120x40) running the login shell, for interactive programs: \
                  send keystrokes with session_input and read what the screen printed; everything the shell keeps \
                  (directory, environment, running programs) carries over; only where no command policy applies \
                  (keystrokes cannot be checked); it lasts at most as long as its certificate. Sessions close after \
                  limits.session_idle (5 minutes by default) \
                  without use, after limits.session_max if the policy sets one, or when the task ends.",
    params: &[
        Param { name: "target", ty: ParamType::String, required: true, description: "Target name from list_targets" },
        Param { name: "role", ty: ParamType::String, required: true, description: "Role to use on the target" },
        Param {
            name: "mode",
            ty: ParamType::Enum(&["exec", "shell", "pty"]),
            required: false,
            description: "exec (default): nothing carries over; shell: cd and export carry over between commands; \
                          pty: a terminal for interactive programs (session_input)",
        },
        Param {
            name: "cols",
            ty: TERMINAL_SIZE,
            required: false,
            description: "Terminal columns (mode pty; default 120)",
        },
        Param { name: "rows", ty: TERMINAL_SIZE, required: false, description: "Terminal rows (mode pty; default 40)" },
    ],
    annotations: Annotations { read_only: false, destructive: false, idempotent: false, open_world: true },
    output: OutputShape::Object(&[
        ("session_id", "string"),
        ("target", "string"),
        ("role", "string"),
        ("status", "string"),
    ]),
    needs: Needs::AnyTarget,
    run: |cx| Box::pin(session_create(cx)),
};

/// `session_input`.
pub static SESSION_INPUT: ToolDef = ToolDef {
    name: "session_input",
    title: "Type into a terminal session",
    description: "Send keystrokes to a terminal session (session_create with mode \"pty\") and return what the \
                  terminal printed: until it has been quiet for 0.2 s after output started, or wait_ms has passed \
                  (default 1000), at most limits.output_max per call (1 MiB by default; the rest comes with the next call: send \"\" to read more). \
                  Keys are characters: \"\\r\" is Enter, \"\\u0003\" Ctrl-C, \"\\u0004\" Ctrl-D, \"\\u001b\" Escape. \
                  The output is the raw terminal stream (with escape sequences). cols and rows resize the terminal \
                  first. Every call is audited and recorded, keystrokes included.",
    params: &[
        Param { name: "session_id", ty: ParamType::String, required: true, description: "The terminal session" },
        Param {
            name: "input",
            ty: ParamType::String,
            required: true,
            description: "Keystrokes to send (may be empty)",
        },
        Param {
            name: "wait_ms",
            ty: ParamType::Integer { min: 0, max: 30_000 },
            required: false,
            description: "Longest wait for output in milliseconds (default 1000)",
        },
        Param { name: "cols", ty: TERMINAL_SIZE, required: false, description: "Resize to this many columns first" },
        Param { name: "rows", ty: TERMINAL_SIZE, required: false, description: "Resize to this many rows first" },
    ],
    annotations: Annotations { read_only: false, destructive: true, idempotent: false, open_world: true },
    output: OutputShape::Object(&[("output", "string"), ("session_id", "string"), ("ended", "boolean")]),
    needs: Needs::AnyTerminalTarget,
    run: |cx| Box::pin(session_input(cx)),
};

/// `session_close`.
pub static SESSION_CLOSE: ToolDef = ToolDef {
    name: "session_close",
    title: "Close an SSH session",
    description: "Close a persistent SSH session.",
    params: &[Param { name: "session_id", ty: ParamType::String, required: true, description: "Session to close" }],
    annotations: Annotations { read_only: false, destructive: false, idempotent: true, open_world: false },
    output: OutputShape::Object(&[("session_id", "string"), ("status", "string"), ("commands", "integer")]),
    needs: Needs::AnyTarget,
    run: |cx| Box::pin(session_close(cx)),
};

/// `list_sessions`.
pub static LIST_SESSIONS: ToolDef = ToolDef {
    name: "list_sessions",
    title: "List SSH sessions",
    description: "List your open SSH sessions.",
    params: &[],
    annotations: READ_ONLY,
    output: OutputShape::List("sessions"),
    needs: Needs::AnyTarget,
    run: |cx| {
        Box::pin(async move {
            let v: Vec<Value> = cx.ssh.sessions_of(cx.policy, cx.caller).iter().map(|s| s.view()).collect();
            Output::data(&v)
        })
    },
};

/// `list_certs`.
pub static LIST_CERTS: ToolDef = ToolDef {
    name: "list_certs",
    title: "List SSH certificates",
    description: "List the SSH certificates issued to you that are still valid (serial, target, role, validity, \
                  and whether the broker still holds the key).",
    params: &[],
    annotations: READ_ONLY,
    output: OutputShape::List("certificates"),
    needs: Needs::AnyTarget,
    run: |cx| Box::pin(async move { Output::data(&list_certs(&cx)) }),
};

fn arg<'a>(args: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str)
}

fn failed(f: Error, action: Map<String, Value>) -> Output {
    let mut o = Output::failed(f);
    o.action = action;
    o
}

fn exec_output(
    ran: &Ran,
    target: &str,
    role: &str,
    session: Option<&str>,
    (total, timeout): (Duration, Duration),
    cap: usize,
) -> Value {
    let r = &ran.result;
    let mut stderr = String::from_utf8_lossy(&r.stderr).into_owned();
    if r.timed_out {
        stderr.push_str(&format!("\n[killed: timeout after {}s]", timeout.as_secs()));
    }
    if r.stdout_truncated || r.stderr_truncated {
        stderr.push_str(&format!("\n[killed: output passed the {cap}-byte cap (limits.output_max)]"));
    }
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
    let mut v = json!({
        "stdout": String::from_utf8_lossy(&r.stdout),
        "stderr": stderr,
        "exit_code": r.exit_status.map_or(-1, i64::from),
        "target": target,
        "role": role,
        "duration_ms": ms(total),
        "timings": {
            "cert_ms": ms(ran.connect),
            "ssh_ms": ms(r.duration),
            "total_ms": ms(total),
            "session": session.is_some(),
        },
        "stdout_truncated": r.stdout_truncated,
        "stderr_truncated": r.stderr_truncated,
        "timed_out": r.timed_out,
        "exit_signal": r.exit_signal,
        "cert_serial": format!("{:016x}", ran.serial),
    });
    if let Some(s) = session {
        v["session_id"] = Value::from(s);
    }
    if let Some(w) = &ran.host_key_warning {
        v["host_key_warning"] = Value::from(w.as_str());
    }
    if let Some(id) = &ran.recording {
        v["recording_id"] = Value::from(id.as_str());
    }
    if let Some(n) = &ran.notice {
        v["notice"] = Value::from(n.as_str());
    }
    v
}

async fn exec(cx: Ctx<'_>) -> Output {
    let started = std::time::Instant::now();
    let command = arg(cx.args, "command").unwrap_or_default();
    let timeout =
        Duration::from_secs(cx.args.get("timeout").and_then(Value::as_u64).unwrap_or(ssh::DEFAULT_TIMEOUT.as_secs()));
    let session = arg(cx.args, "session_id");
    let (target, role, ran) = match session {
        Some(id) => {
            let s = match cx.ssh.session_for(cx.policy, cx.caller, id) {
                Ok(s) => s,
                Err(f) => return failed(f, Map::new()),
            };
            for (k, v) in [("target", &s.target), ("role", &s.role)] {
                if arg(cx.args, k).is_some_and(|a| a != v.as_str()) {
                    return Output::error(format!(
                        "argument {k:?} does not match session {id:?}, which is on {}/{}",
                        s.target, s.role
                    ));
                }
            }
            let r = cx.ssh.session_exec(asker(&cx), id, command, timeout).await;
            (s.target.clone(), s.role.clone(), r)
        }
        None => {
            let (Some(target), Some(role)) = (arg(cx.args, "target"), arg(cx.args, "role")) else {
                return Output::error("invalid arguments: \"target\" and \"role\" are required without \"session_id\"");
            };
            let r = cx.ssh.exec_once(asker(&cx), target, role, command, timeout).await;
            (target.to_owned(), role.to_owned(), r)
        }
    };
    let mut action = Map::new();
    action.insert("target".into(), Value::from(target.as_str()));
    action.insert("role".into(), Value::from(role.as_str()));
    // What was tried, also when it was refused (an operator wants to see that).
    action.insert("command".into(), Value::from(ssh::audit_command(command)));
    if let Some(s) = session {
        action.insert("session".into(), Value::from(s));
    }
    match ran {
        Ok(ran) => {
            let how = if ran.result.timed_out {
                "timeout"
            } else if ran.result.stdout_truncated || ran.result.stderr_truncated {
                "output_cap"
            } else {
                "exited"
            };
            cx.ports.metrics.inc("ephyr_ssh_commands_total", &[("outcome", how)]);
            let mut o = Output::data(&exec_output(
                &ran,
                &target,
                &role,
                session,
                (started.elapsed(), timeout),
                cx.policy.limits.output_max,
            ));
            o.outcome.insert("exit_code".into(), ran.result.exit_status.map_or(Value::from(-1), Value::from));
            o.outcome.insert("serial".into(), Value::from(format!("{:016x}", ran.serial)));
            o.outcome.insert("ended".into(), Value::from(how));
            o.action = action;
            o
        }
        Err(f) => {
            cx.ports.metrics.inc("ephyr_ssh_commands_total", &[("outcome", "failed")]);
            failed(f, action)
        }
    }
}

async fn session_create(cx: Ctx<'_>) -> Output {
    let target = arg(cx.args, "target").unwrap_or_default();
    let role = arg(cx.args, "role").unwrap_or_default();
    let mut action = Map::new();
    action.insert("target".into(), Value::from(target));
    action.insert("role".into(), Value::from(role));
    let size = |k: &str, d: u64| cx.args.get(k).and_then(Value::as_u64).unwrap_or(d) as u32;
    let mode = match arg(cx.args, "mode") {
        Some("shell") => ssh::Mode::Shell,
        Some("pty") => ssh::Mode::Pty { cols: size("cols", 120), rows: size("rows", 40) },
        _ => ssh::Mode::Exec,
    };
    if mode == ssh::Mode::Exec || mode == ssh::Mode::Shell {
        for k in ["cols", "rows"] {
            if cx.args.contains_key(k) {
                return Output::error(format!("invalid arguments: {k:?} is for mode \"pty\" only"));
            }
        }
    }
    match cx.ssh.session_create(asker(&cx), target, role, mode).await {
        Ok((s, warning)) => {
            let mut v = s.view();
            v["status"] = Value::from("open");
            v["idle_timeout_secs"] = Value::from(cx.policy.limits.session_idle.as_secs());
            if let Some(m) = cx.policy.limits.session_max {
                v["max_lifetime_secs"] = Value::from(m.as_secs());
            }
            if let Some(w) = warning {
                v["host_key_warning"] = Value::from(w);
            }
            let mut o = Output::data(&v);
            o.outcome.insert("session".into(), Value::from(s.id.as_str()));
            o.action = action;
            o
        }
        Err(f) => failed(f, action),
    }
}

async fn session_input(cx: Ctx<'_>) -> Output {
    let id = arg(cx.args, "session_id").unwrap_or_default();
    let input = arg(cx.args, "input").unwrap_or_default();
    let wait = Duration::from_millis(cx.args.get("wait_ms").and_then(Value::as_u64).unwrap_or(1000));
    let size = match (cx.args.get("cols").and_then(Value::as_u64), cx.args.get("rows").and_then(Value::as_u64)) {
        (None, None) => None,
        (Some(c), Some(r)) => Some((c as u32, r as u32)),
        _ => return Output::error("invalid arguments: \"cols\" and \"rows\" go together"),
    };
    let mut action = Map::new();
    action.insert("session".into(), Value::from(id));
    action.insert("input".into(), Value::from(ssh::audit_command(input)));
    match cx.ssh.session_input(asker(&cx), id, input, size, wait).await {
        Ok(ran) => {
            let r = &ran.result;
            let mut v = json!({
                "session_id": id,
                "output": String::from_utf8_lossy(&r.stdout),
                "more": r.stdout_truncated,
                "ended": ran.notice.is_some(),
                "exit_code": r.exit_status,
                "duration_ms": (r.duration.as_secs_f64() * 100_000.0).round() / 100.0,
            });
            if let Some(id) = &ran.recording {
                v["recording_id"] = Value::from(id.as_str());
            }
            if let Some(n) = &ran.notice {
                v["notice"] = Value::from(n.as_str());
            }
            let mut o = Output::data(&v);
            o.outcome.insert("bytes".into(), Value::from(r.stdout.len()));
            o.action = action;
            o
        }
        Err(f) => failed(f, action),
    }
}

async fn session_close(cx: Ctx<'_>) -> Output {
    let id = arg(cx.args, "session_id").unwrap_or_default();
    match cx.ssh.session_for(cx.policy, cx.caller, id) {
        Ok(s) => {
            cx.ops.close_session(&super::tasks::actor(&cx), &s).await;
            let mut o = Output::data(&json!({ "session_id": id, "status": "closed", "commands": s.commands() }));
            o.action.insert("session".into(), Value::from(id));
            o
        }
        Err(f) => failed(f, Map::new()),
    }
}

fn list_certs(cx: &Ctx<'_>) -> Vec<Value> {
    let now = crate::time::now().secs().max(0) as u64;
    let caller = cx.caller;
    cx.ssh
        .registry
        .list(now, |c| {
            c.agent == caller.agent
                && match caller.token() {
                    None => true,
                    Some(t) => c.lineage.contains(&t.task),
                }
        })
        .iter()
        .map(cert_json)
        .collect()
}

/// A certificate as `list_certs` (and the local API) show it; the serial in hex and in decimal
/// (as `ssh-keygen -L` and sshd's log print it).
pub(crate) fn cert_json(l: &crate::broker::ssh::registry::Listed) -> Value {
    json!({
        "serial": format!("{:016x}", l.cert.serial),
        "serial_decimal": l.cert.serial.to_string(),
        "key_id": l.cert.key_id,
        "agent": l.cert.agent,
        "target": l.cert.target,
        "role": l.cert.role,
        "principal": l.cert.principal,
        "task_id": l.cert.task,
        "session_id": l.cert.session,
        "valid_after": crate::time::format_rfc3339(l.cert.valid_after as i64, None),
        "valid_before": crate::time::format_rfc3339(l.cert.valid_before as i64, None),
        "in_use": l.in_use,
        "revoked": l.revoked_at.is_some(),
    })
}

fn asker<'a>(cx: &'a Ctx<'a>) -> crate::broker::ssh::Asker<'a> {
    crate::broker::ssh::Asker { ports: cx.ports, caller: cx.caller, policy: cx.policy, arguments: cx.arguments() }
}
