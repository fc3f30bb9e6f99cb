//! Agent API keys: format, stored forms and verification.
//!
//! A key is `ephyr_ak_` + base64url(8-byte key id) + base64url(32 random bytes). The policy
//! stores one of two forms in `api_key_hash`:
//!
//! - **`ephyr-sha256$<id>$<digest>`** (what `ephyr keygen agent` writes): the key id and
//!   SHA-256 of the whole key, both base64url. The key carries 256 random bits, so a fast hash
//!   protects it as well as a memory-hard one would (nobody can enumerate 2^256 candidates), and
//!   verification is one SHA-256 and a constant-time compare on the executor thread: no pool, no
//!   queue, nothing a stranger can fill. An index by key id finds the one agent a key can belong
//!   to, so a wrong key costs one hash.
//! - **an Argon2id PHC string**, for keys that are *not* in ephyr's format (chosen by a person,
//!   made by another tool) and for hashes written by earlier versions. An ephyr-format key under
//!   an Argon2id hash is found by the id at the start of the salt (one Argon2 run); on success the
//!   broker logs the `ephyr-sha256` line to paste instead. A key in another format is tried
//!   against at most [`MAX_FOREIGN_CANDIDATES`] Argon2id hashes: a policy with more refuses such
//!   keys (and says so when it loads), so the Argon2 work per request is bounded either way.
//!
//! What runs here: pure functions; the caller (`auth`) runs Argon2 on the blocking pool.

use std::collections::HashMap;

use argon2::password_hash::{PasswordVerifier, phc::PasswordHash};
use data_encoding::BASE64URL_NOPAD;

use crate::broker::policy::Policy;
pub use crate::broker::policy::key_hash::{FAST_PREFIX, KeyId, MAX_FOREIGN_CANDIDATES, parse_fast};
use crate::secret::SecretString;

/// Prefix of every agent API key.
pub const PREFIX: &str = "ephyr_ak_";
/// Key id length (bytes); it is also the first part of an Argon2 hash's salt.
const ID_LEN: usize = 8;
/// base64url length of the id.
const ID_CHARS: usize = 11;
/// base64url length of the 32 secret bytes.
const SECRET_CHARS: usize = 43;

/// The key id of a key in ephyr's format.
pub fn key_id(key: &str) -> Option<KeyId> {
    let rest = key.strip_prefix(PREFIX)?;
    if rest.len() != ID_CHARS + SECRET_CHARS || !rest.is_ascii() {
        return None;
    }
    let id = BASE64URL_NOPAD.decode(&rest.as_bytes()[..ID_CHARS]).ok()?;
    id.try_into().ok()
}

fn sha256(key: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The fast stored form of an ephyr-format key (`None` for a key in another format).
pub fn fast_hash(key: &str) -> Option<String> {
    let id = key_id(key)?;
    Some(format!("{FAST_PREFIX}{}${}", BASE64URL_NOPAD.encode(&id), BASE64URL_NOPAD.encode(&sha256(key))))
}

/// A fresh key and its fast stored form.
pub fn generate() -> Result<(SecretString, String), String> {
    let mut id = [0u8; ID_LEN];
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    for buf in [&mut id[..], &mut secret[..]] {
        crate::secret::random_bytes(buf).map_err(|e| e.to_string())?;
    }
    let key =
        SecretString::new(format!("{PREFIX}{}{}", BASE64URL_NOPAD.encode(&id), BASE64URL_NOPAD.encode(&secret[..])));
    let stored = fast_hash(key.expose()).ok_or("generated key has no id")?;
    Ok((key, stored))
}

/// An Argon2id PHC hash of any key string (one of ours keeps its id at the start of the salt).
pub fn argon2_hash(key: &str, params: argon2::Params) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    let mut salt = [0u8; 16];
    crate::secret::random_bytes(&mut salt).map_err(|e| e.to_string())?;
    if let Some(id) = key_id(key) {
        salt[..ID_LEN].copy_from_slice(&id);
    }
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_with_salt(key.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("argon2: {e}"))
}

