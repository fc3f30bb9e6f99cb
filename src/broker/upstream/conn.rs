//! Upstream connections: name resolution, TCP and TLS, and a pool of idle HTTP/1.1 connections.
//!
//! What runs here: `getaddrinfo` on the blocking pool (once per request for a name; IP literals
//! skip it), non-blocking `connect` on async-io, the rustls handshake (ring provider) on the
//! executor thread, and one executor task per connection driving hyper's client side. The
//! caller checks every resolved address before anything connects, and the connection goes to
//! one of exactly those addresses: no second lookup, so no DNS-rebinding window. TLS still
//! verifies the certificate against the host name (SNI and name check), or against the IP
//! address for an IP literal. Roots: the service's `tls.ca_file`, else the system bundle
//! (`$SSL_CERT_FILE`, `/etc/ssl/certs/ca-certificates.crt`, ...), read once.
//!
//! Idle connections are kept per (policy, service, host, port) — at most [`IDLE_PER_KEY`] each,
//! for [`IDLE_FOR`] — and handed out only when hyper says they are ready; a request that could
//! not be written on a reused connection is sent again on a new one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::broker::deadline::Deadline;
use crate::broker::reactor::Io;
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use smol::LocalExecutor;

use crate::broker::http::HyperIo;

/// A request sender on one upstream connection.
pub type Sender = SendRequest<Full<Bytes>>;

/// Idle connections kept per key.
pub const IDLE_PER_KEY: usize = 64;
/// How long an idle connection is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(60);
/// Largest response head (status line and headers) read from an upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// System CA bundles, in the order tried (`$SSL_CERT_FILE` first).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// A plain or TLS stream.
enum Stream {
    Plain(Io<TcpStream>),
    Tls(Box<futures_rustls::client::TlsStream<Io<TcpStream>>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s.get_ref(),
            Stream::Tls(s) => s.get_ref().0.get_ref(),
        }
    }
}

impl AsyncRead for Stream {
    /// Re-arms `TCP_QUICKACK` after each read: an upstream that writes its response head and
    /// first chunk separately without `TCP_NODELAY` (Python's http.server, many small servers)
    /// would otherwise wait for our delayed ACK, 40 ms, on every kept-alive connection.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = match this {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            let _ = std::os::linux::net::TcpStreamExt::set_quickack(this.tcp(), true);
        }
        r
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// Why no connection could be made.
#[derive(Debug)]
pub enum ConnectError {
    /// No address answered in time.
    Timeout(Duration),
    /// Every address refused or failed.
    Failed(String),
    /// The TLS handshake failed (certificate, name, protocol).
    Tls(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout(d) => write!(f, "no connection within {}s", d.as_secs_f64()),
            ConnectError::Failed(e) => f.write_str(e),
            ConnectError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

/// Where to connect.
pub struct Dest<'a> {
    /// Host name for SNI and the certificate check (or an IP literal).
    pub host: &'a str,
    /// Port.
    pub port: u16,
    /// The checked addresses (tried in order).
    pub addrs: &'a [IpAddr],
    /// TLS settings, for https.
    pub tls: Option<Arc<ClientConfig>>,
    /// Time for TCP and TLS together.
    pub timeout: Duration,
}

struct IdleConn {
    sender: Sender,
    since: Instant,
}

/// Connections of one broker (executor thread only).
pub struct Conns {
    ex: Rc<LocalExecutor<'static>>,
    idle: RefCell<HashMap<String, Vec<IdleConn>>>,
    tls: RefCell<HashMap<String, Arc<ClientConfig>>>,
    system_roots: RefCell<Option<Arc<RootCertStore>>>,
}

impl Conns {
    /// Connections whose drivers run on `ex`.
    pub fn new(ex: Rc<LocalExecutor<'static>>) -> Self {
        Conns {
            ex,
            idle: RefCell::new(HashMap::new()),
            tls: RefCell::new(HashMap::new()),
            system_roots: RefCell::new(None),
        }
    }

    /// Drops idle connections and TLS settings (policy reload, a secret changed).
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
        self.tls.borrow_mut().clear();
    }

