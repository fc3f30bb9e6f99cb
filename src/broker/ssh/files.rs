//! The file tools' broker side: read, write and list files on a target over SFTP, with the same
//! certificate, audit and authorization as a command.
//!
//! What runs here: on the executor thread, `authorize` for the path as spelled (absolute and
//! normalised, or refused), the approval gate, a fresh certificate and connection, then the path
//! as **the target resolves it** (symbolic links followed) authorized again, so a link under an
//! allowed directory cannot lead outside it (DESIGN.md invariant 6: what is touched is what is
//! checked). The operation is recorded in the audit log before it runs (fails closed); the wire
//! work is in `sftp`.

use std::time::{Duration, Instant};

use serde_json::json;
use zeroize::Zeroizing;

use super::sftp::{Entry, Expect, FileError, ReadOut, WriteOut};
use super::{Asker, CONNECT_TIMEOUT, Ssh, ssh_err, with_task};
use crate::broker::Error;
use crate::broker::audit::{Event, Kind};
use crate::broker::auth::Caller;
use crate::broker::policy::{Action, ActionKind, Arguments, Decision, Policy};

/// Longest path argument.
pub const MAX_PATH: usize = 4096;
/// Most entries a listing returns.
pub const MAX_ENTRIES: usize = 1000;

/// What a file tool does.
#[derive(Debug)]
pub enum FileOp {
    /// Read at most `max` bytes from `offset`.
    Read {
        /// Where to start.
        offset: u64,
        /// At most this many bytes (≤ `limits.file_max_size`).
        max: usize,
    },
    /// Replace the file (atomically) with `data`.
    Write {
        /// The new content.
        data: Zeroizing<Vec<u8>>,
        /// What the file must be before.
        expect: Expect,
        /// Permission bits of a new file.
        mode: Option<u32>,
    },
    /// List a directory.
    List,
}

impl FileOp {
    /// The tool's name for the operation (`file_read`, ...).
    pub fn tool(&self) -> &'static str {
        match self {
            FileOp::Read { .. } => "file_read",
            FileOp::Write { .. } => "file_write",
            FileOp::List => "file_list",
        }
    }

    fn writes(&self) -> bool {
        matches!(self, FileOp::Write { .. })
    }
}

/// What a file tool did.
#[derive(Debug)]
pub enum FileDone {
    /// The bytes read.
    Read(ReadOut),
    /// The file written: what it is now, its new SHA-256 and size.
    Write(WriteOut, [u8; 32], usize),
    /// The entries, and whether there were more.
    List(Vec<Entry>, bool),
}

/// A finished file operation.
#[derive(Debug)]
pub struct FileRan {
    /// The path the target resolved and the operation used.
    pub resolved: String,
    /// What it did.
    pub done: FileDone,
    /// Serial of the certificate used.
    pub serial: u64,
    /// A first-use host key warning, if this connection recorded one.
    pub host_key_warning: Option<String>,
}

/// Checks a path argument: absolute, normalised (no `.`, `..` or empty segments), no control
/// characters, at most [`MAX_PATH`] bytes. The error names what is wrong.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("argument \"path\" must be absolute (start with /): {path:?}"));
    }
    if path.len() > MAX_PATH {
        return Err(format!("argument \"path\" is {} bytes; the limit is {MAX_PATH}", path.len()));
    }
    if path.chars().any(char::is_control) {
        return Err("argument \"path\" contains a control character".into());
    }
    if path != "/" {
        let body = path.strip_suffix('/').unwrap_or(path);
        if body[1..].split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(format!(
                "argument \"path\" must be normalised (no empty, . or .. segments): {path:?}; the target resolves symbolic links itself"
            ));
        }
    }
    Ok(())
}

fn file_err(e: FileError) -> Error {
    match e {
        FileError::Ssh(e) => ssh_err(e),
        FileError::Missing(m) => Error::NotFound(m),
        FileError::Conflict(m) => Error::Refused(m),
        FileError::TooLarge(m) => Error::TooLarge(m),
        FileError::Timeout(m) => Error::Timeout(m),
        FileError::Denied(m) => Error::Upstream { code: "permission_denied", message: m },
        FileError::Failed(m) => Error::Upstream { code: "sftp_failed", message: m },
    }
}

/// `authorize` for `op` on `path` as `role` on `target`; the role's principal on success.
fn authorize(
    policy: &Policy,
    caller: &Caller,
    arguments: Arguments<'_>,
    (target, role): (&str, &str),
    op: &FileOp,
    path: &str,
) -> Result<String, Error> {
    let kind = ActionKind::SshFile { target, role, path, write: op.writes() };
    match crate::broker::policy::authorize(
        policy,
        &caller.principal(),
        &Action { tool: Some(op.tool()), kind, arguments },
    ) {
        Decision::Allow(g) => {
            g.principal.map(str::to_owned).ok_or_else(|| Error::Refused(format!("role {role:?} names no principal")))
        }
        Decision::Deny(d) => Err(Error::Denied(d)),
    }
}

