//! Wrappers for secret bytes: zeroized on drop, printed as `[redacted]`, compared in constant time.
//!
//! DESIGN.md invariant 7: CA key, sealing key, root keys, upstream credentials and API keys never
//! appear in logs, audit records, errors, `Debug` output or responses. Holding them in these types
//! makes an accidental `{:?}` harmless.

use std::fmt;
use zeroize::Zeroizing;

/// Secret bytes.
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes` (they are zeroized when this value is dropped).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret, for the one place that must use it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        constant_time_eq(&self.0, other)
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

impl Eq for SecretBytes {}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A secret string (API key, credential).
#[derive(Clone, Default)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Takes ownership of `s`.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The secret, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Written as the plain string, for records that are sealed as a whole (remote OAuth tokens);
/// the serialized bytes must go into a [`SecretBytes`].
impl serde::Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretString::new)
    }
}

/// Fills `buf` from the system CSPRNG (`getrandom`). Fails only when the kernel has no entropy
/// source at all.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), NoRandomness> {
    use ring::rand::SecureRandom as _;
    ring::rand::SystemRandom::new().fill(buf).map_err(|_| NoRandomness)
}

/// The system CSPRNG failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoRandomness;

impl fmt::Display for NoRandomness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the system random number generator failed")
    }
}

impl std::error::Error for NoRandomness {}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretBytes::new(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "[redacted]");
        let t = SecretString::new("hunter2".into());
        assert_eq!(format!("{t:?}"), "[redacted]");
        assert!(s.ct_eq(b"hunter2"));
        assert!(!s.ct_eq(b"hunter3"));
        assert!(!s.ct_eq(b"hunter"));
    }

    /// DESIGN.md invariant 7: every type that holds a secret prints without it.
    #[test]
    fn every_secret_holding_type_prints_redacted() {
        use crate::broker::auth::Credential;
        use crate::broker::upstream::scrub::Scrubber;
        use crate::signer::keys::{CaKey, SealingKey};
        use crate::signer::protocol::{Request, Response};
        const S: &str = "hunter2-SECRET-VALUE";
        let ca = CaKey::generate().unwrap();
        let seal = SealingKey::generate().unwrap();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut scrub = Scrubber::new(vec![S.as_bytes().to_vec()]);
        let _ = scrub.push(&S.as_bytes()[..8]); // holds the start of the secret
        let printed = [
            format!("{:?}", SecretBytes::new(S.as_bytes().to_vec())),
            format!("{:?}", SecretString::new(S.into())),
            format!("{:?}", crate::macaroon::RootKey::from_bytes(S.as_bytes())),
            format!("{:?}", Credential::ApiKey(S)),
            format!("{:?}", Credential::Token(S)),
            format!("{scrub:?}"),
            format!("{:?}", Request::Seal { context: "c".into(), plaintext: SecretBytes::new(S.as_bytes().to_vec()) }),
            format!("{:?}", Response::Unsealed(SecretBytes::new(S.as_bytes().to_vec()))),
            format!("{ca:?}"),
            format!("{seal:?}"),
        ];
        for p in &printed {
            assert!(!p.contains(S) && !p.contains(&S[..8]), "printed a secret: {p}");
            assert!(!p.contains(&hex(S.as_bytes())[..16]), "printed a secret in hex: {p}");
            assert!(!p.contains("104, 117, 110"), "printed a secret as bytes: {p}");
        }
        assert!(!format!("{seal:?}").contains(&hex(seal.expose())), "the sealing key");
    }
}