    /// An idle connection for `key` that can take a request now.
    pub fn checkout(&self, key: &str) -> Option<Sender> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < IDLE_FOR && c.sender.is_ready() {
                return Some(c.sender);
            }
        }
        None
    }

    /// Returns a connection whose response has been read to the end. hyper may still be
    /// finishing that response; the connection joins the pool once it can take a request.
    pub fn checkin(self: &Rc<Self>, key: String, mut sender: Sender) {
        if sender.is_ready() {
            self.keep(key, sender);
        } else if !sender.is_closed() {
            let this = self.clone();
            self.ex
                .spawn(async move {
                    if std::future::poll_fn(|cx| sender.poll_ready(cx)).await.is_ok() {
                        this.keep(key, sender);
                    }
                })
                .detach();
        }
    }

    fn keep(&self, key: String, sender: Sender) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(key).or_default();
        list.retain(|c| c.since.elapsed() < IDLE_FOR && !c.sender.is_closed());
        if list.len() < IDLE_PER_KEY {
            list.push(IdleConn { sender, since: Instant::now() });
        }
    }

    /// A new connection to one of `d.addrs`.
    pub async fn connect(&self, d: &Dest<'_>) -> Result<Sender, ConnectError> {
        let attempt = async {
            let mut last = String::from("no address to connect to");
            for ip in d.addrs {
                let addr = SocketAddr::new(*ip, d.port);
                match Io::<TcpStream>::connect(addr).await {
                    Ok(tcp) => {
                        let _ = tcp.get_ref().set_nodelay(true);
                        return Ok((tcp, addr));
                    }
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            Err(ConnectError::Failed(last))
        };
        let connected = async {
            let (tcp, addr) = attempt.await?;
            let stream = match &d.tls {
                None => Stream::Plain(tcp),
                Some(cfg) => {
                    let name = server_name(d.host).map_err(ConnectError::Tls)?;
                    let tls = futures_rustls::TlsConnector::from(cfg.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| ConnectError::Tls(format!("handshake with {}: {e}", d.host)))?;
                    Stream::Tls(Box::new(tls))
                }
            };
            let (sender, conn) = hyper::client::conn::http1::Builder::new()
                .max_buf_size(MAX_RESPONSE_HEAD.max(8192))
                .handshake::<_, Full<Bytes>>(HyperIo::new(stream))
                .await
                .map_err(|e| ConnectError::Failed(format!("{addr}: {e}")))?;
            self.ex
                .spawn(async move {
                    if let Err(e) = conn.await {
                        log::debug!("upstream connection to {addr} ended: {e}");
                    }
                })
                .detach();
            Ok(sender)
        };
        futures_lite::future::or(connected, async {
            Deadline::after(d.timeout).await;
            Err(ConnectError::Timeout(d.timeout))
        })
        .await
    }

    /// TLS settings for a service, built once per `key` (policy digest and service).
    pub async fn tls_config(
        &self,
        pool: &crate::broker::blocking::BlockingPool,
        key: &str,
        ca_file: Option<&str>,
        client: Option<(&str, crate::secret::SecretBytes)>,
        pin: Option<[u8; 32]>,
    ) -> Result<Arc<ClientConfig>, String> {
        if let Some(c) = self.tls.borrow().get(key) {
            return Ok(c.clone());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let wants = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match (pin, ca_file) {
            // The pinned certificate is the trust: no CA, no name check (a homelab server's
            // self-signed certificate); the handshake signature is still verified with its key.
            (Some(fingerprint), _) => {
                wants.dangerous().with_custom_certificate_verifier(Arc::new(Pinned { fingerprint, algorithms }))
            }
            (None, Some(f)) => {
                let f = f.to_owned();
                let roots =
                    pool.run(move || load_roots(&[f.as_str()])).await.ok_or("the blocking pool is shut down")??;
                wants.with_root_certificates(Arc::new(roots))
            }
            (None, None) => wants.with_root_certificates(self.system_roots(pool).await?),
        };
        let mut cfg = match client {
            None => builder.with_no_client_auth(),
            Some((cert_file, key)) => {
                let cert_file = cert_file.to_owned();
                let chain =
                    pool.run(move || load_chain(&cert_file)).await.ok_or("the blocking pool is shut down")??;
                let key = PrivateKeyDer::from_pem_slice(key.expose())
                    .map_err(|e| format!("tls.client_key is not a PEM private key: {e}"))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("tls client certificate: {e}"))?
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        self.tls.borrow_mut().insert(key.to_owned(), cfg.clone());
        Ok(cfg)
    }

    async fn system_roots(&self, pool: &crate::broker::blocking::BlockingPool) -> Result<Arc<RootCertStore>, String> {
        if let Some(r) = self.system_roots.borrow().as_ref() {
            return Ok(r.clone());
        }
        let env = std::env::var("SSL_CERT_FILE").ok();
        let roots = pool
            .run(move || {
                let mut files: Vec<&str> = env.iter().map(String::as_str).collect();
                files.extend(SYSTEM_BUNDLES);
                let found: Vec<&str> = files.into_iter().filter(|f| std::path::Path::new(f).exists()).take(1).collect();
                if found.is_empty() {
                    return Err(
                        "no system CA bundle found (install ca-certificates, or set tls.ca_file for the service)"
                            .into(),
                    );
                }
                load_roots(&found)
            })
            .await
            .ok_or("the blocking pool is shut down")??;
        let roots = Arc::new(roots);
        *self.system_roots.borrow_mut() = Some(roots.clone());
        Ok(roots)
    }
}

fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?} is not a TLS server name: {e}")),
    }
}