impl Ssh {
    /// Runs a file tool on `target` as `role`, with a new certificate and connection.
    pub async fn file(
        &self,
        asker: Asker<'_>,
        (target, role): (&str, &str),
        path: &str,
        op: FileOp,
        timeout: Duration,
    ) -> Result<FileRan, Error> {
        let Asker { ports, caller, policy, arguments } = asker;
        check_path(path).map_err(Error::Invalid)?;
        if let FileOp::Write { data, .. } = &op
            && data.len() as u64 > policy.limits.file_max_size
        {
            return Err(Error::TooLarge(format!(
                "the content is {} bytes; limits.file_max_size is {}",
                data.len(),
                policy.limits.file_max_size
            )));
        }
        let principal = authorize(policy, caller, arguments, (target, role), &op, path)?;
        super::approval(ports, policy, caller, target, role, None).await?;
        let ttl = policy.targets.get(target).map_or(policy.limits.cert_ttl_default, |t| t.cert_ttl_default);
        let (conn, issued, held, warning) =
            self.connect(ports, caller, policy, target, role, &principal, None, ttl).await?;
        // Checked by the SFTP side between requests and before a write's rename: an operation
        // that runs out of time stops there, and a write leaves the old file as it was.
        let deadline = Instant::now() + timeout;
        let r = async {
            let sftp = conn.sftp(timeout.min(CONNECT_TIMEOUT)).await.map_err(file_err)?;
            let resolved = sftp.resolve(path).await.map_err(file_err)?;
            // A target answers for itself, but a policy decision is never made on an ambiguous path.
            check_path(&resolved).map_err(|e| Error::Upstream {
                code: "sftp_failed",
                message: format!("the target resolved {path} to a path that is not normalised and absolute ({e})"),
            })?;
            // What the target will touch is what is authorized.
            authorize(policy, caller, arguments, (target, role), &op, &resolved)?;
            // A write's content hash, once: for the audit line before it and the result after.
            let hash = match &op {
                FileOp::Write { data, .. } => Some((super::sftp::sha256(data), data.len())),
                _ => None,
            };
            let ticket = record(ports.audit, caller, (target, role), (&op, hash), path, &resolved)?;
            let work = async {
                match op {
                    FileOp::Read { offset, max } => {
                        sftp.read(&resolved, offset, max, deadline).await.map(FileDone::Read)
                    }
                    FileOp::List => {
                        sftp.list(&resolved, MAX_ENTRIES, deadline).await.map(|(e, more)| FileDone::List(e, more))
                    }
                    FileOp::Write { data, expect, mode } => {
                        let (sum, len) = hash.unwrap_or_default();
                        let max = policy.limits.file_max_size as usize;
                        sftp.write(&resolved, (data, expect, mode), max, deadline)
                            .await
                            .map(|w| FileDone::Write(w, sum, len))
                    }
                }
            };
            let (done, durable) =
                futures_lite::future::zip(async { work.await.map_err(file_err) }, ticket.durable()).await;
            durable.map_err(|e| Error::audit(format!("{e} (the file operation ran; its record may be incomplete)")))?;
            Ok((resolved, done?))
        }
        .await;
        conn.close().await;
        drop(held);
        let (resolved, done) = r?;
        Ok(FileRan { resolved, done, serial: issued.serial, host_key_warning: warning })
    }
}

/// Records that a file operation is about to run (fails closed when the audit trail is down).
fn record(
    audit: &dyn crate::broker::audit::AuditSink,
    caller: &Caller,
    (target, role): (&str, &str),
    (op, written): (&FileOp, Option<([u8; 32], usize)>),
    path: &str,
    resolved: &str,
) -> Result<crate::broker::audit::Ticket, Error> {
    let mut action = json!({ "target": target, "role": role, "op": op.tool(), "path": path, "resolved": resolved });
    if let Some((sum, len)) = written {
        action["sha256"] = data_encoding::HEXLOWER.encode(&sum).into();
        action["bytes"] = len.into();
    }
    let ev = with_task(Event::new(Kind::Ssh, "ssh_file"), caller).agent(caller.agent.clone()).action(action).allow();
    audit.record(ev).map_err(|e| Error::audit(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_normalised() {
        for ok in ["/", "/etc", "/etc/nginx/", "/srv/a b/c.txt"] {
            check_path(ok).unwrap();
        }
        for (bad, why) in [
            ("etc/passwd", "absolute"),
            ("", "absolute"),
            ("/etc/nginx/../shadow", "normalised"),
            ("/etc/./x", "normalised"),
            ("/etc//x", "normalised"),
            ("/etc/x\n", "control"),
            ("/etc/\0", "control"),
        ] {
            assert!(check_path(bad).unwrap_err().contains(why), "{bad:?}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(MAX_PATH))).unwrap_err().contains("limit"));
    }
}
