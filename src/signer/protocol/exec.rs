//! The exec envelope of targets that verify commands themselves (`verify_on_target`): what the
//! signer signs for one command, how it travels to the target, and how `ephyr shim` there checks
//! it. Pure.
//!
//! The envelope is text, one `key=value` per line, after the line `ephyr-exec-v1`: `target`,
//! `principal`, `expires` (Unix seconds), `nonce` (32 hex, single use on the target) and `command`
//! (base64 of its exact bytes). The signature is an SSHSIG (OpenSSH's `ssh-keygen -Y` format) by
//! the user CA under the namespace [`NAMESPACE`]: SSHSIG's own preamble and the namespace keep it
//! from ever being taken for a certificate or an authentication signature. On the wire (the SSH
//! exec request, which sshd hands to the forced command as `SSH_ORIGINAL_COMMAND`) it is
//! `ephyr-exec-v1 <base64url envelope> <base64url SSHSIG PEM>`.

use data_encoding::{BASE64, BASE64URL_NOPAD};
use ssh_key::{HashAlg, LineEnding, PublicKey, SshSig, public::KeyData};

/// SSHSIG namespace of exec envelopes.
pub const NAMESPACE: &str = "exec@ephyr";
/// First line of the envelope and first word on the wire.
pub const VERSION: &str = "ephyr-exec-v1";
/// Longest command an envelope carries.
pub const MAX_EXEC_COMMAND: usize = 8192;

/// A `verify_on_target` target as the signer knows it (from its command line, fixed for its
/// life): who may run there, and the target's command policy, checked before an envelope is signed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SealedTarget {
    /// Principals of the target's roles.
    pub principals: std::collections::BTreeSet<String>,
    /// The target's command policy, if it has one.
    pub commands: Option<crate::command::CommandPolicy>,
}

impl SealedTarget {
    /// SHA-256 (hex) of its canonical JSON: the broker compares it after a reload.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).expect("a sealed target serialises");
        data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, &json).as_ref())
    }
}

/// One command, as the signer signs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Target name (the shim's `--target`).
    pub target: String,
    /// The Unix user it runs as.
    pub principal: String,
    /// Valid strictly before this (Unix seconds).
    pub expires: u64,
    /// 32 lower-case hex digits, single use on the target.
    pub nonce: String,
    /// The exact command.
    pub command: String,
}

impl Envelope {
    /// The signed text.
    pub fn to_text(&self) -> String {
        format!(
            "{VERSION}\ntarget={}\nprincipal={}\nexpires={}\nnonce={}\ncommand={}\n",
            self.target,
            self.principal,
            self.expires,
            self.nonce,
            BASE64.encode(self.command.as_bytes())
        )
    }

    /// Parses the text exactly as [`Envelope::to_text`] writes it (anything else is refused).
    pub fn parse(text: &str) -> Result<Envelope, String> {
        let mut lines = text.strip_suffix('\n').ok_or("the envelope does not end with a newline")?.split('\n');
        if lines.next() != Some(VERSION) {
            return Err(format!("not an {VERSION} envelope"));
        }
        let mut field = |key: &str| -> Result<&str, String> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .ok_or_else(|| format!("the envelope lacks {key}= in its place"))
        };
        let target = field("target")?.to_owned();
        let principal = field("principal")?.to_owned();
        let expires_text = field("expires")?;
        let expires = expires_text
            .parse::<u64>()
            .ok()
            .filter(|_| expires_text.bytes().all(|b| b.is_ascii_digit()))
            .ok_or("expires is not a number")?;
        let nonce = field("nonce")?.to_owned();
        if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err("nonce is not 32 lower-case hex digits".into());
        }
        let command = BASE64
            .decode(field("command")?.as_bytes())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or("command is not base64 of UTF-8")?;
        if lines.next().is_some() {
            return Err("the envelope has lines after command=".into());
        }
        let e = Envelope { target, principal, expires, nonce, command };
        if e.to_text() != text {
            return Err("the envelope is not in canonical form".into());
        }
        Ok(e)
    }
}

/// What the signer signs: SSHSIG's signed data for `text` under [`NAMESPACE`].
pub fn signed_data(text: &str) -> Result<Vec<u8>, String> {
    SshSig::signed_data(NAMESPACE, HashAlg::Sha512, text.as_bytes()).map_err(|e| e.to_string())
}

/// The SSHSIG (PEM) for an Ed25519 signature `sig` over [`signed_data`] by `ca`.
pub fn sshsig_pem(ca: &KeyData, sig: &[u8]) -> Result<String, String> {
    let sig = ssh_key::Signature::new(ssh_key::Algorithm::Ed25519, sig.to_vec()).map_err(|e| e.to_string())?;
    SshSig::new(ca.clone(), NAMESPACE, HashAlg::Sha512, sig)
        .and_then(|s| s.to_pem(LineEnding::LF))
        .map_err(|e| e.to_string())
}

