//! HTTP/1.1 serving on the single-threaded executor: hyper over async-io sockets.
//!
//! What runs here: `accept` on TCP and Unix listeners (with a TLS handshake first when the
//! listeners speak TLS, `broker::tls`), one task per connection on the
//! `LocalExecutor`, `getsockopt(SO_PEERCRED)` for Unix peers, async-io timers for header read
//! timeouts. No threads of its own. Limits: request headers must arrive within
//! [`HEADER_TIMEOUT`] (slow-loris), the read buffer is capped at [`MAX_BUF`], and handlers bound body
//! sizes themselves (`read_body`). On shutdown every connection is told to finish its in-flight
//! request and close; [`Connections::drain`] waits for them up to a deadline.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::broker::deadline::Deadline;
use crate::broker::reactor::Io;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use smol::LocalExecutor;

use crate::os::{self, PeerCredentials};

pub(crate) mod admission;
pub(crate) mod mcp;

/// Time allowed for a request's headers to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest read buffer per connection (bounds header size).
pub const MAX_BUF: usize = 64 * 1024;

/// Response body type used everywhere. Not `Send`: the executor is single-threaded, so a
/// streaming body may hold `Rc` state (the broker, a session).
pub type Body = Pin<Box<dyn http_body::Body<Data = Bytes, Error = io::Error>>>;

/// Who is on the other end.
#[derive(Clone, Copy, Debug)]
pub enum Peer {
    /// A TCP client.
    Tcp(SocketAddr),
    /// A local process on the Unix socket.
    Unix(PeerCredentials),
}

/// A request handler.
pub type Handler = Rc<dyn Fn(Request<Incoming>, Peer) -> Pin<Box<dyn Future<Output = Response<Body>>>>>;

/// A body from bytes.
pub fn body(bytes: impl Into<Bytes>) -> Body {
    Box::pin(Full::new(bytes.into()).map_err(|never: Infallible| match never {}))
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(body(serde_json::to_vec(value).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A plain-text response.
pub fn text(status: StatusCode, content_type: &'static str, s: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(body(s));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON error: `{"error": code, "message": message}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": code, "message": message.into() }))
}

/// A broker error as an HTTP answer (the one mapping): its status, and `{"error": code,
/// "message": text}`.
pub fn error_response(e: &crate::broker::Error) -> Response<Body> {
    error(e.status(), e.code(), e.message())
}

/// A status as its class, `1xx`..`5xx` (metric labels).
pub fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// Longer than the limit.
    TooLarge(usize),
    /// The client stopped sending or the connection failed.
    Io(String),
    /// The body did not arrive in time (a slow or stalled client).
    Timeout(Duration),
}

impl BodyError {
    /// The matching HTTP error response.
    pub fn response(&self) -> Response<Body> {
        match self {
            BodyError::TooLarge(max) => {
                error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request body exceeds {max} bytes"))
            }
            BodyError::Io(e) => error(StatusCode::BAD_REQUEST, "body_unreadable", e.clone()),
            BodyError::Timeout(d) => error(StatusCode::REQUEST_TIMEOUT, "body_timeout", self.message(*d)),
        }
    }

    fn message(&self, d: Duration) -> String {
        format!("request body not received within {}s", d.as_secs())
    }

    /// Human text.
    pub fn describe(&self) -> String {
        match self {
            BodyError::TooLarge(max) => format!("request body exceeds {max} bytes"),
            BodyError::Io(e) => format!("request body unreadable: {e}"),
            BodyError::Timeout(d) => self.message(*d),
        }
    }
}

/// Reads a whole request body, refusing more than `max` bytes (checked against Content-Length
/// first, then while reading) and giving up after `timeout`.
pub async fn read_body(req: Request<Incoming>, max: usize, timeout: Duration) -> Result<Bytes, BodyError> {
    let (parts, body) = req.into_parts();
    read_incoming(&parts.headers, body, max, timeout).await
}

/// [`read_body`] for a request already split into parts.
pub async fn read_incoming(
    headers: &http::HeaderMap,
    body: Incoming,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > max as u64
    {
        return Err(BodyError::TooLarge(max));
    }
    let collect = async {
        Limited::new(body, max).collect().await.map(|c| c.to_bytes()).map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                BodyError::TooLarge(max)
            } else {
                BodyError::Io(e.to_string())
            }
        })
    };
    crate::broker::deadline::within(timeout, collect).await.unwrap_or(Err(BodyError::Timeout(timeout)))
}

/// Bytes read from a socket per read call.
const READ_CHUNK: usize = 4096;

