//! The stored forms of an agent's API key (`api_key_hash`), as the policy holds them: parsed and
//! bounded here, used by `auth::api_key` to verify keys. Pure.

use data_encoding::BASE64URL_NOPAD;

/// Prefix of the fast stored form, `ephyr-sha256$<key id>$<digest>`.
pub const FAST_PREFIX: &str = "ephyr-sha256$";
/// Most Argon2id hashes a key in a foreign format is tried against (per request); a policy with
/// more refuses foreign-format keys.
pub const MAX_FOREIGN_CANDIDATES: usize = 4;

/// A key id (the first 8 bytes of an ephyr key, after its prefix).
pub type KeyId = [u8; 8];

/// Parses the fast stored form into (key id, digest).
pub fn parse_fast(stored: &str) -> Result<(KeyId, [u8; 32]), String> {
    let rest = stored.strip_prefix(FAST_PREFIX).ok_or_else(|| format!("does not start with {FAST_PREFIX}"))?;
    let (id, digest) = rest.split_once('$').ok_or("expected ephyr-sha256$<key id>$<digest>")?;
    let id: KeyId = BASE64URL_NOPAD
        .decode(id.as_bytes())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or("the key id is not 11 base64url characters (8 bytes)")?;
    let digest: [u8; 32] = BASE64URL_NOPAD
        .decode(digest.as_bytes())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or("the digest is not 43 base64url characters (32 bytes)")?;
    Ok((id, digest))
}
