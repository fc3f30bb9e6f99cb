//! TLS on the broker's two TCP listeners (the MCP/API one and the dashboard): rustls on ring,
//! with either a certificate and key the operator gives (`--tls-cert`, `--tls-key`) or, when a
//! listener binds a non-loopback address and none is given, a local CA the broker makes in its
//! data dir (`<data-dir>/tls/`) and a server certificate it signs for the configured names and
//! addresses. Clients trust the CA once (docs/console.md, "TLS"); its fingerprint is in the log
//! banner, `ephyr status`, `ephyr doctor` and the console. SIGHUP re-reads the files: new
//! connections get the new certificate, open ones keep theirs.
//!
//! What runs here: files are read and certificates made on the calling thread at start-up
//! (before the privilege drop; the generated files belong to the broker's user) and on SIGHUP;
//! handshakes run on the executor (futures-rustls), bounded by a timeout in `http::serve_tcp`.
//! Resumption: rustls' in-memory session cache (256 entries) and TLS 1.3 tickets.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the certificate comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Files the operator gave (PEM chain, PEM key).
    Given {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// The broker's local CA in `dir`, and a server certificate for `names`.
    Local {
        /// `<data-dir>/tls`.
        dir: PathBuf,
        /// DNS names and IP addresses the server certificate covers.
        names: Vec<String>,
    },
}

/// The listeners' TLS settings, swapped whole on reload.
pub struct Tls {
    source: Source,
    config: RefCell<Arc<rustls::ServerConfig>>,
    fingerprint: RefCell<String>,
}

/// `SHA256:<hex>` of a DER certificate (the format `tls.fingerprint` pins take).
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    format!("SHA256:{}", data_encoding::HEXLOWER.encode(d.as_ref()))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: no usable PEM private key: {e}", path.display()))
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(cfg)
}

impl Tls {
    /// Loads (and, for [`Source::Local`], first makes or renews) the certificate.
    pub fn load(source: Source) -> Result<Tls, String> {
        let (cfg, fp) = Self::build(&source)?;
        Ok(Tls { source, config: RefCell::new(Arc::new(cfg)), fingerprint: RefCell::new(fp) })
    }

    fn build(source: &Source) -> Result<(rustls::ServerConfig, String), String> {
        match source {
            Source::Given { cert, key } => {
                let chain = read_chain(cert)?;
                let fp = fingerprint(&chain[0]);
                Ok((server_config(chain, read_key(key)?)?, fp))
            }
            Source::Local { dir, names } => {
                ensure_local_ca(dir, names)?;
                let chain = read_chain(&dir.join("server.pem"))?;
                let ca = read_chain(&dir.join("ca.pem"))?;
                let fp = fingerprint(&ca[0]);
                Ok((server_config(chain, read_key(&dir.join("server.key"))?)?, fp))
            }
        }
    }

    /// Re-reads the files; on any problem the current certificate stays. Returns the new
    /// fingerprint.
    pub fn reload(&self) -> Result<String, String> {
        let (cfg, fp) = Self::build(&self.source)?;
        *self.config.borrow_mut() = Arc::new(cfg);
        *self.fingerprint.borrow_mut() = fp.clone();
        Ok(fp)
    }

    /// An acceptor with the current settings.
    pub fn acceptor(&self) -> futures_rustls::TlsAcceptor {
        futures_rustls::TlsAcceptor::from(self.config.borrow().clone())
    }

    /// The fingerprint clients check: the local CA's, or the given certificate's.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.borrow().clone()
    }

    /// For status and the console: mode, fingerprint, the CA file to trust.
    pub fn describe(&self) -> serde_json::Value {
        match &self.source {
            Source::Given { cert, .. } => serde_json::json!({
                "mode": "given", "certificate": cert, "fingerprint": self.fingerprint(),
            }),
            Source::Local { dir, names } => serde_json::json!({
                "mode": "local_ca", "ca_file": dir.join("ca.pem"), "ca_fingerprint": self.fingerprint(), "names": names,
            }),
        }
    }
}

/// The names a generated server certificate covers: each listener's address (or, for an
/// unspecified one, this host's name, `<name>.local` and its primary address), `localhost`,
/// the loopback addresses, and every `--tls-name`.
pub fn local_names(listeners: &[SocketAddr], extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for l in listeners {
        if l.ip().is_unspecified() {
            if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
                let h = h.trim().to_ascii_lowercase();
                if !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
                    names.push(format!("{h}.local"));
                    names.push(h);
                }
            }
            // The address the default route leaves from (no packet is sent).
            if let Ok(s) = std::net::UdpSocket::bind(("0.0.0.0", 0))
                && s.connect(("192.0.2.1", 9)).is_ok()
                && let Ok(a) = s.local_addr()
            {
                names.push(a.ip().to_string());
            }
        } else {
            names.push(l.ip().to_string());
        }
    }
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.distinguished_name.push(rcgen::DnType::CommonName, "ephyr local CA");
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    p
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    crate::files::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| format!("{}: {e}", path.display()))
}