/// The exec request text that carries an envelope and its signature.
pub fn to_wire(text: &str, sshsig_pem: &str) -> String {
    format!("{VERSION} {} {}", BASE64URL_NOPAD.encode(text.as_bytes()), BASE64URL_NOPAD.encode(sshsig_pem.as_bytes()))
}

/// Checks what arrived on the wire against the CA: the signature, then the envelope's form.
/// Returns the envelope; the caller checks target, principal, expiry and the nonce.
pub fn verify_wire(wire: &str, ca: &PublicKey) -> Result<Envelope, String> {
    let mut parts = wire.split(' ');
    if parts.next() != Some(VERSION) {
        return Err(format!("the command does not come with an {VERSION} envelope"));
    }
    let (Some(text), Some(sig), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected `ephyr-exec-v1 ENVELOPE SIGNATURE`".into());
    };
    let decode = |s: &str, what: &str| -> Result<String, String> {
        BASE64URL_NOPAD
            .decode(s.as_bytes())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| format!("the {what} is not base64url of text"))
    };
    let (text, sig) = (decode(text, "envelope")?, decode(sig, "signature")?);
    let sig = SshSig::from_pem(sig.as_bytes()).map_err(|e| format!("the signature is not an SSHSIG: {e}"))?;
    if sig.namespace() != NAMESPACE || sig.hash_alg() != HashAlg::Sha512 {
        return Err(format!("the signature is not for namespace {NAMESPACE} with SHA-512"));
    }
    let (KeyData::Ed25519(signer), KeyData::Ed25519(trusted)) = (sig.public_key(), ca.key_data()) else {
        return Err("the signature and the CA must both be Ed25519".into());
    };
    if signer != trusted {
        return Err("the signature is not by the trusted CA".into());
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, trusted.as_ref())
        .verify(&signed_data(&text)?, sig.signature_bytes())
        .map_err(|_| "the signature does not match the envelope".to_owned())?;
    Envelope::parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn ca() -> (Ed25519KeyPair, PublicKey) {
        let kp = Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap();
        let pk: [u8; 32] = kp.public_key().as_ref().try_into().unwrap();
        let key = PublicKey::from(KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(pk)));
        (kp, key)
    }

    fn signed(kp: &Ed25519KeyPair, ca: &PublicKey, e: &Envelope) -> String {
        let text = e.to_text();
        let sig = kp.sign(&signed_data(&text).unwrap());
        to_wire(&text, &sshsig_pem(ca.key_data(), sig.as_ref()).unwrap())
    }

    fn envelope() -> Envelope {
        Envelope {
            target: "web".into(),
            principal: "agent-ro".into(),
            expires: 1_900_000_000,
            nonce: "0123456789abcdef0123456789abcdef".into(),
            command: "ls -la /etc; echo 'ü'\n".into(),
        }
    }

    #[test]
    fn a_signed_envelope_verifies_and_round_trips() {
        let (kp, ca) = ca();
        let wire = signed(&kp, &ca, &envelope());
        assert!(!wire.contains('\n') && !wire.contains('\''), "one shell-safe word per part: {wire}");
        assert_eq!(verify_wire(&wire, &ca).unwrap(), envelope());
    }

    #[test]
    fn altered_forged_or_foreign_envelopes_are_refused() {
        let (kp, ca) = ca();
        let wire = signed(&kp, &ca, &envelope());
        let parts: Vec<&str> = wire.split(' ').collect();
        // The command changed after signing.
        let other = Envelope { command: "rm -rf /".into(), ..envelope() };
        let forged = format!("{} {} {}", parts[0], BASE64URL_NOPAD.encode(other.to_text().as_bytes()), parts[2]);
        assert_eq!(verify_wire(&forged, &ca).unwrap_err(), "the signature does not match the envelope");
        // Another key.
        let kp2 = Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).unwrap();
        let wire2 = signed(&kp2, &ca, &envelope());
        assert!(verify_wire(&wire2, &ca).is_err());
        // A plain command, a truncated wire, a bad encoding.
        for bad in ["ls -la", "ephyr-exec-v1", "ephyr-exec-v1 a", "ephyr-exec-v1 !! ??", &format!("{wire} extra")] {
            assert!(verify_wire(bad, &ca).is_err(), "{bad}");
        }
        assert!(Envelope::parse(&envelope().to_text().replace("expires=1900000000", "expires=+1900000000")).is_err());
        assert!(Envelope::parse(&(envelope().to_text() + "x=y\n")).is_err());
    }
}
