//! Verifying JWTs that come from outside: RFC 7523 client assertions of key-bound agents and
//! Kubernetes service-account tokens at enrollment. Signatures are checked by `jsonwebtoken`
//! (on ring); this module decides which key and algorithm are acceptable, so a token cannot pick
//! them: the algorithm follows from the key (EC P-256 → ES256, Ed25519 → EdDSA, RSA ≥ 2048 bits →
//! RS256), the header must name that one, and symmetric or unknown keys are refused.
//!
//! What runs here: pure functions on the executor thread (one signature check, ~50 µs for
//! ES256/RSA on a Pi-class core; only on joins and token requests, never per MCP request).

use std::collections::HashSet;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// Longest JWT accepted.
pub const MAX_JWT: usize = 16 * 1024;

/// A public key from a JWK or JWK set, with the one algorithm it verifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The key's id (`kid`), if it has one.
    pub kid: Option<String>,
    alg: Algorithm,
    jwk: Jwk,
}

impl Key {
    /// A public key from `jwk` (EC P-256, Ed25519, or RSA of at least 2048 bits).
    pub fn from_jwk(jwk: Jwk) -> Result<Key, String> {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
            AlgorithmParameters::EllipticCurve(p) => {
                return Err(format!("EC curve {:?} is not supported (P-256 is)", p.curve));
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
            AlgorithmParameters::OctetKeyPair(_) => return Err("OKP keys must be Ed25519".into()),
            AlgorithmParameters::RSA(p) => {
                let n = data_encoding::BASE64URL_NOPAD
                    .decode(p.n.trim_end_matches('=').as_bytes())
                    .map_err(|_| "the RSA modulus is not base64url")?;
                let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                if bits < 2048 {
                    return Err(format!("an RSA key of {bits} bits is too short (2048 at least)"));
                }
                Algorithm::RS256
            }
            AlgorithmParameters::OctetKey(_) => return Err("symmetric (oct) keys are not accepted".into()),
        };
        if let Some(a) = jwk.common.key_algorithm {
            let named = format!("{a:?}");
            if named != format!("{alg:?}") {
                return Err(format!("the key says alg {named}, but its type verifies {alg:?}"));
            }
        }
        DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
        Ok(Key { kid: jwk.common.key_id.clone(), alg, jwk })
    }

    /// The key as JSON (to journal it).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.jwk).unwrap_or_default()
    }

    /// The algorithm it verifies.
    pub fn algorithm(&self) -> &'static str {
        match self.alg {
            Algorithm::ES256 => "ES256",
            Algorithm::EdDSA => "EdDSA",
            _ => "RS256",
        }
    }
}

/// A public key from JWK JSON.
pub fn key(json: &str) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_str(json).map_err(|e| format!("not a JWK: {e}"))?;
    Key::from_jwk(jwk)
}

/// The keys of a JWK set (`{"keys": [...]}`); every key must be acceptable.
pub fn key_set(json: &str) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_str(json).map_err(|e| format!("not a JWK set: {e}"))?;
    if set.keys.is_empty() {
        return Err("the JWK set has no keys".into());
    }
    set.keys.into_iter().enumerate().map(|(i, k)| Key::from_jwk(k).map_err(|e| format!("key {}: {e}", i + 1))).collect()
}

/// What a token must say.
pub struct Expect<'a> {
    /// Accepted issuers (`iss`).
    pub issuers: &'a [String],
    /// Accepted audiences (one of them in `aud`).
    pub audiences: &'a [String],
    /// The subject (`sub`), if fixed.
    pub subject: Option<&'a str>,
    /// Longest accepted lifetime from now (`exp` - now), seconds; `None`: any.
    pub max_lifetime: Option<u64>,
}

/// Verifies `token` with one of `keys` (by `kid` when the token names one) and the claims in
/// `expect` (`exp` required, 30 s leeway); its claims.
pub fn verify(token: &str, keys: &[Key], expect: &Expect<'_>) -> Result<Value, String> {
    if token.len() > MAX_JWT {
        return Err("the JWT is too long".into());
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
    let candidates: Vec<&Key> = match &header.kid {
        Some(kid) => keys.iter().filter(|k| k.kid.as_deref() == Some(kid.as_str())).collect(),
        None => keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(format!("no key with kid {:?}", header.kid.unwrap_or_default()));
    }
    let mut last = String::from("no key verifies it");
    for k in candidates {
        if header.alg != k.alg {
            last = format!("the JWT is signed with {:?}, the key verifies {}", header.alg, k.algorithm());
            continue;
        }
        let mut v = Validation::new(k.alg);
        v.leeway = 30;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.iss = Some(expect.issuers.iter().cloned().collect::<HashSet<_>>());
        v.aud = Some(expect.audiences.iter().cloned().collect::<HashSet<_>>());
        v.sub = expect.subject.map(str::to_owned);
        let Ok(dk) = DecodingKey::from_jwk(&k.jwk) else { continue };
        match jsonwebtoken::decode::<Value>(token, &dk, &v) {
            Ok(data) => {
                if let Some(max) = expect.max_lifetime {
                    let exp = data.claims["exp"].as_i64().unwrap_or(i64::MAX);
                    if exp - crate::time::now().secs() > i64::try_from(max).unwrap_or(i64::MAX) {
                        return Err(format!("the JWT lives longer than {max}s"));
                    }
                }
                return Ok(data.claims);
            }
            Err(e) => {
                last = match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidIssuer => "wrong issuer (iss)".into(),
                    jsonwebtoken::errors::ErrorKind::InvalidAudience => "wrong audience (aud)".into(),
                    jsonwebtoken::errors::ErrorKind::InvalidSubject => "wrong subject (sub)".into(),
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => "expired (exp)".into(),
                    jsonwebtoken::errors::ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad signature".into(),
                    jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(c) => format!("no {c} claim"),
                    other => format!("{other:?}"),
                };
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decide_the_algorithm_and_weak_keys_are_refused() {
        let ec = r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
        assert_eq!(key(ec).unwrap().algorithm(), "ES256");
        let e = key(r#"{"kty":"oct","k":"c2VjcmV0"}"#).unwrap_err();
        assert!(e.contains("symmetric") || e.contains("not a JWK"), "{e}");
        let e = key(r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#).unwrap_err();
        assert!(e.contains("too short"), "{e}");
        let e = key(&ec.replace("\"kty\"", "\"alg\":\"RS256\",\"kty\"")).unwrap_err();
        assert!(e.contains("verifies ES256"), "{e}");
        assert!(key_set(r#"{"keys":[]}"#).unwrap_err().contains("no keys"));
        let e = verify(
            "a.b.c",
            &[key(ec).unwrap()],
            &Expect { issuers: &[], audiences: &[], subject: None, max_lifetime: None },
        );
        assert!(e.unwrap_err().contains("not a JWT"));
    }
}