/// Makes the local CA in `dir` if it is not there, and a server certificate signed by it when
/// there is none, it covers other names than `names`, or it ends within 30 days.
pub fn ensure_local_ca(dir: &Path, names: &[String]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let now =
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(crate::time::now().secs().max(0) as u64);
    let (ca_key_path, ca_path) = (dir.join("ca.key"), dir.join("ca.pem"));
    let err = |e: rcgen::Error| format!("making the local CA: {e}");
    let ca_key = if ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path).map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
        rcgen::KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", ca_key_path.display()))?
    } else {
        let k = rcgen::KeyPair::generate().map_err(err)?;
        let mut p = ca_params();
        p.not_before = now - std::time::Duration::from_secs(3600);
        p.not_after = now + std::time::Duration::from_secs(10 * 366 * 86400);
        let cert = p.self_signed(&k).map_err(err)?;
        write_private(&ca_key_path, &k.serialize_pem())?;
        crate::files::write_atomic(&ca_path, cert.pem().as_bytes(), 0o644)
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        log::warn!("made a local CA for the listeners' TLS: {} (clients must trust it once)", ca_path.display());
        k
    };
    let names_path = dir.join("server.names");
    let want = names.join("\n");
    let fresh = std::fs::read_to_string(&names_path).is_ok_and(|n| n == want)
        && std::fs::read_to_string(dir.join("server.expires"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .is_some_and(|t| t > crate::time::now().secs() + 30 * 86400)
        && dir.join("server.pem").exists()
        && dir.join("server.key").exists();
    if fresh {
        return Ok(());
    }
    let mut p = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| format!("a TLS name is not valid: {e}"))?;
    p.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.not_before = now - std::time::Duration::from_secs(3600);
    let lifetime = 397 * 86400;
    p.not_after = now + std::time::Duration::from_secs(lifetime);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let issuer = rcgen::Issuer::new(ca_params(), &ca_key);
    let cert = p.signed_by(&key, &issuer).map_err(err)?;
    write_private(&dir.join("server.key"), &key.serialize_pem())?;
    crate::files::write_atomic(&dir.join("server.pem"), cert.pem().as_bytes(), 0o644).map_err(|e| e.to_string())?;
    crate::files::write_atomic(&names_path, want.as_bytes(), 0o644).map_err(|e| e.to_string())?;
    let expires = crate::time::now().secs() + lifetime as i64;
    crate::files::write_atomic(&dir.join("server.expires"), expires.to_string().as_bytes(), 0o644)
        .map_err(|e| e.to_string())?;
    log::info!("issued the listeners' TLS certificate for {}", names.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier as _;

    use super::*;

    #[test]
    fn local_ca_issues_a_chain_rustls_accepts_and_renews_on_new_names() {
        let dir = std::env::temp_dir().join(format!("ephyr-tls-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tls =
            Tls::load(Source::Local { dir: dir.clone(), names: vec!["localhost".into(), "127.0.0.1".into()] }).unwrap();
        let ca_fp = tls.fingerprint();
        assert!(ca_fp.starts_with("SHA256:") && ca_fp.len() == 71);
        // The server certificate verifies under the CA for its names.
        let ca = read_chain(&dir.join("ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca[0].clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = read_chain(&dir.join("server.pem")).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for name in ["localhost", "127.0.0.1"] {
            let sn = rustls::pki_types::ServerName::try_from(name).unwrap();
            verifier.verify_server_cert(&leaf[0], &[], &sn, &[], now).unwrap();
        }
        let other = rustls::pki_types::ServerName::try_from("pi.example").unwrap();
        assert!(verifier.verify_server_cert(&leaf[0], &[], &other, &[], now).is_err());
        // New names: a new server certificate, the same CA.
        Tls::load(Source::Local { dir: dir.clone(), names: vec!["localhost".into(), "pi.example".into()] }).unwrap();
        let leaf = read_chain(&dir.join("server.pem")).unwrap();
        verifier.verify_server_cert(&leaf[0], &[], &other, &[], now).unwrap();
        assert_eq!(fingerprint(&read_chain(&dir.join("ca.pem")).unwrap()[0]), ca_fp);
        let mode = std::fs::metadata(dir.join("ca.key"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
        assert_eq!(mode.unwrap(), 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
