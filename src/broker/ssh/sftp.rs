//! SFTP on an authenticated connection: the file tools' wire side (`file_read`, `file_write`,
//! `file_list`).
//!
//! What runs here: one SFTP channel per tool call, driven by russh-sftp on the SSH runtime (like
//! `client`, this file sees tokio and russh types; nothing outside `broker::ssh` does). Every
//! operation takes a path the target itself resolved ([`Sftp::resolve`]: `SSH_FXP_REALPATH`,
//! which OpenSSH answers with symbolic links followed and `.`/`..` removed), so the broker
//! authorizes the path the target will touch, not the one the agent spelled.
//!
//! A write is atomic: the content goes to a new temporary file in the same directory (created
//! exclusively, mode set, synced), which then replaces the file with `posix-rename@openssh.com`.
//! An expected content hash is compared just before the rename.

use std::sync::Arc;
use std::time::{Duration, Instant};

use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, FileType, OpenFlags, Packet, StatusCode};
use zeroize::Zeroizing;

use super::client::{Conn, SshError, on_runtime};

/// Bytes per SFTP read or write request (OpenSSH accepts up to 256 KiB; 32 KiB is what its own
/// client sends).
const CHUNK: usize = 32 * 1024;

/// Why a file operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileError {
    /// The connection or the channel failed.
    Ssh(SshError),
    /// No such file or directory.
    Missing(String),
    /// The target's user may not do this.
    Denied(String),
    /// The file is not what the call expects (another content hash, a directory, exists already).
    Conflict(String),
    /// Larger than allowed.
    TooLarge(String),
    /// The operation's deadline passed (a write was not applied).
    Timeout(String),
    /// Anything else the server said.
    Failed(String),
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::Ssh(e) => e.fmt(f),
            FileError::Missing(m)
            | FileError::Denied(m)
            | FileError::Conflict(m)
            | FileError::TooLarge(m)
            | FileError::Timeout(m)
            | FileError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<SshError> for FileError {
    fn from(e: SshError) -> Self {
        FileError::Ssh(e)
    }
}

/// `Err` once `deadline` has passed.
fn in_time(deadline: Instant, path: &str, what: &str) -> Result<(), FileError> {
    if Instant::now() >= deadline {
        return Err(FileError::Timeout(format!("{path}: out of time {what}")));
    }
    Ok(())
}

/// What the server's answer means for `path`.
fn failure(path: &str, what: &str, e: SftpError) -> FileError {
    match e {
        SftpError::Status(s) => match s.status_code {
            StatusCode::NoSuchFile => FileError::Missing(format!("{path}: no such file or directory ({what})")),
            StatusCode::PermissionDenied => {
                FileError::Denied(format!("{path}: permission denied on the target ({what})"))
            }
            StatusCode::OpUnsupported => {
                FileError::Failed(format!("{path}: the target's SFTP server does not support {what}"))
            }
            code => FileError::Failed(format!("{path}: {what} failed on the target: {code} {}", s.error_message)),
        },
        SftpError::Timeout => FileError::Failed(format!("{path}: the target did not answer {what} in time")),
        other => FileError::Ssh(SshError::Protocol(format!("sftp {what}: {other}"))),
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File name (no directory).
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`0o7777` part of the mode).
    pub mode: u32,
    /// Modification time, Unix seconds.
    pub mtime: u32,
}

/// What a read returned.
#[derive(Debug)]
pub struct ReadOut {
    /// The bytes from `offset` (at most the cap asked for); zeroized when dropped, like any
    /// buffer that may hold a secret of the target.
    pub data: Zeroizing<Vec<u8>>,
    /// The file's size.
    pub size: u64,
}

/// What the file must be before a write replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Anything (or nothing).
    Any,
    /// No file there yet.
    Absent,
    /// A regular file with exactly this SHA-256.
    Sha256([u8; 32]),
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOut {
    /// Whether the file is new.
    pub created: bool,
    /// The permission bits it has now.
    pub mode: u32,
}

/// An SFTP channel on a connection. Closed when dropped.
pub struct Sftp {
    raw: Arc<RawSftpSession>,
}

impl std::fmt::Debug for Sftp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sftp")
    }
}

