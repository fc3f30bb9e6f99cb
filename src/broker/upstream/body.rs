//! A streaming upstream response body, as the broker passes it on: bounded, timed, scrubbed of
//! the secret it sent, and cut when the caller's task ends.
//!
//! What runs here: polling hyper's `Incoming` body on the executor thread, with async-io timers
//! for the read timeout, the overall deadline and the task check. Nothing is buffered beyond
//! one chunk and the scrubber's held-back tail. The connection goes back to the pool only when
//! the body was read to its end.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::broker::deadline::Deadline;
use bytes::Bytes;
use futures_lite::FutureExt as _;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use super::conn;
use super::scrub::Scrubber;

/// The bounds of one response body.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most bytes passed on.
    pub max_bytes: u64,
    /// Longest wait for the next chunk.
    pub read_timeout: Duration,
    /// The whole exchange's allowance (for messages).
    pub total: Duration,
    /// When the whole exchange must be over.
    pub deadline: Instant,
}

/// How a response body ended.
#[derive(Debug)]
pub struct End {
    /// Bytes passed on.
    pub bytes: u64,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// What [`UpstreamBody`] calls when it ends.
pub type OnEnd = Box<dyn FnOnce(&End)>;

/// Sees every piece of the body passed on, scrubbed (a run's usage meter).
pub type Tap = Box<dyn FnMut(&[u8])>;

/// Makes the last frame of a body the broker cuts: `(code, reason, an event is open)` to bytes
/// (an event-stream error event in the agent's SDK's shape; `proxy::shape`).
pub type Farewell = Box<dyn Fn(&str, &str, bool) -> Bytes>;

/// An error with its causes (`operation was canceled: connection closed: received fatal alert`).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A streaming upstream response body: bounded, timed, scrubbed, and cut when the caller's task
/// ends. Its connection returns to the pool when it is read to the end.
pub struct UpstreamBody {
    inner: Incoming,
    scrub: Scrubber,
    limit: u64,
    bytes: u64,
    read_timeout: Duration,
    read_timer: Deadline,
    total: Duration,
    deadline: Deadline,
    ended: Option<Pin<Box<dyn Future<Output = ()>>>>,
    pool: Option<(Rc<conn::Conns>, String, conn::Sender)>,
    done: bool,
    on_end: Option<OnEnd>,
    farewell: Option<Farewell>,
    tap: Option<Tap>,
    /// What was passed on last did not end with a blank line (an event may be open).
    open_event: bool,
}

impl UpstreamBody {
    /// A body over `inner`, bounded by `limits`, scrubbed by `scrub`; `ended` resolves when the
    /// caller's task no longer holds (task events); `pool` is where the connection goes back
    /// after a whole read.
    pub fn new(
        inner: Incoming,
        scrub: Scrubber,
        limits: Limits,
        ended: Option<Pin<Box<dyn Future<Output = ()>>>>,
        pool: Option<(Rc<conn::Conns>, String, conn::Sender)>,
    ) -> UpstreamBody {
        UpstreamBody {
            inner,
            scrub,
            limit: limits.max_bytes,
            bytes: 0,
            read_timeout: limits.read_timeout,
            read_timer: Deadline::after(limits.read_timeout),
            total: limits.total,
            deadline: Deadline::at(limits.deadline),
            ended,
            pool,
            done: false,
            on_end: None,
            farewell: None,
            tap: None,
            open_event: false,
        }
    }

    /// When the broker cuts the body (task ended, a limit, an upstream failure), it ends with
    /// `f`'s frame and then cleanly, instead of an aborted transfer.
    pub fn farewell(&mut self, f: Farewell) {
        self.farewell = Some(f);
    }

    /// Shows `f` every piece passed on, before the body's end is reported.
    pub fn tap(&mut self, f: Tap) {
        self.tap = Some(f);
    }

    /// Calls `f` once when the body ends (completely, with an error, or dropped unfinished).
    pub fn on_end(&mut self, f: OnEnd) {
        self.on_end = Some(f);
    }

    /// Bytes passed on so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn end(&mut self, error: Option<String>) {
        self.done = true;
        if error.is_some() {
            self.pool = None;
        } else if let Some((conns, key, sender)) = self.pool.take() {
            conns.checkin(key, sender);
        }
        if let Some(f) = self.on_end.take() {
            f(&End { bytes: self.bytes, error });
        }
    }

    fn fail(&mut self, code: &str, msg: String) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.end(Some(msg.clone()));
        match self.farewell.take() {
            Some(f) => Poll::Ready(Some(Ok(Frame::data(f(code, &msg, self.open_event))))),
            None => Poll::Ready(Some(Err(io::Error::other(msg)))),
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if this.deadline.poll(cx).is_ready() {
                return this.fail(
                    "upstream_timeout",
                    format!("the exchange took longer than the {}s allowed (timeout)", this.total.as_secs_f64()),
                );
            }
            if let Some(e) = &mut this.ended
                && e.as_mut().poll(cx).is_ready()
            {
                return this.fail("task_ended", "the task was revoked or expired; the stream was stopped".into());
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue }; // trailers are not passed on
                    this.bytes += data.len() as u64;
                    if this.bytes > this.limit {
                        return this.fail(
                            "response_too_large",
                            format!("the response is larger than the service's max_response ({} bytes)", this.limit),
                        );
                    }
                    this.read_timer = Deadline::after(this.read_timeout);
                    let mut out = if this.scrub.is_active() { Bytes::from(this.scrub.push(&data)) } else { data };
                    // hyper stops polling once it has sent as many bytes as the length said:
                    // the body ends with its last frame, not with a final poll.
                    let last = this.inner.is_end_stream();
                    if last {
                        let tail = this.scrub.finish();
                        if !tail.is_empty() {
                            out = Bytes::from([out.as_ref(), tail.as_slice()].concat());
                        }
                    }
                    if let Some(t) = &mut this.tap {
                        t(&out);
                    }
                    if last {
                        this.end(None);
                    }
                    if out.is_empty() {
                        if this.done {
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    this.open_event = !out.ends_with(b"\n\n") && !out.ends_with(b"\r\n\r\n");
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Err(e))) => {
                    return this.fail("upstream_failed", format!("the upstream's body failed: {}", chain(&e)));
                }
                Poll::Ready(None) => {
                    let tail = this.scrub.finish();
                    if let Some(t) = &mut this.tap {
                        t(&tail);
                    }
                    this.end(None);
                    return if tail.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))))
                    };
                }
                Poll::Pending => {
                    if this.read_timer.poll(cx).is_ready() {
                        return this.fail(
                            "upstream_timeout",
                            format!(
                                "the upstream sent nothing for {}s (read_timeout)",
                                this.read_timeout.as_secs_f64()
                            ),
                        );
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        // Scrubbing keeps lengths, so the upstream's length is ours.
        if self.done { SizeHint::with_exact(0) } else { self.inner.size_hint() }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if !self.done {
            self.end(Some("the client stopped reading".into()));
        }
    }
}
