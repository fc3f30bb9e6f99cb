//! A terminal on a session (`session_create` with `mode: pty`): the wire side of interactive
//! programs. Like `client`, this file sees russh and tokio types; nothing outside `broker::ssh`
//! does.
//!
//! What runs here: on the SSH runtime, a channel with a pseudo-terminal and the role's login
//! shell. [`Pty::send`] writes keystrokes and collects what the terminal printed until it has
//! been quiet for a moment or the caller's wait is over; output that arrives between calls waits
//! in the channel for the next one. [`Pty::resize`] sends a window change.

use std::time::{Duration, Instant};

use russh::{ChannelMsg, client};

use super::client::{Conn, ExecResult, Kept, SshError, on_runtime};

/// After output has started, this long without more ends a [`Pty::send`].
pub const QUIET: Duration = Duration::from_millis(200);
/// The terminal type announced to the target.
const TERM: &str = "xterm-256color";
/// Smallest and largest terminal sizes accepted.
pub const MIN_SIZE: u32 = 10;
/// See [`MIN_SIZE`].
pub const MAX_SIZE: u32 = 1000;

/// A terminal kept on a session.
pub struct Pty {
    ch: Kept,
}

impl std::fmt::Debug for Pty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pty")
    }
}

/// Waits for the answer to a request sent with `want_reply`; output that comes first is kept.
async fn reply(c: &mut russh::Channel<client::Msg>, what: &str, early: &mut Vec<u8>) -> Result<(), SshError> {
    loop {
        match c.wait().await {
            Some(ChannelMsg::Success) => return Ok(()),
            Some(ChannelMsg::Failure) => {
                return Err(SshError::Protocol(format!(
                    "the target refused the {what} (a terminal needs the certificate extension permit-pty, and sshd's PermitTTY)"
                )));
            }
            Some(ChannelMsg::Data { data }) => early.extend_from_slice(&data),
            Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                return Err(SshError::Protocol(format!("the channel closed before the {what} was answered")));
            }
            Some(_) => {}
        }
    }
}

impl Conn {
    /// Opens a channel with a `cols`×`rows` terminal running the login shell.
    pub async fn open_pty(&self, cols: u32, rows: u32, timeout: Duration) -> Result<Pty, SshError> {
        let handle = self.handle.clone();
        let ch = on_runtime(async move {
            let work = async {
                let mut ch = handle
                    .channel_open_session()
                    .await
                    .map_err(|e| SshError::Protocol(format!("opening a channel: {e}")))?;
                ch.request_pty(true, TERM, cols, rows, 0, 0, &[])
                    .await
                    .map_err(|e| SshError::Protocol(format!("terminal request: {e}")))?;
                let mut early = Vec::new();
                reply(&mut ch, "terminal", &mut early).await?;
                ch.request_shell(true).await.map_err(|e| SshError::Protocol(format!("shell request: {e}")))?;
                reply(&mut ch, "shell", &mut early).await?;
                Ok::<_, SshError>(ch)
            };
            match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(SshError::Timeout(timeout)),
            }
        })
        .await??;
        Ok(Pty { ch: Kept::new(ch) })
    }
}

impl Pty {
    /// Whether the terminal's shell has ended.
    pub fn is_closed(&self) -> bool {
        self.ch.is_closed()
    }

    /// Writes `input` (keystrokes: `\r` is Enter, `\u{3}` is Ctrl-C) and returns what the terminal
    /// printed: until [`QUIET`] passes without output once some came, or `wait` is over, or
    /// `cap` bytes arrived (the rest waits for the next call). `exit_status` is set when the
    /// shell ended; the terminal is then closed for good. One call at a time.
    pub async fn send(&self, input: Vec<u8>, wait: Duration, cap: usize) -> Result<ExecResult, SshError> {
        let ch = self.ch.clone();
        on_runtime(async move {
            let Ok(mut guard) = ch.slot().try_lock() else {
                return Err(SshError::Protocol("the terminal is busy with another call".into()));
            };
            let Some(c) = guard.as_mut() else {
                return Err(SshError::Protocol("the terminal's shell has ended; open a new session".into()));
            };
            let started = Instant::now();
            if !input.is_empty()
                && let Err(e) = c.data(&input[..]).await
            {
                *guard = None;
                return Err(SshError::Protocol(format!("the terminal's shell has ended ({e}); open a new session")));
            }
            let mut r = ExecResult::default();
            let end = tokio::time::Instant::from_std(started + wait);
            let mut ended = false;
            while r.stdout.len() < cap {
                let until = if r.stdout.is_empty() { end } else { end.min(tokio::time::Instant::now() + QUIET) };
                let msg = match tokio::time::timeout_at(until, c.wait()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(_) => break,
                };
                match msg {
                    // A terminal merges stderr into its output; anything on the extended stream
                    // is shown with it.
                    ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                        r.stdout.extend_from_slice(&data);
                        r.arrived(started.elapsed(), false);
                    }
                    ChannelMsg::ExitStatus { exit_status } => r.exit_status = Some(exit_status),
                    ChannelMsg::Eof | ChannelMsg::Close => {
                        ended = true;
                        break;
                    }
                    _ => {}
                }
            }
            r.stdout_truncated = r.stdout.len() >= cap;
            if ended && r.exit_status.is_none() {
                // sshd sends the exit status after the end of output: wait briefly for it.
                let by = tokio::time::Instant::now() + Duration::from_secs(1);
                while let Ok(Some(m)) = tokio::time::timeout_at(by, c.wait()).await {
                    match m {
                        ChannelMsg::ExitStatus { exit_status } => r.exit_status = Some(exit_status),
                        ChannelMsg::Close => break,
                        _ => {}
                    }
                }
            }
            if ended {
                let _ = c.close().await;
                *guard = None;
            }
            r.duration = started.elapsed();
            Ok(r)
        })
        .await?
    }

    /// Tells the target the terminal is now `cols`×`rows`.
    pub async fn resize(&self, cols: u32, rows: u32) -> Result<(), SshError> {
        let ch = self.ch.clone();
        on_runtime(async move {
            let Ok(guard) = ch.slot().try_lock() else {
                return Err(SshError::Protocol("the terminal is busy with another call".into()));
            };
            let Some(c) = guard.as_ref() else {
                return Err(SshError::Protocol("the terminal's shell has ended; open a new session".into()));
            };
            c.window_change(cols, rows, 0, 0).await.map_err(|e| SshError::Protocol(format!("window change: {e}")))
        })
        .await?
    }

    /// Ends the terminal (its shell gets a hangup when the channel closes).
    pub async fn close(&self) {
        self.ch.close().await;
    }
}
