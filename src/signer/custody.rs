//! What the signer does with its keys: answers [`Request`]s under its own limits.
//!
//! Sans-I/O: takes a request and the current time, returns a response. No files, no sockets; the
//! only system call is `getrandom` (certificate serials and nonces, AEAD nonces). The worker loop
//! feeds it frames.
//!
//! Limits enforced here, independently of the broker (DESIGN.md §1): certificate validity ≤ the cap
//! (hard maximum 24 h), principals only from the allow-list the signer was started with, a fixed
//! window rate limit on signatures (kept in a page shared with the keeper so a worker restart does
//! not reset it), Ed25519 subject keys only, and only the known OpenSSH extensions and options.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::signature::{Ed25519KeyPair, KeyPair};
use ssh_key::certificate::{Builder, CertType};
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, PublicKey, Signature};
use zeroize::Zeroizing;

use super::keys::{CaKey, SealingKey, random_bytes};
use super::protocol::{
    CertRequest, ErrorCode, ExecRequest, HARD_MAX_CERT_TTL_SECS, KNOWN_EXTENSIONS, MAX_BACKDATE_SECS,
    MAX_SEAL_PLAINTEXT, Request, Response, SandboxReport, SignerError, SignerLimits, StatusReport, checkpoint_message,
    exec, valid_principal,
};
use crate::os::SharedCounters;
use crate::secret::SecretBytes;

const SEAL_VERSION: u8 = 1;
const HKDF_SALT: &[u8] = b"ephyr-signer-keys-v1";

/// The signer's own configuration (from its command line, fixed for its lifetime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerConfig {
    /// Longest certificate validity (≤ 24 h).
    pub max_cert_ttl_secs: u32,
    /// Principals allowed in certificates.
    pub principals: BTreeSet<String>,
    /// Signatures per window.
    pub rate_limit: u32,
    /// Window length in seconds (≥ 1).
    pub rate_window_secs: u32,
    /// Targets that verify commands themselves: the exec envelopes the signer signs for them.
    pub sealed: std::collections::BTreeMap<String, exec::SealedTarget>,
}

