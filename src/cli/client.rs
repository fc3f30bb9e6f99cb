//! A client for the broker's local Unix-socket API (used by `ephyr status`, `ephyr cert sign`, ...).
//!
//! What runs here: one Unix-socket connection per request, HTTP/1.1 via hyper's client, on a
//! `smol::block_on` in the CLI process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_io::{Async, Timer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::broker::datadir::DEFAULT_DATA_DIR;

/// Picks the socket: `--socket`, then `$EPHYR_SOCKET`, then `<data-dir>/ephyr.sock`.
pub fn socket_path(socket: Option<PathBuf>, data_dir: Option<&Path>) -> PathBuf {
    socket
        .or_else(|| std::env::var_os("EPHYR_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| data_dir.unwrap_or(Path::new(DEFAULT_DATA_DIR)).join("ephyr.sock"))
}

/// One request to the local API; returns (status, JSON body).
pub fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(http::StatusCode, serde_json::Value), String> {
    smol::block_on(async {
        let stream = Async::<std::os::unix::net::UnixStream>::connect(socket)
            .await
            .map_err(|e| format!("cannot reach the broker at {}: {e} (is `ephyr serve` running?)", socket.display()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(crate::broker::http::Io::new(stream))
                .await
                .map_err(|e| format!("local API handshake: {e}"))?;
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = sender.send_request(req).await.map_err(|e| format!("local API request: {e}"))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            let json = serde_json::from_slice(&body)
                .map_err(|e| format!("local API answered {status} with a non-JSON body: {e}"))?;
            Ok::<_, String>((status, json))
        };
        let driven = futures_lite::future::or(exchange, async {
            let _ = conn.await;
            Err("the broker closed the connection".to_string())
        });
        futures_lite::future::or(driven, async {
            Timer::after(Duration::from_secs(30)).await;
            Err("the broker did not answer within 30s".to_string())
        })
        .await
    })
}