thread_local! {
    /// One read buffer for every connection of this thread: a read completes (or returns
    /// Pending) before the next connection is polled, so they never overlap.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

/// A socket as hyper sees it. hyper hands reads an uninitialised buffer; the generic adapter
/// zeroes all of it (8–64 KiB) on every read, which cost more than the rest of a small request.
/// This one reads into a buffer initialised once per thread and copies what arrived.
pub struct HyperIo<S> {
    inner: S,
}

impl<S> HyperIo<S> {
    /// Wraps a socket.
    pub fn new(inner: S) -> Self {
        HyperIo { inner }
    }
}

impl<S: futures_lite::AsyncRead + Unpin> hyper::rt::Read for HyperIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let want = buf.remaining().min(scratch.len());
            match Pin::new(&mut this.inner).poll_read(cx, &mut scratch[..want]) {
                Poll::Ready(Ok(n)) => {
                    buf.put_slice(&scratch[..n]);
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    }
}

impl<S: futures_lite::AsyncWrite + Unpin> hyper::rt::Write for HyperIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// Counts live connections so shutdown can wait for them.
#[derive(Clone, Default)]
pub struct Connections(Rc<Cell<usize>>);

impl Connections {
    /// Live connection count.
    pub fn count(&self) -> usize {
        self.0.get()
    }

    /// Waits until no connection is left or `deadline` passes; returns how many remain.
    pub async fn drain(&self, deadline: Instant) -> usize {
        while self.count() > 0 && Instant::now() < deadline {
            Deadline::after(Duration::from_millis(5)).await;
        }
        self.count()
    }
}

struct Guard(Connections);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.0.set(self.0.0.get().saturating_sub(1));
    }
}

/// Serves one connection until it closes, or until `shutdown` fires and the in-flight request
/// (if any) has been answered.
async fn serve_conn<S>(io: S, peer: Peer, handler: Handler, shutdown: async_channel::Receiver<()>)
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let fut = handler(req, peer);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(crate::broker::deadline::HyperTimer).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_BUF);
    let conn = builder.serve_connection(HyperIo::new(io), service);
    let mut conn = pin!(conn);
    let mut stop = pin!(shutdown.recv());
    let mut stopping = false;
    let result = std::future::poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            conn.as_mut().graceful_shutdown();
            stopping = true;
        }
        match conn.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if let Err(e) = result {
        log::debug!("connection from {peer:?} ended: {e}");
    }
}

/// Accepts TCP connections until `shutdown` fires; each must be admitted first (per-source and
/// global caps, [`admission`]).
pub async fn serve_tcp(
    ex: Rc<LocalExecutor<'static>>,
    listener: TcpListener,
    admission: Rc<admission::Admission>,
    handler: Handler,
    shutdown: async_channel::Receiver<()>,
    conns: Connections,
    tls: Option<Rc<crate::broker::tls::Tls>>,
) -> io::Result<()> {
    let listener = Io::new(listener)?;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = shutdown.recv().await;
            None
        })
        .await;
        let Some(accepted) = accepted else {
            return Ok(());
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                log::warn!("accept failed: {e}");
                Deadline::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match admission.admit(addr.ip()) {
            Ok(slot) => slot,
            Err(r) => {
                admission::refuse(stream.get_ref(), r);
                continue;
            }
        };
        let _ = stream.get_ref().set_nodelay(true);
        conns.0.set(conns.0.get() + 1);
        let guard = Guard(conns.clone());
        let (h, s) = (handler.clone(), shutdown.clone());
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        ex.spawn(async move {
            let _guard = guard;
            let _slot = slot;
            match acceptor {
                None => serve_conn(stream, Peer::Tcp(addr), h, s).await,
                Some(a) => {
                    // The handshake is bounded like request headers (a stalled client holds a slot).
                    let shook = crate::broker::deadline::within(HEADER_TIMEOUT, a.accept(stream)).await;
                    match shook {
                        Some(Ok(tls)) => serve_conn(tls, Peer::Tcp(addr), h, s).await,
                        Some(Err(e)) => log::debug!("TLS handshake with {addr} failed: {e}"),
                        None => log::debug!("TLS handshake with {addr} timed out"),
                    }
                }
            }
        })
        .detach();
    }
}

/// Most open connections on the local socket (any local user may connect to it).
pub const MAX_LOCAL: usize = 256;

/// Accepts Unix-socket connections until `shutdown` fires; each request carries the peer's
/// kernel-verified credentials. At most [`MAX_LOCAL`] are open at once; more are closed at accept.
pub async fn serve_unix(
    ex: Rc<LocalExecutor<'static>>,
    listener: UnixListener,
    handler: Handler,
    shutdown: async_channel::Receiver<()>,
    conns: Connections,
) -> io::Result<()> {
    let listener = Io::new(listener)?;
    let local = Connections::default();
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = shutdown.recv().await;
            None
        })
        .await;
        let Some(accepted) = accepted else {
            return Ok(());
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept failed on the local socket: {e}");
                Deadline::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        let creds = match os::peer_credentials(stream.get_ref().as_fd()) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("SO_PEERCRED failed: {e}");
                continue;
            }
        };
        if local.count() >= MAX_LOCAL {
            log::warn!("local socket: {MAX_LOCAL} connections open; refused one from uid {}", creds.uid);
            continue;
        }
        conns.0.set(conns.0.get() + 1);
        local.0.set(local.0.get() + 1);
        let guards = (Guard(conns.clone()), Guard(local.clone()));
        let (h, s) = (handler.clone(), shutdown.clone());
        ex.spawn(async move {
            let _guards = guards;
            serve_conn(stream, Peer::Unix(creds), h, s).await;
        })
        .detach();
    }
}