impl SignerConfig {
    /// Checks the configuration itself.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_cert_ttl_secs == 0 || self.max_cert_ttl_secs > HARD_MAX_CERT_TTL_SECS {
            return Err(format!("certificate TTL cap must be between 1s and 24h, got {}s", self.max_cert_ttl_secs));
        }
        if self.rate_limit == 0 || self.rate_window_secs == 0 {
            return Err("signer rate limit and window must both be at least 1".into());
        }
        if let Some(bad) = self.principals.iter().find(|p| !valid_principal(p)) {
            return Err(format!("invalid principal {bad:?} (use letters, digits, '_', '-', '.', max 32)"));
        }
        Ok(())
    }

    fn limits(&self) -> SignerLimits {
        SignerLimits {
            max_cert_ttl_secs: self.max_cert_ttl_secs,
            principals: self.principals.iter().cloned().collect(),
            rate_limit: self.rate_limit,
            rate_window_secs: self.rate_window_secs,
            sealed: self.sealed.iter().map(|(name, t)| format!("{name} {}", t.digest())).collect(),
        }
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(master: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(master);
    let mut out = Zeroizing::new([0u8; 32]);
    prk.expand(&[info], Len(32))
        .and_then(|okm| okm.fill(&mut out[..]))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// The audit checkpoint key pair derived from the sealing key (the signer signs with it; `ephyr
/// init` writes its public half to `keys/audit_checkpoint.pub` for `ephyr audit verify`).
pub fn checkpoint_keypair(sealing: &SealingKey) -> Ed25519KeyPair {
    let seed = derive(sealing.expose(), b"audit checkpoint ed25519");
    Ed25519KeyPair::from_seed_unchecked(&seed[..]).expect("32-byte seed")
}

/// The keys in memory plus the limits; answers requests.
pub struct Custody {
    ca_public_line: String,
    ca: Ed25519KeyPair,
    ca_public: [u8; 32],
    seal: LessSafeKey,
    checkpoint: Ed25519KeyPair,
    config: SignerConfig,
    rate: SharedCounters,
    sandbox: SandboxReport,
}

impl Custody {
    /// Builds the custody from loaded keys. `rate` must be shared with every worker.
    pub fn new(ca: &CaKey, sealing: &SealingKey, config: SignerConfig, rate: SharedCounters) -> Self {
        let aead_key = derive(sealing.expose(), b"seal aes-256-gcm");
        let seal = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &aead_key[..]).expect("32-byte AES key"));
        let checkpoint = checkpoint_keypair(sealing);
        Self {
            ca_public_line: ca.public_line(),
            ca: ca.keypair(),
            ca_public: ca.public_bytes(),
            seal,
            checkpoint,
            config,
            rate,
            sandbox: SandboxReport {
                enforced: false,
                insecure_override: false,
                uid: 0,
                gid: 0,
                no_new_privs: false,
                dumpable: true,
                caps_cleared: false,
                landlock_abi: 0,
                landlock: super::protocol::LandlockState::NotEnforced,
                seccomp: super::protocol::SeccompState::NotEnforced,
                problems: vec!["sandbox not applied yet".into()],
            },
        }
    }

    /// Records the sandbox state to report in `Status`.
    pub fn set_sandbox(&mut self, report: SandboxReport) {
        self.sandbox = report;
    }

    /// The status report.
    pub fn status(&self) -> StatusReport {
        StatusReport {
            pid: std::process::id(),
            ca_public_key: self.ca_public_line.clone(),
            checkpoint_public_key: self.checkpoint.public_key().as_ref().to_vec(),
            sandbox: self.sandbox.clone(),
            limits: self.config.limits(),
        }
    }

    /// Answers one request at Unix time `now_secs`.
    pub fn handle(&self, req: Request, now_secs: u64) -> Response {
        let result = match req {
            Request::Status => Ok(Response::Status(self.status())),
            Request::SignUserCert(c) => self.sign_cert(&c, now_secs),
            Request::Seal { context, plaintext } => self.seal(&context, &plaintext).map(Response::Sealed),
            Request::Unseal { context, sealed } => self.unseal(&context, &sealed).map(Response::Unsealed),
            Request::SignCheckpoint { digest } => {
                Ok(Response::CheckpointSignature(self.checkpoint.sign(&checkpoint_message(&digest)).as_ref().to_vec()))
            }
            Request::SignExec(e) => self.sign_exec(&e, now_secs),
        };
        result.unwrap_or_else(Response::Error)
    }

    fn take_rate_slot(&self, now_secs: u64) -> Result<(), SignerError> {
        let slots = self.rate.slots();
        let window = now_secs / u64::from(self.config.rate_window_secs);
        // Window index is stored +1 so that the zeroed page means "no window yet".
        if slots[0].load(Ordering::Acquire) != window + 1 {
            slots[0].store(window + 1, Ordering::Release);
            slots[1].store(0, Ordering::Release);
        }
        let used = slots[1].fetch_add(1, Ordering::AcqRel) + 1;
        if used > u64::from(self.config.rate_limit) {
            return Err(refuse(
                ErrorCode::RateLimited,
                format!(
                    "signer rate limit reached: {} certificates per {}s; retry in {}s",
                    self.config.rate_limit,
                    self.config.rate_window_secs,
                    u64::from(self.config.rate_window_secs) - now_secs % u64::from(self.config.rate_window_secs)
                ),
            ));
        }
        Ok(())
    }

    fn sign_cert(&self, c: &CertRequest, now: u64) -> Result<Response, SignerError> {
        let subject = check_cert_request(c, &self.config, now)?;
        self.take_rate_slot(now)?;
        let mut nonce = [0u8; 16];
        let mut serial_bytes = [0u8; 8];
        random_bytes(&mut nonce).map_err(|_| internal("random number generator failed"))?;
        random_bytes(&mut serial_bytes).map_err(|_| internal("random number generator failed"))?;
        let serial = u64::from_be_bytes(serial_bytes);
        let bad = |what: &str| refuse(ErrorCode::InvalidRequest, format!("certificate builder rejected {what}"));
        let mut b =
            Builder::new(nonce.to_vec(), subject, c.valid_after, c.valid_before).map_err(|_| bad("the validity"))?;
        b.serial(serial).map_err(|_| bad("the serial"))?;
        b.cert_type(CertType::User).map_err(|_| bad("the type"))?;
        b.key_id(c.key_id.clone()).map_err(|_| bad("the key id"))?;
        for p in &c.principals {
            b.valid_principal(p.clone()).map_err(|_| bad("a principal"))?;
        }
        if let Some(fc) = &c.force_command {
            b.critical_option("force-command", fc.clone()).map_err(|_| bad("force-command"))?;
        }
        if let Some(sa) = &c.source_address {
            b.critical_option("source-address", sa.clone()).map_err(|_| bad("source-address"))?;
        }
        for e in &c.extensions {
            b.extension(e.clone(), "").map_err(|_| bad("an extension"))?;
        }
        let signer = RingCa { kp: &self.ca, public: self.ca_public };
        let cert = b.sign(&signer).map_err(|_| internal("signing failed"))?;
        let certificate = cert.to_openssh().map_err(|_| internal("encoding the certificate failed"))?;
        log::info!(
            "signed certificate serial={serial:016x} key_id={:?} principals={:?} validity={}..{}",
            c.key_id,
            c.principals,
            c.valid_after,
            c.valid_before
        );
        Ok(Response::Certificate { serial, certificate })
    }

    /// Signs an exec envelope: the target must be one the signer was started with as sealed, the
    /// principal one of its roles', the command within the target's command policy, the expiry
    /// within the certificate cap. The nonce is the signer's own.
    fn sign_exec(&self, e: &ExecRequest, now: u64) -> Result<Response, SignerError> {
        let sealed = self.config.sealed.get(&e.target).ok_or_else(|| {
            refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "target {:?} does not verify commands (the signer was not started with it as sealed)",
                    e.target
                ),
            )
        })?;
        if !sealed.principals.contains(&e.principal) {
            return Err(refuse(
                ErrorCode::PrincipalNotAllowed,
                format!("principal {:?} is not a role of target {:?}", e.principal, e.target),
            ));
        }
        if e.expires <= now {
            return Err(refuse(ErrorCode::ValidityInvalid, "the envelope would already be expired"));
        }
        if e.expires - now > u64::from(self.config.max_cert_ttl_secs) {
            return Err(refuse(ErrorCode::TtlTooLong, "the envelope would outlive the certificate cap"));
        }
        if e.command.trim().is_empty() || e.command.len() > exec::MAX_EXEC_COMMAND || e.command.contains('\0') {
            return Err(refuse(ErrorCode::InvalidRequest, "the command is empty, too long or has a NUL byte"));
        }
        if let Some(p) = &sealed.commands {
            crate::command::Parsed::parse(&e.command)
                .and_then(|parsed| p.check(&parsed, &e.command))
                .map_err(|r| refuse(ErrorCode::CommandRefused, format!("target {:?}: {r}", e.target)))?;
        }
        self.take_rate_slot(now)?;
        let mut nonce = [0u8; 16];
        random_bytes(&mut nonce).map_err(|_| internal("random number generator failed"))?;
        let envelope = exec::Envelope {
            target: e.target.clone(),
            principal: e.principal.clone(),
            expires: e.expires,
            nonce: data_encoding::HEXLOWER.encode(&nonce),
            command: e.command.clone(),
        };
        let text = envelope.to_text();
        let data = exec::signed_data(&text).map_err(|_| internal("building the signed data failed"))?;
        let sig = self.ca.sign(&data);
        let ca = KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(self.ca_public));
        let signature = exec::sshsig_pem(&ca, sig.as_ref()).map_err(|_| internal("encoding the signature failed"))?;
        log::info!(
            "signed exec envelope target={:?} principal={:?} nonce={} expires={}",
            e.target,
            e.principal,
            envelope.nonce,
            e.expires
        );
        Ok(Response::ExecSigned { envelope: text, signature })
    }

    fn seal(&self, context: &str, plaintext: &SecretBytes) -> Result<Vec<u8>, SignerError> {
        if plaintext.len() > MAX_SEAL_PLAINTEXT {
            return Err(refuse(ErrorCode::InvalidRequest, "plaintext larger than 8 KiB"));
        }
        let mut nonce = [0u8; 12];
        random_bytes(&mut nonce).map_err(|_| internal("random number generator failed"))?;
        let mut out = Vec::with_capacity(1 + 12 + plaintext.len() + 16);
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        let mut buf = Zeroizing::new(plaintext.expose().to_vec());
        let tag = self
            .seal
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), seal_aad(context), &mut buf[..])
            .map_err(|_| internal("sealing failed"))?;
        out.extend_from_slice(&buf);
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    fn unseal(&self, context: &str, sealed: &[u8]) -> Result<SecretBytes, SignerError> {
        let fail = || {
            refuse(
                ErrorCode::UnsealFailed,
                "sealed blob failed authentication (wrong context, tampered, or sealed by another key)",
            )
        };
        if sealed.len() < 1 + 12 + 16 || sealed[0] != SEAL_VERSION {
            return Err(fail());
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[1..13]).map_err(|_| fail())?;
        let mut buf = Zeroizing::new(sealed[13..].to_vec());
        let plain = self.seal.open_in_place(nonce, seal_aad(context), &mut buf[..]).map_err(|_| fail())?;
        Ok(SecretBytes::new(plain.to_vec()))
    }
}

