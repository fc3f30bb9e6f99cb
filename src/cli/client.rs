//! A client for the broker's local Unix-socket API (used by `ephyr status`, `ephyr cert sign`, ...).
//!
//! What runs here: one Unix-socket connection per request, HTTP/1.1 via hyper's client, on a
//! `reactor::block_on` in the CLI process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::broker::deadline::Deadline;
use crate::broker::reactor::Io;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::broker::datadir::DEFAULT_DATA_DIR;

/// Picks the socket: `--socket`, then `$EPHYR_SOCKET`, then `<data-dir>/ephyr.sock`.
pub fn socket_path(socket: Option<PathBuf>, data_dir: Option<&Path>) -> PathBuf {
    socket
        .or_else(|| std::env::var_os("EPHYR_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| data_dir.unwrap_or(Path::new(DEFAULT_DATA_DIR)).join("ephyr.sock"))
}

/// Sends `req` over `stream` (HTTP/1.1) and reads the whole answer, or gives up after `limit`.
async fn exchange<S>(
    stream: S,
    req: http::Request<Full<Bytes>>,
    limit: Duration,
) -> Result<(http::StatusCode, Bytes), String>
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(crate::broker::http::HyperIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, body))
    };
    let driven = futures_lite::future::or(exchange, async {
        let _ = conn.await;
        Err("the broker closed the connection".to_string())
    });
    futures_lite::future::or(driven, async {
        Deadline::after(limit).await;
        Err(format!("the broker did not answer within {}s", limit.as_secs()))
    })
    .await
}

/// The local API's refusal as one line: `code (status): message`.
pub fn refusal(status: http::StatusCode, v: &serde_json::Value) -> String {
    format!("{} ({status}): {}", v["error"].as_str().unwrap_or("error"), v["message"].as_str().unwrap_or(""))
}

/// One request to the local API that must succeed: its JSON body, or the refusal as one line.
pub fn request_ok(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let (status, v) = request(socket, method, path, body)?;
    if status.is_success() { Ok(v) } else { Err(refusal(status, &v)) }
}

/// One request to the local API; returns (status, JSON body).
pub fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(http::StatusCode, serde_json::Value), String> {
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
    request_bytes(socket, method, path, "application/json", bytes)
}

/// One request to the local API with a raw body (a secret: the buffer is zeroized after
/// sending); returns (status, JSON body).
pub fn request_bytes(
    socket: &Path,
    method: http::Method,
    path: &str,
    content_type: &'static str,
    bytes: Vec<u8>,
) -> Result<(http::StatusCode, serde_json::Value), String> {
    let bytes = zeroize::Zeroizing::new(bytes);
    crate::broker::reactor::block_on(async {
        let stream = Io::<std::os::unix::net::UnixStream>::connect(socket)
            .map_err(|e| format!("cannot reach the broker at {}: {e} (is `ephyr serve` running?)", socket.display()))?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::copy_from_slice(&bytes)))
            .map_err(|e| e.to_string())?;
        let (status, body) =
            exchange(stream, req, Duration::from_secs(30)).await.map_err(|e| format!("local API: {e}"))?;
        let json = serde_json::from_slice(&body)
            .map_err(|e| format!("local API answered {status} with a non-JSON body: {e}"))?;
        Ok((status, json))
    })
}

/// One POST to a broker's TCP listener (`http://` only; put TLS in front with a reverse proxy
/// and use the proxy's plain-HTTP side, or run the CLI on the broker host). Returns (status,
/// body).
pub fn post_tcp(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<(http::StatusCode, Vec<u8>), String> {
    // A command may run for up to an hour (the exec tool's longest timeout).
    request_tcp(http::Method::POST, url, headers, body, Duration::from_secs(3700))
}

/// One request to a broker's TCP listener (`http://` only, as [`post_tcp`]), answered within
/// `limit`. Returns (status, body).
pub fn request_tcp(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    limit: Duration,
) -> Result<(http::StatusCode, Vec<u8>), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(format!("--url {url:?}: scheme {other:?} is not supported by the CLI; use http://")),
        None => return Err(format!("--url {url:?} needs a scheme, e.g. http://broker:8554")),
    }
    let auth = uri.authority().ok_or_else(|| format!("--url {url:?} has no host"))?.clone();
    let port = auth.port_u16().unwrap_or(80);
    crate::broker::reactor::block_on(async {
        let addrs: Vec<std::net::SocketAddr> = {
            let host = auth.host().trim_start_matches('[').trim_end_matches(']').to_owned();
            smol::unblock(move || std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port)).map(|a| a.collect()))
                .await
                .map_err(|e| format!("{}: {e}", auth.host()))?
        };
        let addr = addrs.first().ok_or_else(|| format!("{}: no address", auth.host()))?;
        let stream =
            Io::<std::net::TcpStream>::connect(*addr).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
        let mut b = http::Request::builder().method(method).uri(uri.path()).header(http::header::HOST, auth.as_str());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
        let (status, body) = exchange(stream, req, limit).await?;
        Ok((status, body.to_vec()))
    })
}