fn kind(a: &FileAttributes) -> &'static str {
    match a.file_type() {
        FileType::File => "file",
        FileType::Dir => "dir",
        FileType::Symlink => "symlink",
        FileType::Other => "other",
    }
}

/// The directory part of an absolute resolved path.
fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// An SSH string (length-prefixed), as extension requests carry their arguments.
fn ssh_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Conn {
    /// Opens an SFTP channel (the `sftp` subsystem). Each request waits at most `timeout`.
    pub async fn sftp(&self, timeout: Duration) -> Result<Sftp, FileError> {
        let handle = self.handle.clone();
        on_runtime(async move {
            let ch = handle
                .channel_open_session()
                .await
                .map_err(|e| SshError::Protocol(format!("opening a channel: {e}")))?;
            ch.request_subsystem(true, "sftp").await.map_err(|e| SshError::Protocol(format!("sftp subsystem: {e}")))?;
            let cfg = russh_sftp::client::Config {
                request_timeout_secs: timeout.as_secs().max(1),
                ..russh_sftp::client::Config::default()
            };
            let raw = RawSftpSession::new_with_config(ch.into_stream(), cfg);
            match tokio::time::timeout(timeout, raw.init()).await {
                Ok(Ok(_)) => Ok(Sftp { raw: Arc::new(raw) }),
                Ok(Err(e)) => Err(FileError::Ssh(SshError::Protocol(format!(
                    "the target offers no SFTP server ({e}); its sshd needs a `Subsystem sftp` line"
                )))),
                Err(_) => {
                    Err(FileError::Ssh(SshError::Protocol("the target's SFTP server did not start in time".into())))
                }
            }
        })
        .await?
    }
}

impl Sftp {
    async fn run<F, T>(&self, f: impl FnOnce(Arc<RawSftpSession>) -> F) -> Result<T, FileError>
    where
        F: Future<Output = Result<T, FileError>> + Send + 'static,
        T: Send + 'static,
    {
        on_runtime(f(self.raw.clone())).await?
    }

    /// The path as the target resolves it: absolute, symbolic links followed, no `.` or `..`. A
    /// missing last component is kept (a file about to be created); a missing directory is an
    /// error.
    pub async fn resolve(&self, path: &str) -> Result<String, FileError> {
        let p = path.to_owned();
        self.run(|raw| async move {
            let name = raw.realpath(p.clone()).await.map_err(|e| failure(&p, "resolving the path", e))?;
            let resolved = name.files.into_iter().next().map(|f| f.filename).unwrap_or_default();
            if !resolved.starts_with('/') {
                return Err(FileError::Failed(format!(
                    "{p}: the target resolved it to {resolved:?}, not an absolute path"
                )));
            }
            Ok(resolved)
        })
        .await
    }

    /// Reads at most `max` bytes of the regular file `path` (resolved) from `offset`.
    pub async fn read(&self, path: &str, offset: u64, max: usize, deadline: Instant) -> Result<ReadOut, FileError> {
        let p = path.to_owned();
        self.run(move |raw| async move {
            let attrs = raw.stat(p.clone()).await.map_err(|e| failure(&p, "stat", e))?.attrs;
            if !attrs.is_regular() {
                return Err(FileError::Conflict(format!("{p} is a {}, not a regular file", kind(&attrs))));
            }
            let h = raw
                .open(p.clone(), OpenFlags::READ, FileAttributes::empty())
                .await
                .map_err(|e| failure(&p, "open", e))?;
            let data = read_handle(&raw, &p, &h.handle, (offset, max), deadline).await;
            let _ = raw.close(h.handle).await;
            Ok(ReadOut { data: data?, size: attrs.size.unwrap_or(0) })
        })
        .await
    }