fn load_roots(files: &[&str]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for f in files {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(f)
            .map_err(|e| format!("{f}: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{f}: {e}"))?;
        let (added, _) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("{f}: no usable CA certificate in it"));
        }
    }
    Ok(store)
}

fn load_chain(file: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("tls.client_cert {file}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.client_cert {file}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("tls.client_cert {file}: no certificate in it"));
    }
    Ok(chain)
}

/// Resolves `host` once; every address is returned (the caller checks them all).
pub async fn resolve(
    pool: &crate::broker::blocking::BlockingPool,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<IpAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let name = host.to_owned();
    let lookup = async {
        pool.run(move || {
            std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port)).map(|a| a.collect::<Vec<_>>())
        })
        .await
        .ok_or_else(|| "the blocking pool is shut down".to_string())?
        .map_err(|e| format!("cannot resolve {host}: {e}"))
    };
    let addrs = futures_lite::future::or(lookup, async {
        Deadline::after(timeout).await;
        Err(format!("resolving {host} took longer than {}s", timeout.as_secs()))
    })
    .await?;
    let mut ips: Vec<IpAddr> = Vec::with_capacity(addrs.len());
    for a in addrs {
        if !ips.contains(&a.ip()) {
            ips.push(a.ip());
        }
    }
    if ips.is_empty() {
        return Err(format!("{host} has no address"));
    }
    Ok(ips)
}

/// Trusts exactly one server certificate, by the SHA-256 of its DER encoding (`tls.fingerprint`).
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let seen = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if crate::secret::constant_time_eq(seen.as_ref(), &self.fingerprint) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate (SHA256:{}) is not the pinned one",
                data_encoding::HEXLOWER.encode(seen.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_and_ca_files() {
        assert!(matches!(server_name("127.0.0.1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("api.example.com"), Ok(ServerName::DnsName(_))));
        assert!(server_name("bad name").is_err());
        let dir = std::env::temp_dir().join(format!("ephyr-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("empty.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        assert!(load_roots(&[f.to_str().unwrap()]).unwrap_err().contains("no usable CA"));
        assert!(load_roots(&["/nonexistent/ca.pem"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn literals_skip_resolution_and_names_resolve_to_every_address() {
        let pool = crate::broker::blocking::BlockingPool::new(1, 4);
        crate::broker::reactor::block_on(async {
            assert_eq!(
                resolve(&pool, "::1", 80, Duration::from_secs(2)).await.unwrap(),
                ["::1".parse::<IpAddr>().unwrap()]
            );
            let local = resolve(&pool, "localhost", 80, Duration::from_secs(2)).await.unwrap();
            assert!(local.iter().all(|ip| ip.is_loopback()), "{local:?}");
            let e = resolve(&pool, "no-such-host.invalid", 80, Duration::from_secs(5)).await.unwrap_err();
            assert!(e.contains("no-such-host.invalid"), "{e}");
        });
    }
}
