//! File tools over SFTP: `file_read`, `file_write`, `file_list`. The work is in
//! `broker::ssh::files`; these turn arguments into a [`FileOp`] and results into JSON.

use std::time::Duration;

use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use super::{Ctx, Needs, Output, OutputShape, Param, ParamType, ToolDef};
use crate::broker::ssh::files::{FileDone, FileOp, FileRan};
use crate::broker::ssh::sftp::Expect;
use crate::mcp::types::Annotations;

/// How long a file tool may take when the call names no timeout.
const DEFAULT_TIMEOUT: u64 = 30;

const TARGET: Param =
    Param { name: "target", ty: ParamType::String, required: true, description: "Target name from list_targets" };
const ROLE: Param =
    Param { name: "role", ty: ParamType::String, required: true, description: "Role to use on the target" };
const TIMEOUT: Param = Param {
    name: "timeout",
    ty: ParamType::Integer { min: 1, max: 600 },
    required: false,
    description: "Seconds before the operation is abandoned (default 30; a write that runs out of time is not applied)",
};

/// `file_read`.
pub static FILE_READ: ToolDef = ToolDef {
    name: "file_read",
    title: "Read a file over SFTP",
    description: "Read a regular file on a target as a role (SFTP, a fresh short-lived certificate). The path is \
                  absolute; the target resolves symbolic links and the resolved path is what the policy checks and \
                  what is read. Returns the content (UTF-8 text, or base64 with encoding \"base64\" when it is not \
                  text), its size, and its SHA-256 when the whole file was read (pass it to file_write as \
                  expected_sha256 for a safe edit). At most limits.file_max_size bytes per call (default 1 MiB); \
                  read larger files in parts with offset.",
    params: &[
        TARGET,
        ROLE,
        Param { name: "path", ty: ParamType::String, required: true, description: "Absolute path of the file" },
        Param {
            name: "offset",
            ty: ParamType::Integer { min: 0, max: i64::MAX },
            required: false,
            description: "Byte offset to start at (default 0)",
        },
        Param {
            name: "max_bytes",
            ty: ParamType::Integer { min: 1, max: 64 << 20 },
            required: false,
            description: "Most bytes to return (default and upper bound: limits.file_max_size)",
        },
        TIMEOUT,
    ],
    annotations: Annotations { read_only: true, destructive: false, idempotent: true, open_world: true },
    output: OutputShape::Object(&[
        ("content", "string"),
        ("encoding", "string"),
        ("size", "integer"),
        ("resolved_path", "string"),
    ]),
    needs: Needs::AnyFileTarget(false),
    run: |cx| Box::pin(file_read(cx)),
};

/// `file_write`.
pub static FILE_WRITE: ToolDef = ToolDef {
    name: "file_write",
    title: "Write a file over SFTP",
    description: "Replace (or create) a file on a target as a role, atomically: the content goes to a temporary \
                  file beside it, which then replaces the file in one rename, so readers see the old or the new \
                  content, never a mix. The path is absolute; the target resolves symbolic links and the resolved \
                  path is what the policy checks and what is written. An existing file keeps its permission bits; \
                  a new one gets mode (default 0644). expected_sha256 makes the write safe against a concurrent \
                  change: the file must still have this SHA-256 (from file_read), or \"absent\" if it must not \
                  exist yet. At most limits.file_max_size bytes (default 1 MiB).",
    params: &[
        TARGET,
        ROLE,
        Param { name: "path", ty: ParamType::String, required: true, description: "Absolute path of the file" },
        Param { name: "content", ty: ParamType::String, required: true, description: "The new content" },
        Param {
            name: "encoding",
            ty: ParamType::Enum(&["utf8", "base64"]),
            required: false,
            description: "How content is given: utf8 (default) or base64",
        },
        Param {
            name: "expected_sha256",
            ty: ParamType::String,
            required: false,
            description: "The SHA-256 (hex) the file must have now, or \"absent\": the write is refused otherwise",
        },
        Param {
            name: "mode",
            ty: ParamType::String,
            required: false,
            description: "Octal permission bits of a new file, like \"0640\" (default 0644)",
        },
        TIMEOUT,
    ],
    annotations: Annotations { read_only: false, destructive: true, idempotent: true, open_world: true },
    output: OutputShape::Object(&[
        ("sha256", "string"),
        ("bytes", "integer"),
        ("created", "boolean"),
        ("resolved_path", "string"),
    ]),
    needs: Needs::AnyFileTarget(true),
    run: |cx| Box::pin(file_write(cx)),
};