    /// The entries of the directory `path` (resolved), sorted by name, at most `max`; whether
    /// there were more.
    pub async fn list(&self, path: &str, max: usize, deadline: Instant) -> Result<(Vec<Entry>, bool), FileError> {
        let p = path.to_owned();
        self.run(move |raw| async move {
            let h = raw.opendir(p.clone()).await.map_err(|e| failure(&p, "opening the directory", e))?;
            let mut out = Vec::new();
            let mut more = false;
            loop {
                if let Err(e) = in_time(deadline, &p, "while listing") {
                    let _ = raw.close(h.handle).await;
                    return Err(e);
                }
                match raw.readdir(h.handle.clone()).await {
                    Ok(name) => {
                        for f in name.files {
                            if f.filename == "." || f.filename == ".." {
                                continue;
                            }
                            if out.len() == max {
                                more = true;
                                continue;
                            }
                            out.push(Entry {
                                kind: kind(&f.attrs),
                                size: f.attrs.size.unwrap_or(0),
                                mode: f.attrs.permissions.unwrap_or(0) & 0o7777,
                                mtime: f.attrs.mtime.unwrap_or(0),
                                name: f.filename,
                            });
                        }
                        if more {
                            break;
                        }
                    }
                    Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => break,
                    Err(e) => {
                        let _ = raw.close(h.handle).await;
                        return Err(failure(&p, "reading the directory", e));
                    }
                }
            }
            let _ = raw.close(h.handle).await;
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok((out, more))
        })
        .await
    }

    /// Replaces the file `path` (resolved) with `data`, atomically: a temporary file beside it,
    /// then a rename over it. A new file gets `mode` (default 0644); an existing one keeps its
    /// permission bits (set-id bits dropped). `expect` is checked just before the rename; the
    /// existing file is read for it with at most `max` bytes.
    pub async fn write(
        &self,
        path: &str,
        (data, expect, mode): (Zeroizing<Vec<u8>>, Expect, Option<u32>),
        max: usize,
        deadline: Instant,
    ) -> Result<WriteOut, FileError> {
        let p = path.to_owned();
        self.run(move |raw| async move {
            let existing = match raw.stat(p.clone()).await {
                Ok(a) if a.attrs.is_regular() => Some(a.attrs),
                Ok(a) => return Err(FileError::Conflict(format!("{p} is a {}, not a regular file", kind(&a.attrs)))),
                Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => None,
                Err(e) => return Err(failure(&p, "stat", e)),
            };
            let mode = match &existing {
                Some(a) => a.permissions.unwrap_or(0o644) & 0o777,
                None => mode.unwrap_or(0o644) & 0o777,
            };
            let temp = {
                use ring::rand::SecureRandom as _;
                let mut b = [0u8; 8];
                let _ = ring::rand::SystemRandom::new().fill(&mut b);
                let dir = parent(&p);
                let name = &p[p.rfind('/').map_or(0, |i| i + 1)..];
                let sep = if dir == "/" { "" } else { "/" };
                format!("{dir}{sep}.{name}.ephyr-{}.tmp", data_encoding::HEXLOWER.encode(&b))
            };
            let attrs = FileAttributes { permissions: Some(mode), ..FileAttributes::empty() };
            let flags = OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE;
            let h = raw
                .open(temp.clone(), flags, attrs)
                .await
                .map_err(|e| failure(&p, "creating the temporary file", e))?;
            let written = write_handle(&raw, &temp, &h.handle, (&data, mode), deadline).await;
            let closed = raw.close(h.handle).await.map(|_| ()).map_err(|e| failure(&temp, "close", e));
            let checked = match (written.and(closed), expect) {
                (Err(e), _) => Err(e),
                (Ok(()), Expect::Any) => Ok(()),
                (Ok(()), Expect::Absent) => match raw.lstat(p.clone()).await {
                    Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(()),
                    _ => {
                        Err(FileError::Conflict(format!("{p} exists (expected_sha256 \"absent\" says it should not)")))
                    }
                },
                (Ok(()), Expect::Sha256(want)) => match sha256_of(&raw, &p, max, deadline).await {
                    Ok(Some(have)) if crate::secret::constant_time_eq(&have, &want) => Ok(()),
                    Ok(Some(have)) => Err(FileError::Conflict(format!(
                        "{p} changed: its SHA-256 is {}, not the expected one; read it again",
                        data_encoding::HEXLOWER.encode(&have)
                    ))),
                    Ok(None) => Err(FileError::Conflict(format!("{p} does not exist (an expected_sha256 was given)"))),
                    Err(e) => Err(e),
                },
            };
            let renamed = match checked
                .and_then(|()| in_time(deadline, &p, "before the write was applied (the file is unchanged)"))
            {
                Ok(()) => {
                    let mut req = Vec::with_capacity(temp.len() + p.len() + 8);
                    ssh_string(&mut req, &temp);
                    ssh_string(&mut req, &p);
                    match raw.extended("posix-rename@openssh.com", req).await {
                        Ok(Packet::Status(s)) if s.status_code == StatusCode::Ok => Ok(()),
                        Ok(Packet::Status(s)) => Err(failure(&p, "replacing the file", SftpError::Status(s))),
                        Ok(_) => Err(FileError::Failed(format!("{p}: unexpected answer to posix-rename"))),
                        Err(e) => Err(failure(&p, "replacing the file (posix-rename@openssh.com)", e)),
                    }
                }
                Err(e) => Err(e),
            };
            if renamed.is_err() {
                let _ = raw.remove(temp).await;
            }
            renamed.map(|()| WriteOut { created: existing.is_none(), mode })
        })
        .await
    }
}