fn seal_aad(context: &str) -> Aad<Vec<u8>> {
    let mut v = b"ephyr-seal-v1\0".to_vec();
    v.extend_from_slice(context.as_bytes());
    Aad::from(v)
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> SignerError {
    SignerError { code, message: message.into() }
}

fn internal(message: &str) -> SignerError {
    refuse(ErrorCode::Internal, message)
}

/// Checks a certificate request against the signer's limits; returns the parsed subject key.
pub fn check_cert_request(c: &CertRequest, cfg: &SignerConfig, now: u64) -> Result<KeyData, SignerError> {
    let invalid = |m: String| refuse(ErrorCode::InvalidRequest, m);
    let subject = PublicKey::from_openssh(c.public_key.trim())
        .map_err(|_| refuse(ErrorCode::InvalidPublicKey, "subject public key is not an OpenSSH public key"))?;
    if subject.algorithm() != Algorithm::Ed25519 {
        return Err(refuse(
            ErrorCode::InvalidPublicKey,
            format!("subject key must be ssh-ed25519, got {}", subject.algorithm()),
        ));
    }
    if c.principals.is_empty() {
        return Err(refuse(ErrorCode::PrincipalNotAllowed, "a certificate needs at least one principal"));
    }
    let mut seen = BTreeSet::new();
    for p in &c.principals {
        if !cfg.principals.contains(p) {
            return Err(refuse(
                ErrorCode::PrincipalNotAllowed,
                format!("principal {p:?} is not on the signer's allow-list"),
            ));
        }
        if !seen.insert(p) {
            return Err(invalid(format!("principal {p:?} listed twice")));
        }
    }
    if c.key_id.is_empty() || c.key_id.len() > 256 || !c.key_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("key id must be 1-256 printable ASCII characters without spaces".into()));
    }
    if c.valid_before <= c.valid_after {
        return Err(refuse(ErrorCode::ValidityInvalid, "valid_before must be after valid_after"));
    }
    if c.valid_before <= now {
        return Err(refuse(ErrorCode::ValidityInvalid, "the validity window is already over"));
    }
    if c.valid_after + MAX_BACKDATE_SECS < now {
        return Err(refuse(
            ErrorCode::ValidityInvalid,
            format!("valid_after may start at most {MAX_BACKDATE_SECS}s in the past"),
        ));
    }
    let cap = u64::from(cfg.max_cert_ttl_secs);
    if c.valid_before - now > cap || c.valid_before - c.valid_after > cap + MAX_BACKDATE_SECS {
        return Err(refuse(
            ErrorCode::TtlTooLong,
            format!(
                "requested validity {}s exceeds the signer's cap of {cap}s",
                c.valid_before - c.valid_after.max(now)
            ),
        ));
    }
    if let Some(fc) = &c.force_command
        && (fc.is_empty() || fc.len() > 4096 || fc.contains('\0'))
    {
        return Err(invalid("force-command must be 1-4096 bytes without NUL".into()));
    }
    if let Some(sa) = &c.source_address {
        check_source_address(sa).map_err(invalid)?;
    }
    let mut seen_ext = BTreeSet::new();
    for e in &c.extensions {
        if !KNOWN_EXTENSIONS.contains(&e.as_str()) {
            return Err(invalid(format!("unknown certificate extension {e:?}")));
        }
        if !seen_ext.insert(e) {
            return Err(invalid(format!("extension {e:?} listed twice")));
        }
    }
    Ok(subject.key_data().clone())
}