/// `file_list`.
pub static FILE_LIST: ToolDef = ToolDef {
    name: "file_list",
    title: "List a directory over SFTP",
    description: "List a directory on a target as a role (SFTP): name, type (file, dir, symlink, other), size, \
                  octal mode and modification time of each entry, sorted by name, at most 1000 (truncated says \
                  whether there were more). The path is absolute; the target resolves symbolic links and the \
                  resolved path is what the policy checks.",
    params: &[
        TARGET,
        ROLE,
        Param { name: "path", ty: ParamType::String, required: true, description: "Absolute path of the directory" },
        TIMEOUT,
    ],
    annotations: Annotations { read_only: true, destructive: false, idempotent: true, open_world: true },
    output: OutputShape::Object(&[("entries", "array"), ("truncated", "boolean"), ("resolved_path", "string")]),
    needs: Needs::AnyFileTarget(false),
    run: |cx| Box::pin(file_list(cx)),
};

fn arg<'a>(args: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str)
}

/// Parses `expected_sha256`.
fn expect(v: Option<&str>) -> Result<Expect, String> {
    match v {
        None => Ok(Expect::Any),
        Some("absent") => Ok(Expect::Absent),
        Some(h) => {
            let bytes = data_encoding::HEXLOWER_PERMISSIVE
                .decode(h.as_bytes())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| format!("argument \"expected_sha256\" is 64 hex digits or \"absent\", not {h:?}"))?;
            Ok(Expect::Sha256(bytes))
        }
    }
}

/// Parses `mode` (octal permission bits, no file type, no set-id bits).
fn mode(v: Option<&str>) -> Result<Option<u32>, String> {
    let Some(m) = v else { return Ok(None) };
    match u32::from_str_radix(m, 8) {
        Ok(n) if n <= 0o777 && !m.is_empty() && m.len() <= 4 => Ok(Some(n)),
        _ => Err(format!("argument \"mode\" is octal permission bits from 0000 to 0777, like \"0640\", not {m:?}")),
    }
}

/// Runs `op`, and shapes the result or the failure (with what was tried, for the audit line).
async fn run(cx: Ctx<'_>, op: FileOp, shape: impl FnOnce(&FileRan) -> Value) -> Output {
    let (target, role, path) = (arg(cx.args, "target"), arg(cx.args, "role"), arg(cx.args, "path"));
    let (target, role, path) = (target.unwrap_or_default(), role.unwrap_or_default(), path.unwrap_or_default());
    let timeout = Duration::from_secs(cx.args.get("timeout").and_then(Value::as_u64).unwrap_or(DEFAULT_TIMEOUT));
    let mut action = Map::new();
    action.insert("target".into(), Value::from(target));
    action.insert("role".into(), Value::from(role));
    action.insert("path".into(), Value::from(path));
    let tool = op.tool();
    let asker =
        crate::broker::ssh::Asker { ports: cx.ports, caller: cx.caller, policy: cx.policy, arguments: cx.arguments() };
    match cx.ssh.file(asker, (target, role), path, op, timeout).await {
        Ok(ran) => {
            cx.ports.metrics.inc("ephyr_ssh_files_total", &[("op", tool), ("outcome", "ok")]);
            let mut v = shape(&ran);
            v["target"] = Value::from(target);
            v["role"] = Value::from(role);
            v["path"] = Value::from(path);
            v["resolved_path"] = Value::from(ran.resolved.as_str());
            v["cert_serial"] = Value::from(format!("{:016x}", ran.serial));
            if let Some(w) = &ran.host_key_warning {
                v["host_key_warning"] = Value::from(w.as_str());
            }
            let mut o = Output::data(&v);
            o.outcome.insert("resolved_path".into(), Value::from(ran.resolved.as_str()));
            o.outcome.insert("serial".into(), Value::from(format!("{:016x}", ran.serial)));
            if let FileDone::Write(_, hash, bytes) = &ran.done {
                o.outcome.insert("sha256".into(), Value::from(data_encoding::HEXLOWER.encode(hash)));
                o.outcome.insert("bytes".into(), Value::from(*bytes));
            }
            o.action = action;
            o
        }
        Err(e) => {
            cx.ports.metrics.inc("ephyr_ssh_files_total", &[("op", tool), ("outcome", "failed")]);
            let mut o = Output::failed(e);
            o.action = action;
            o
        }
    }
}

