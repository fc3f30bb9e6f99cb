//! Agent API keys: format, hashing and verification.
//!
//! A key is `ephyr_ak_` + base64url(8-byte key id) + base64url(32 random bytes). The policy stores
//! only an Argon2id PHC hash of the whole key, whose 16-byte salt *begins with the key id*. The
//! broker therefore finds the one agent a presented key can belong to by looking at the salts,
//! and runs Argon2 once for a plausible key and never for a key whose id matches no agent: a
//! wrong key cannot make it hash against every agent in turn. Keys without the id (hashed by
//! another tool) still work; they are tried against the agents whose salts carry no known id.

use std::collections::HashMap;

use argon2::password_hash::{PasswordVerifier, phc::PasswordHash};
use data_encoding::BASE64URL_NOPAD;

use crate::broker::policy::Policy;
use crate::secret::SecretString;

/// Prefix of every agent API key.
pub const PREFIX: &str = "ephyr_ak_";
/// Key id length (bytes); it is also the first part of the hash's salt.
const ID_LEN: usize = 8;
/// base64url length of the id.
const ID_CHARS: usize = 11;
/// base64url length of the 32 secret bytes.
const SECRET_CHARS: usize = 43;

/// The key id of a key in ephyr's format.
pub fn key_id(key: &str) -> Option<[u8; ID_LEN]> {
    let rest = key.strip_prefix(PREFIX)?;
    if rest.len() != ID_CHARS + SECRET_CHARS || !rest.is_ascii() {
        return None;
    }
    let id = BASE64URL_NOPAD.decode(&rest.as_bytes()[..ID_CHARS]).ok()?;
    id.try_into().ok()
}

/// A fresh key and its Argon2id PHC hash with `params`.
pub fn generate(params: argon2::Params) -> Result<(SecretString, String), String> {
    let mut id = [0u8; ID_LEN];
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    let mut salt_tail = [0u8; 16 - ID_LEN];
    for buf in [&mut id[..], &mut secret[..], &mut salt_tail[..]] {
        crate::signer::keys::random_bytes(buf).map_err(|e| e.to_string())?;
    }
    let key =
        SecretString::new(format!("{PREFIX}{}{}", BASE64URL_NOPAD.encode(&id), BASE64URL_NOPAD.encode(&secret[..])));
    let mut salt = [0u8; 16];
    salt[..ID_LEN].copy_from_slice(&id);
    salt[ID_LEN..].copy_from_slice(&salt_tail);
    let hash = hash_with_salt(key.expose(), params, &salt)?;
    Ok((key, hash))
}

/// Hashes any key string (one of ours keeps its id in the salt; others get a random salt).
pub fn hash(key: &str, params: argon2::Params) -> Result<String, String> {
    let mut salt = [0u8; 16];
    crate::signer::keys::random_bytes(&mut salt).map_err(|e| e.to_string())?;
    if let Some(id) = key_id(key) {
        salt[..ID_LEN].copy_from_slice(&id);
    }
    hash_with_salt(key, params, &salt)
}

fn hash_with_salt(key: &str, params: argon2::Params, salt: &[u8]) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_with_salt(key.as_bytes(), salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("argon2: {e}"))
}

/// Whether `key` matches `phc` (Argon2id; the output comparison is constant-time).
pub fn verify(key: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => argon2::Argon2::default().verify_password(key.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// The agents a key can belong to, by key id (built once per policy).
#[derive(Debug, Default)]
pub struct KeyIndex {
    by_id: HashMap<[u8; ID_LEN], Vec<(String, String)>>,
    all: Vec<(String, String)>,
}

impl KeyIndex {
    /// Indexes every agent with an API key.
    pub fn build(policy: &Policy) -> KeyIndex {
        let mut ix = KeyIndex::default();
        // Disabled agents too: their holders are told the agent is disabled, not that the key is wrong.
        for a in policy.agents.values() {
            let Some(phc) = &a.api_key_hash else { continue };
            let entry = (a.name.clone(), phc.clone());
            let salt = PasswordHash::new(phc).ok().and_then(|h| h.salt.map(|s| s.as_ref().to_vec()));
            if let Some(salt) = salt
                && salt.len() >= ID_LEN
            {
                let id: [u8; ID_LEN] = salt[..ID_LEN].try_into().unwrap_or_default();
                ix.by_id.entry(id).or_default().push(entry.clone());
            }
            ix.all.push(entry);
        }
        ix
    }

    /// The (agent, hash) pairs worth running Argon2 for. A key in our format is tried only
    /// against hashes whose salt starts with its id (usually one; none for a made-up key).
    /// Another key is tried against every agent.
    pub fn candidates(&self, key: &str) -> &[(String, String)] {
        match key_id(key) {
            Some(id) => self.by_id.get(&id).map(Vec::as_slice).unwrap_or(&[]),
            None => &self.all,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> argon2::Params {
        argon2::Params::new(256, 1, 1, None).unwrap()
    }

    #[test]
    fn generated_keys_carry_their_id_in_the_salt_and_verify() {
        let (key, phc) = generate(cheap()).unwrap();
        let k = key.expose();
        assert!(k.starts_with(PREFIX) && k.len() == PREFIX.len() + 54, "{k}");
        let id = key_id(k).unwrap();
        let salt = PasswordHash::new(&phc).unwrap().salt.unwrap().as_ref().to_vec();
        assert_eq!(&salt[..8], &id);
        assert!(verify(k, &phc));
        assert!(!verify(&format!("{k}x"), &phc));
        assert!(!verify(k, "not a hash"));
        // Not ours: no id.
        assert_eq!(key_id("ephyr_ak_short"), None);
        assert_eq!(key_id("sk-something-else"), None);
    }

    #[test]
    fn the_index_picks_the_one_agent_and_none_for_a_made_up_key() {
        let (k1, h1) = generate(cheap()).unwrap();
        let (k2, h2) = generate(cheap()).unwrap();
        let other = hash("custom-key-from-elsewhere", cheap()).unwrap();
        let text = format!(
            "agents:\n  a: {{api_key_hash: '{h1}'}}\n  b: {{api_key_hash: '{h2}'}}\n  c: {{api_key_hash: '{other}'}}\n"
        );
        let policy = Policy::parse(&text, "t").unwrap();
        let ix = KeyIndex::build(&policy);
        assert_eq!(ix.candidates(k1.expose()).iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(ix.candidates(k2.expose()).iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), ["b"]);
        let (fresh, _) = generate(cheap()).unwrap();
        assert!(ix.candidates(fresh.expose()).is_empty(), "a key of ours that no agent holds costs no Argon2");
        assert_eq!(ix.candidates("custom-key-from-elsewhere").len(), 3);
    }
}