fn check_source_address(list: &str) -> Result<(), String> {
    if list.is_empty() {
        return Err("source-address must not be empty".into());
    }
    for item in list.split(',') {
        let (addr, prefix) = match item.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (item, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| format!("source-address entry {item:?} is not an IP or CIDR"))?;
        if let Some(p) = prefix {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => {}
                _ => {
                    return Err(format!("source-address entry {item:?} has a bad prefix length"));
                }
            }
        }
    }
    Ok(())
}

/// The CA key as an `ssh-key` signer, backed by ring (no second Ed25519 implementation).
struct RingCa<'a> {
    kp: &'a Ed25519KeyPair,
    public: [u8; 32],
}

impl signature::Signer<Signature> for RingCa<'_> {
    fn try_sign(&self, msg: &[u8]) -> Result<Signature, signature::Error> {
        Signature::new(Algorithm::Ed25519, self.kp.sign(msg).as_ref().to_vec()).map_err(|_| signature::Error::new())
    }
}

impl From<&RingCa<'_>> for KeyData {
    fn from(ca: &RingCa<'_>) -> KeyData {
        KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(ca.public))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::protocol::verify_checkpoint;
    use ssh_key::Certificate;

    fn custody(rate: u32) -> Custody {
        let cfg = SignerConfig {
            max_cert_ttl_secs: 3600,
            principals: ["agent-read".to_string(), "agent-op".to_string()].into(),
            rate_limit: rate,
            rate_window_secs: 60,
            sealed: [(
                "web".to_string(),
                exec::SealedTarget {
                    principals: ["agent-read".to_string()].into(),
                    commands: Some(crate::command::CommandPolicy {
                        allow: vec![crate::command::AllowRule::parse("uptime").unwrap()],
                        ..Default::default()
                    }),
                },
            )]
            .into(),
        };
        Custody::new(&CaKey::generate().unwrap(), &SealingKey::generate().unwrap(), cfg, SharedCounters::new().unwrap())
    }

    /// The signer signs exec envelopes only for its sealed targets, their principals, commands
    /// within the target's policy (whatever the broker asks), and within the certificate cap.
    #[test]
    fn exec_envelopes_are_signed_only_within_the_sealed_targets_policy() {
        let c = custody(100);
        let ask = |target: &str, principal: &str, command: &str, expires: u64| {
            c.handle(
                Request::SignExec(ExecRequest {
                    target: target.into(),
                    principal: principal.into(),
                    command: command.into(),
                    expires,
                }),
                NOW,
            )
        };
        let Response::ExecSigned { envelope, signature } = ask("web", "agent-read", "uptime", NOW + 60) else {
            panic!("expected an envelope")
        };
        let ca = PublicKey::from_openssh(&c.status().ca_public_key).unwrap();
        let e = exec::verify_wire(&exec::to_wire(&envelope, &signature), &ca).unwrap();
        assert_eq!((e.target.as_str(), e.principal.as_str(), e.command.as_str()), ("web", "agent-read", "uptime"));
        for (target, principal, command, expires, code) in [
            ("web", "agent-read", "uptime; rm -rf /", NOW + 60, ErrorCode::CommandRefused),
            ("web", "agent-read", "bash -c uptime", NOW + 60, ErrorCode::CommandRefused),
            ("db", "agent-read", "uptime", NOW + 60, ErrorCode::InvalidRequest),
            ("web", "agent-op", "uptime", NOW + 60, ErrorCode::PrincipalNotAllowed),
            ("web", "agent-read", "uptime", NOW, ErrorCode::ValidityInvalid),
            ("web", "agent-read", "uptime", NOW + 7200, ErrorCode::TtlTooLong),
            ("web", "agent-read", " ", NOW + 60, ErrorCode::InvalidRequest),
        ] {
            match ask(target, principal, command, expires) {
                Response::Error(err) => assert_eq!(err.code, code, "{target} {principal} {command:?}: {err}"),
                other => panic!("{target} {principal} {command:?}: signed {other:?}"),
            }
        }
        // Two envelopes for the same command have different nonces.
        let Response::ExecSigned { envelope: again, .. } = ask("web", "agent-read", "uptime", NOW + 60) else {
            panic!()
        };
        assert_ne!(exec::Envelope::parse(&again).unwrap().nonce, e.nonce);
    }

    fn subject() -> String {
        CaKey::generate().unwrap().public_line()
    }

    fn req(now: u64) -> CertRequest {
        CertRequest {
            public_key: subject(),
            principals: vec!["agent-read".into()],
            key_id: "ephyr:claude:01J:1".into(),
            valid_after: now - 30,
            valid_before: now + 300,
            force_command: Some("/usr/bin/id -un".into()),
            source_address: Some("127.0.0.1/32,::1".into()),
            extensions: vec!["permit-pty".into()],
        }
    }

    const NOW: u64 = 1_900_000_000;

    #[test]
    fn signs_a_certificate_that_verifies_under_the_ca() {
        let c = custody(10);
        let Response::Certificate { serial, certificate } = c.handle(Request::SignUserCert(req(NOW)), NOW) else {
            panic!("expected a certificate")
        };
        let cert = Certificate::from_openssh(&certificate).unwrap();
        assert_eq!(cert.serial(), serial);
        assert_eq!(cert.valid_principals(), ["agent-read"]);
        assert_eq!(cert.key_id(), "ephyr:claude:01J:1");
        assert_eq!(cert.critical_options().get("force-command").map(String::as_str), Some("/usr/bin/id -un"));
        assert!(cert.extensions().contains_key("permit-pty"));
        assert!(!cert.extensions().contains_key("permit-port-forwarding"));
        // The CA signature verifies with ring over the to-be-signed bytes (everything before the
        // trailing signature field: u32 length + string "ssh-ed25519" + string(64-byte signature)).
        let KeyData::Ed25519(ca) = cert.signature_key() else { panic!("ed25519 CA") };
        assert_eq!(ca.0, c.ca_public);
        let wire = cert.to_bytes().unwrap();
        let tbs = &wire[..wire.len() - (4 + 4 + 11 + 4 + 64)];
        let verifier = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, ca.0);
        verifier.verify(tbs, cert.signature().as_bytes()).expect("CA signature verifies");
        let mut forged = tbs.to_vec();
        forged[20] ^= 1;
        assert!(verifier.verify(&forged, cert.signature().as_bytes()).is_err());
        let line = c.status().ca_public_key;
        assert!(line.ends_with(&format!(" {}", super::super::keys::CA_COMMENT)));
    }

    #[test]
    fn refuses_outside_its_own_limits() {
        let c = custody(10);
        type Mutation = Box<dyn Fn(&mut CertRequest)>;
        let cases: Vec<(Mutation, ErrorCode)> = vec![
            (Box::new(|r| r.principals = vec!["root".into()]), ErrorCode::PrincipalNotAllowed),
            (Box::new(|r| r.principals = vec![]), ErrorCode::PrincipalNotAllowed),
            (Box::new(|r| r.principals = vec!["agent-read".into(), "agent-read".into()]), ErrorCode::InvalidRequest),
            (Box::new(|r| r.valid_before = NOW + 3601), ErrorCode::TtlTooLong),
            (Box::new(|r| r.valid_before = NOW + 90_000), ErrorCode::TtlTooLong),
            (Box::new(|r| r.valid_after = NOW - 10_000), ErrorCode::ValidityInvalid),
            (Box::new(|r| r.valid_before = NOW - 1), ErrorCode::ValidityInvalid),
            (Box::new(|r| r.valid_before = r.valid_after), ErrorCode::ValidityInvalid),
            (Box::new(|r| r.public_key = "ssh-rsa AAAA".into()), ErrorCode::InvalidPublicKey),
            (Box::new(|r| r.public_key = "not a key".into()), ErrorCode::InvalidPublicKey),
            (Box::new(|r| r.key_id = String::new()), ErrorCode::InvalidRequest),
            (Box::new(|r| r.key_id = "has space".into()), ErrorCode::InvalidRequest),
            (Box::new(|r| r.extensions = vec!["permit-everything".into()]), ErrorCode::InvalidRequest),
            (Box::new(|r| r.source_address = Some("10.0.0.0/33".into())), ErrorCode::InvalidRequest),
            (Box::new(|r| r.source_address = Some("example.com".into())), ErrorCode::InvalidRequest),
            (Box::new(|r| r.force_command = Some("a\0b".into())), ErrorCode::InvalidRequest),
        ];
        for (i, (mutate, code)) in cases.iter().enumerate() {
            let mut r = req(NOW);
            mutate(&mut r);
            match c.handle(Request::SignUserCert(r), NOW) {
                Response::Error(e) => assert_eq!(e.code, *code, "case {i}: {}", e.message),
                other => panic!("case {i}: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn rate_limit_is_per_window_and_shared() {
        let c = custody(2);
        for _ in 0..2 {
            assert!(matches!(c.handle(Request::SignUserCert(req(NOW)), NOW), Response::Certificate { .. }));
        }
        let Response::Error(e) = c.handle(Request::SignUserCert(req(NOW)), NOW) else { panic!() };
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.message.contains("retry in"), "{}", e.message);
        // A refused request (bad principal) does not consume budget, and a new window resets it.
        let later = NOW + 60;
        assert!(matches!(c.handle(Request::SignUserCert(req(later)), later), Response::Certificate { .. }));
    }

    #[test]
    fn seal_round_trips_and_binds_context() {
        let c = custody(1);
        let secret = SecretBytes::new(b"root key bytes".to_vec());
        let Response::Sealed(blob) =
            c.handle(Request::Seal { context: "rootkey:A".into(), plaintext: secret.clone() }, NOW)
        else {
            panic!()
        };
        assert!(!blob.windows(5).any(|w| w == b"root "), "plaintext visible in blob");
        let Response::Unsealed(back) =
            c.handle(Request::Unseal { context: "rootkey:A".into(), sealed: blob.clone() }, NOW)
        else {
            panic!()
        };
        assert_eq!(back.expose(), secret.expose());
        let wrong = c.handle(Request::Unseal { context: "rootkey:B".into(), sealed: blob.clone() }, NOW);
        assert!(matches!(wrong, Response::Error(SignerError { code: ErrorCode::UnsealFailed, .. })));
        let mut tampered = blob.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let t = c.handle(Request::Unseal { context: "rootkey:A".into(), sealed: tampered }, NOW);
        assert!(matches!(t, Response::Error(SignerError { code: ErrorCode::UnsealFailed, .. })));
        // Another signer's key cannot open it.
        let other = custody(1);
        let o = other.handle(Request::Unseal { context: "rootkey:A".into(), sealed: blob }, NOW);
        assert!(matches!(o, Response::Error(SignerError { code: ErrorCode::UnsealFailed, .. })));
    }

    #[test]
    fn checkpoint_signatures_are_domain_separated() {
        let c = custody(1);
        let digest = [5u8; 32];
        let Response::CheckpointSignature(sig) = c.handle(Request::SignCheckpoint { digest }, NOW) else { panic!() };
        let pk = c.status().checkpoint_public_key;
        assert!(verify_checkpoint(&pk, &digest, &sig));
        assert!(!verify_checkpoint(&pk, &[6u8; 32], &sig));
        // The checkpoint key is not the CA key, and a raw-digest signature would not verify.
        assert_ne!(pk, c.ca_public.to_vec());
        assert!(ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &pk).verify(&digest, &sig).is_err());
    }

    #[test]
    fn config_validation() {
        let mut cfg = SignerConfig {
            max_cert_ttl_secs: 90_000,
            principals: ["ok".to_string()].into(),
            rate_limit: 1,
            rate_window_secs: 1,
            sealed: Default::default(),
        };
        assert!(cfg.validate().unwrap_err().contains("24h"));
        cfg.max_cert_ttl_secs = 60;
        assert!(cfg.validate().is_ok());
        cfg.principals.insert("-rf".into());
        assert!(cfg.validate().is_err());
    }
}