async fn file_read(cx: Ctx<'_>) -> Output {
    let cap = cx.policy.limits.file_max_size;
    let max = cx.args.get("max_bytes").and_then(Value::as_u64).unwrap_or(cap);
    if max > cap {
        return Output::error(format!("argument \"max_bytes\" is {max}; limits.file_max_size is {cap}"));
    }
    let offset = cx.args.get("offset").and_then(Value::as_u64).unwrap_or(0);
    run(cx, FileOp::Read { offset, max: max as usize }, |ran| {
        let FileDone::Read(r) = &ran.done else { return json!({}) };
        let (content, encoding) = match std::str::from_utf8(&r.data) {
            Ok(s) => (s.to_owned(), "utf8"),
            Err(_) => (data_encoding::BASE64.encode(&r.data), "base64"),
        };
        let whole = offset == 0 && r.data.len() as u64 == r.size;
        json!({
            "content": content,
            "encoding": encoding,
            "size": r.size,
            "offset": offset,
            "bytes": r.data.len(),
            "complete": offset + r.data.len() as u64 >= r.size,
            "sha256": whole.then(|| data_encoding::HEXLOWER.encode(&crate::broker::ssh::sftp::sha256(&r.data))),
        })
    })
    .await
}

async fn file_write(cx: Ctx<'_>) -> Output {
    let content = arg(cx.args, "content").unwrap_or_default();
    let data = match arg(cx.args, "encoding") {
        Some("base64") => match data_encoding::BASE64.decode(content.as_bytes()) {
            Ok(d) => Zeroizing::new(d),
            Err(e) => return Output::error(format!("argument \"content\" is not base64: {e}")),
        },
        _ => Zeroizing::new(content.as_bytes().to_vec()),
    };
    let (expect, mode) = match (expect(arg(cx.args, "expected_sha256")), mode(arg(cx.args, "mode"))) {
        (Ok(e), Ok(m)) => (e, m),
        (Err(e), _) | (_, Err(e)) => return Output::error(format!("invalid arguments: {e}")),
    };
    run(cx, FileOp::Write { data, expect, mode }, |ran| {
        let FileDone::Write(w, hash, bytes) = &ran.done else { return json!({}) };
        json!({
            "sha256": data_encoding::HEXLOWER.encode(hash),
            "bytes": bytes,
            "created": w.created,
            "mode": format!("{:04o}", w.mode),
        })
    })
    .await
}

async fn file_list(cx: Ctx<'_>) -> Output {
    run(cx, FileOp::List, |ran| {
        let FileDone::List(entries, more) = &ran.done else { return json!({}) };
        let entries: Vec<Value> = entries
            .iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "type": e.kind,
                    "size": e.size,
                    "mode": format!("{:04o}", e.mode),
                    "modified_at": crate::time::format_rfc3339(i64::from(e.mtime), None),
                })
            })
            .collect();
        json!({ "entries": entries, "truncated": more })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_modes_are_parsed_or_named() {
        assert_eq!(expect(None).unwrap(), Expect::Any);
        assert_eq!(expect(Some("absent")).unwrap(), Expect::Absent);
        let h = "ab".repeat(32);
        assert_eq!(expect(Some(&h)).unwrap(), Expect::Sha256([0xab; 32]));
        assert!(expect(Some("abc")).unwrap_err().contains("64 hex digits"));
        assert_eq!(mode(Some("0640")).unwrap(), Some(0o640));
        assert_eq!(mode(Some("755")).unwrap(), Some(0o755));
        for bad in ["", "4755", "0888", "rwx", "-1", "00644"] {
            assert!(mode(Some(bad)).unwrap_err().contains("octal"), "{bad:?}");
        }
    }
}