impl Drop for Sftp {
    fn drop(&mut self) {
        let _ = self.raw.close_session();
    }
}

async fn read_handle(
    raw: &RawSftpSession,
    path: &str,
    handle: &str,
    (offset, max): (u64, usize),
    deadline: Instant,
) -> Result<Zeroizing<Vec<u8>>, FileError> {
    let mut out = Zeroizing::new(Vec::new());
    while out.len() < max {
        in_time(deadline, path, "while reading")?;
        let want = (max - out.len()).min(CHUNK) as u32;
        match raw.read(handle.to_owned(), offset + out.len() as u64, want).await {
            Ok(d) if d.data.is_empty() => break,
            Ok(d) => {
                let d = Zeroizing::new(d.data);
                let take = d.len().min(max - out.len());
                out.extend_from_slice(&d[..take]);
            }
            Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => break,
            Err(e) => return Err(failure(path, "read", e)),
        }
    }
    Ok(out)
}

async fn write_handle(
    raw: &RawSftpSession,
    path: &str,
    handle: &str,
    (data, mode): (&[u8], u32),
    deadline: Instant,
) -> Result<(), FileError> {
    // The server's umask may have narrowed the mode the file was created with.
    let attrs = FileAttributes { permissions: Some(mode), ..FileAttributes::empty() };
    raw.fsetstat(handle.to_owned(), attrs).await.map_err(|e| failure(path, "setting the mode", e))?;
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        in_time(deadline, path, "while writing (the file is unchanged)")?;
        raw.write(handle.to_owned(), (i * CHUNK) as u64, chunk.to_vec())
            .await
            .map_err(|e| failure(path, "write", e))?;
    }
    match raw.fsync(handle.to_owned()).await {
        Ok(_) => Ok(()),
        Err(SftpError::Status(s)) if s.status_code == StatusCode::OpUnsupported => Ok(()),
        Err(e) => Err(failure(path, "fsync", e)),
    }
}

/// The SHA-256 of the regular file `path` (`None`: there is none), reading at most `max` bytes.
async fn sha256_of(
    raw: &RawSftpSession,
    path: &str,
    max: usize,
    deadline: Instant,
) -> Result<Option<[u8; 32]>, FileError> {
    let attrs = match raw.stat(path.to_owned()).await {
        Ok(a) => a.attrs,
        Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => return Ok(None),
        Err(e) => return Err(failure(path, "stat", e)),
    };
    if attrs.size.unwrap_or(0) > max as u64 {
        return Err(FileError::TooLarge(format!(
            "{path} is {} bytes; its hash can be compared up to {max} bytes",
            attrs.size.unwrap_or(0)
        )));
    }
    let h = raw
        .open(path.to_owned(), OpenFlags::READ, FileAttributes::empty())
        .await
        .map_err(|e| failure(path, "open", e))?;
    let data = read_handle(raw, path, &h.handle, (0, max + 1), deadline).await;
    let _ = raw.close(h.handle).await;
    let data = data?;
    if data.len() > max {
        return Err(FileError::TooLarge(format!("{path} grew past {max} bytes while it was read")));
    }
    Ok(Some(sha256(&data)))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_and_extension_strings() {
        assert_eq!(parent("/etc/nginx/nginx.conf"), "/etc/nginx");
        assert_eq!(parent("/x"), "/");
        let mut v = Vec::new();
        ssh_string(&mut v, "ab");
        assert_eq!(v, [0, 0, 0, 2, b'a', b'b']);
    }
}