/// Whether `key` matches the Argon2id `phc` (the output comparison is constant-time).
pub fn argon2_verify(key: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => argon2::Argon2::default().verify_password(key.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// What a presented key needs, from the index.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Verified by the fast form: this agent.
    Agent(String),
    /// No agent can hold it (verified without Argon2).
    NoAgent,
    /// These (agent, Argon2id hash) pairs must be tried, in order, on the blocking pool.
    Argon2(Vec<(String, String)>),
}

/// The agents a key can belong to (built once per policy).
#[derive(Debug, Default)]
pub struct KeyIndex {
    fast: HashMap<KeyId, Vec<(String, [u8; 32])>>,
    argon2_by_id: HashMap<KeyId, Vec<(String, String)>>,
    argon2_all: Vec<(String, String)>,
}

impl KeyIndex {
    /// Indexes every agent with an API key (disabled agents too: their holders are told the agent
    /// is disabled, not that the key is wrong).
    pub fn build(policy: &Policy) -> KeyIndex {
        let mut ix = KeyIndex::default();
        for a in policy.agents.values() {
            let Some(stored) = &a.api_key_hash else { continue };
            if let Ok((id, digest)) = parse_fast(stored) {
                ix.fast.entry(id).or_default().push((a.name.clone(), digest));
                continue;
            }
            let entry = (a.name.clone(), stored.clone());
            let salt = PasswordHash::new(stored).ok().and_then(|h| h.salt.map(|s| s.as_ref().to_vec()));
            if let Some(id) = salt.and_then(|s| s.get(..ID_LEN).and_then(|p| KeyId::try_from(p).ok())) {
                ix.argon2_by_id.entry(id).or_default().push(entry.clone());
            }
            ix.argon2_all.push(entry);
        }
        ix
    }

    /// Argon2id hashes in the policy (a key in a foreign format is refused when over
    /// [`MAX_FOREIGN_CANDIDATES`]).
    pub fn argon2_count(&self) -> usize {
        self.argon2_all.len()
    }

    /// What `key` needs. An ephyr-format key is checked against the fast hashes of its id (one
    /// SHA-256), then against the Argon2id hashes whose salt starts with its id; a key in
    /// another format against every Argon2id hash, if there are at most
    /// [`MAX_FOREIGN_CANDIDATES`].
    /// `digest` is SHA-256 of the key (the caller has it already: `auth::fingerprint`).
    pub fn lookup(&self, key: &str, digest: &[u8; 32]) -> Lookup {
        match key_id(key) {
            Some(id) => {
                if let Some(entries) = self.fast.get(&id) {
                    // Every entry is compared, so the time does not depend on which one matched.
                    let mut found = None;
                    for (agent, d) in entries {
                        if crate::secret::constant_time_eq(d, digest) && found.is_none() {
                            found = Some(agent.clone());
                        }
                    }
                    if let Some(a) = found {
                        return Lookup::Agent(a);
                    }
                }
                match self.argon2_by_id.get(&id) {
                    Some(c) => Lookup::Argon2(c.clone()),
                    None => Lookup::NoAgent,
                }
            }
            None if self.argon2_all.is_empty() || self.argon2_all.len() > MAX_FOREIGN_CANDIDATES => Lookup::NoAgent,
            None => Lookup::Argon2(self.argon2_all.clone()),
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
    fn generated_keys_have_a_fast_form_that_parses_back() {
        let (key, stored) = generate().unwrap();
        let k = key.expose();
        assert!(k.starts_with(PREFIX) && k.len() == PREFIX.len() + 54, "{k}");
        let (id, digest) = parse_fast(&stored).unwrap();
        assert_eq!(Some(id), key_id(k));
        assert_eq!(digest, sha256(k));
        assert_eq!(fast_hash(k).as_deref(), Some(stored.as_str()));
        assert!(!stored.contains(&k[PREFIX.len() + ID_CHARS..]), "the secret part is not in the stored form");
        for bad in ["ephyr-sha256$", "ephyr-sha256$abc$def", "ephyr-sha256$AAAAAAAAAAA", "sha256$x$y"] {
            assert!(parse_fast(bad).is_err(), "{bad}");
        }
        // Not ours: no id.
        assert_eq!(key_id("ephyr_ak_short"), None);
        assert_eq!(key_id("sk-something-else"), None);
        assert_eq!(fast_hash("sk-something-else"), None);
    }

    #[test]
    fn argon2_hashes_of_our_keys_carry_the_id_in_the_salt() {
        let (key, _) = generate().unwrap();
        let phc = argon2_hash(key.expose(), cheap()).unwrap();
        let salt = PasswordHash::new(&phc).unwrap().salt.unwrap().as_ref().to_vec();
        assert_eq!(&salt[..8], &key_id(key.expose()).unwrap());
        assert!(argon2_verify(key.expose(), &phc));
        assert!(!argon2_verify(&format!("{}x", key.expose()), &phc));
        assert!(!argon2_verify(key.expose(), "not a hash"));
    }

    fn index(entries: &[(&str, String)]) -> KeyIndex {
        let mut text = String::from("agents:\n");
        for (name, h) in entries {
            text.push_str(&format!("  {name}: {{api_key_hash: '{h}'}}\n"));
        }
        KeyIndex::build(&Policy::parse(&text, "t").unwrap())
    }

    #[test]
    fn fast_keys_need_no_argon2_and_wrong_keys_cost_one_hash() {
        let (k1, h1) = generate().unwrap();
        let (k2, _) = generate().unwrap();
        let legacy = argon2_hash(k2.expose(), cheap()).unwrap();
        let foreign = argon2_hash("custom-key-from-elsewhere", cheap()).unwrap();
        let ix = index(&[("a", h1), ("b", legacy), ("c", foreign)]);
        assert_eq!(ix.lookup(k1.expose(), &sha256(k1.expose())), Lookup::Agent("a".into()));
        // Right id, wrong secret: refused by the fast form, never an Argon2 run.
        let mut forged = k1.expose().to_owned();
        forged.pop();
        forged.push(if k1.expose().ends_with('A') { 'B' } else { 'A' });
        assert_eq!(ix.lookup(&forged, &sha256(&forged)), Lookup::NoAgent);
        match ix.lookup(k2.expose(), &sha256(k2.expose())) {
            Lookup::Argon2(c) => assert_eq!(c.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), ["b"]),
            other => panic!("{other:?}"),
        }
        let (fresh, _) = generate().unwrap();
        assert_eq!(
            ix.lookup(fresh.expose(), &sha256(fresh.expose())),
            Lookup::NoAgent,
            "a key of ours that no agent holds costs no Argon2"
        );
        match ix.lookup("custom-key-from-elsewhere", &sha256("custom-key-from-elsewhere")) {
            Lookup::Argon2(c) => assert_eq!(c.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn foreign_keys_are_tried_against_a_bounded_number_of_hashes() {
        let many: Vec<(String, String)> = (0..=MAX_FOREIGN_CANDIDATES)
            .map(|i| (format!("a{i}"), argon2_hash(&format!("custom-{i}"), cheap()).unwrap()))
            .collect();
        let refs: Vec<(&str, String)> = many.iter().map(|(n, h)| (n.as_str(), h.clone())).collect();
        let ix = index(&refs);
        assert_eq!(ix.argon2_count(), MAX_FOREIGN_CANDIDATES + 1);
        assert_eq!(
            ix.lookup("custom-0", &sha256("custom-0")),
            Lookup::NoAgent,
            "over the bound, foreign keys are refused outright"
        );
        let ix = index(&refs[..MAX_FOREIGN_CANDIDATES]);
        assert!(
            matches!(ix.lookup("custom-0", &sha256("custom-0")), Lookup::Argon2(c) if c.len() == MAX_FOREIGN_CANDIDATES)
        );
    }
}
