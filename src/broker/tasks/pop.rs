//! Proof of possession for bound tasks: the holder signs every request with its Ed25519 key.
//!
//! Pure: values in, values out (the replay cache is a plain map the task store owns and
//! journals). Two forms are accepted; `docs/pop.md` is the client-side reference.
//!
//! **ephyr form** (`Ephyr-PoP: ts=<unix seconds>; nonce=<16-64 base64url chars>; sig=<base64url>`):
//! Ed25519 over these lines, joined by `\n`, no trailing newline:
//!
//! ```text
//! ephyr-pop-v1
//! <HTTP method>              POST
//! <authority and path>       127.0.0.1:8554/mcp   (Host header + path; no scheme, no query)
//! <MCP method or ->          tools/call
//! <tool name or ->           list_targets
//! <hex SHA-256 of the body>  (of the empty string for GET/DELETE)
//! <hex SHA-256 of the token> (the `mac_…` text as sent)
//! <ts>
//! <nonce>
//! ```
//!
//! **RFC 9449 DPoP** (`DPoP: <JWS>`): `typ` `dpop+jwt`, `alg` `EdDSA`, `jwk` the bound key
//! (`OKP`/`Ed25519`), claims `htm`, `htu` (scheme ignored, no query), `iat`, `jti`, and `ath` =
//! base64url(SHA-256(token)). DPoP does not cover the body or the MCP method; the ephyr form does.
//!
//! Order of checks: parse, timestamp window, signature and request match, then (by the caller)
//! the nonce is consumed, so stale or forged proofs never fill the replay cache.

use std::collections::HashMap;
use std::time::Duration;

use data_encoding::{BASE64URL_NOPAD, HEXLOWER};
use serde_json::Value;

use crate::time::UnixMicros;

/// How far a proof's timestamp may be from the broker's clock, either way.
pub const SKEW: Duration = Duration::from_secs(30);
/// Most remembered nonces (about 40 bytes each).
pub const REPLAY_CAPACITY: usize = 65_536;
/// The ephyr form's header.
pub const HEADER: &str = "ephyr-pop";
/// The DPoP header.
pub const DPOP_HEADER: &str = "dpop";
/// First line of the signed text.
pub const VERSION_LINE: &str = "ephyr-pop-v1";

/// What the proof must match.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// HTTP method, upper case.
    pub http_method: &'a str,
    /// Host header value (authority).
    pub authority: &'a str,
    /// Request path (no query).
    pub path: &'a str,
    /// JSON-RPC method, or `-`.
    pub mcp_method: &'a str,
    /// Tool name for `tools/call`, or `-`.
    pub tool: &'a str,
    /// The raw request body.
    pub body: &'a [u8],
    /// The token as sent.
    pub token: &'a str,
}

/// Which form a proof used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `Ephyr-PoP`.
    Ephyr,
    /// RFC 9449 `DPoP`.
    Dpop,
}

impl Form {
    /// Label for metrics and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Ephyr => "ephyr",
            Form::Dpop => "dpop",
        }
    }
}

/// A proof that checked out; its nonce is still to be consumed.
#[derive(Clone, Copy, Debug)]
pub struct Checked {
    /// The form.
    pub form: Form,
    /// Replay-cache key (holder key and nonce, hashed).
    pub replay_key: [u8; 16],
    /// Until when the nonce must be remembered (after that the timestamp is stale anyway).
    pub until: UnixMicros,
}

/// Why a proof is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PopError {
    /// The task is bound but the request carries no proof.
    Missing,
    /// The proof does not parse; says what is wrong.
    Malformed(String),
    /// The timestamp is outside the window.
    Stale {
        /// Seconds between the proof's time and the broker's (positive: in the past).
        off_by: i64,
    },
    /// The signature does not verify under the task's holder key.
    BadSignature,
    /// The proof is for another key, request, or token; names which part.
    Mismatch(String),
    /// The nonce (or `jti`) was used before.
    Replayed,
    /// Too many live nonces; retry shortly (fail closed rather than forget one).
    CacheFull,
    /// The proof's window ends within a span whose nonces were already forgotten: only a
    /// clock that went back lets such a proof into the window, and it cannot be told from a
    /// replay.
    Forgotten,
}

impl PopError {
    /// Stable code (audit, metrics).
    pub fn code(&self) -> &'static str {
        match self {
            PopError::Missing => "pop_missing",
            PopError::Malformed(_) => "pop_malformed",
            PopError::Stale { .. } => "pop_stale",
            PopError::BadSignature => "pop_bad_signature",
            PopError::Mismatch(_) => "pop_mismatch",
            PopError::Replayed => "pop_replayed",
            PopError::CacheFull => "pop_cache_full",
            PopError::Forgotten => "pop_clock_went_back",
        }
    }

    /// Human text.
    pub fn message(&self) -> String {
        let m = match self {
            PopError::Missing => {
                "this task is bound to a holder key: sign the request (Ephyr-PoP or DPoP header, see docs/pop.md)"
                    .to_string()
            }
            PopError::Malformed(m) => format!("malformed proof: {m}"),
            PopError::Stale { off_by } => format!(
                "proof timestamp is {}s {} the broker's clock (window ±{}s)",
                off_by.abs(),
                if *off_by > 0 { "behind" } else { "ahead of" },
                SKEW.as_secs()
            ),
            PopError::BadSignature => "proof signature does not verify under the task's holder key".into(),
            PopError::Mismatch(what) => format!("proof does not match this request: {what}"),
            PopError::Replayed => "proof nonce already used (replay)".into(),
            PopError::CacheFull => "too many recent proofs; retry in a few seconds".into(),
            PopError::Forgotten => "proof timestamp falls in a time whose proofs' nonces this broker has \
                                     already forgotten (the clock went back?), so it cannot be told \
                                     from a replay; sign with the current time once the clock has \
                                     passed that point"
                .into(),
        };
        format!("proof of possession failed: {m}")
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, b).as_ref().try_into().unwrap_or([0; 32])
}

/// The text the ephyr form signs.
pub fn signed_text(f: &Facts<'_>, ts: i64, nonce: &str) -> String {
    format!(
        "{VERSION_LINE}\n{}\n{}{}\n{}\n{}\n{}\n{}\n{ts}\n{nonce}",
        f.http_method,
        f.authority,
        f.path,
        f.mcp_method,
        f.tool,
        HEXLOWER.encode(&sha256(f.body)),
        HEXLOWER.encode(&sha256(f.token.as_bytes())),
    )
}

fn replay_key(key: &[u8; 32], form: Form, nonce: &str) -> [u8; 16] {
    let mut buf = Vec::with_capacity(34 + nonce.len());
    buf.extend_from_slice(key);
    buf.push(form as u8);
    buf.extend_from_slice(nonce.as_bytes());
    sha256(&buf)[..16].try_into().unwrap_or([0; 16])
}

fn window(ts: i64, now: UnixMicros) -> Result<UnixMicros, PopError> {
    let off_by = now.secs() - ts;
    if off_by.unsigned_abs() > SKEW.as_secs() {
        return Err(PopError::Stale { off_by });
    }
    Ok(UnixMicros::from_secs(ts).plus(SKEW + Duration::from_secs(1)))
}

fn verify_sig(key: &[u8; 32], msg: &[u8], sig: &[u8]) -> Result<(), PopError> {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(msg, sig)
        .map_err(|_| PopError::BadSignature)
}

fn is_nonce(s: &str) -> bool {
    (16..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks the request's proof (the values of its `Ephyr-PoP` and `DPoP` headers) against the
/// holder `key` at `now`.
pub fn check(
    ephyr: Option<&str>,
    dpop: Option<&str>,
    f: &Facts<'_>,
    key: &[u8; 32],
    now: UnixMicros,
) -> Result<Checked, PopError> {
    match (ephyr, dpop) {
        (Some(_), Some(_)) => Err(PopError::Malformed("send either Ephyr-PoP or DPoP, not both".into())),
        (Some(h), None) => check_ephyr(h, f, key, now),
        (None, Some(h)) => check_dpop(h, f, key, now),
        (None, None) => Err(PopError::Missing),
    }
}

fn check_ephyr(header: &str, f: &Facts<'_>, key: &[u8; 32], now: UnixMicros) -> Result<Checked, PopError> {
    let (mut ts, mut nonce, mut sig) = (None, None, None);
    for part in header.split(';') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| PopError::Malformed(format!("{:?} is not key=value", part.trim())))?;
        let slot = match k {
            "ts" => &mut ts,
            "nonce" => &mut nonce,
            "sig" => &mut sig,
            other => return Err(PopError::Malformed(format!("unknown Ephyr-PoP field {other:?}"))),
        };
        if slot.replace(v).is_some() {
            return Err(PopError::Malformed(format!("Ephyr-PoP field {k:?} repeated")));
        }
    }
    let ts: i64 = ts
        .ok_or_else(|| PopError::Malformed("Ephyr-PoP needs ts".into()))?
        .parse()
        .map_err(|_| PopError::Malformed("ts must be whole Unix seconds".into()))?;
    let nonce = nonce.ok_or_else(|| PopError::Malformed("Ephyr-PoP needs nonce".into()))?;
    if !is_nonce(nonce) {
        return Err(PopError::Malformed("nonce must be 16-64 base64url characters".into()));
    }
    let sig = BASE64URL_NOPAD
        .decode(sig.ok_or_else(|| PopError::Malformed("Ephyr-PoP needs sig".into()))?.as_bytes())
        .ok()
        .filter(|s| s.len() == 64)
        .ok_or_else(|| PopError::Malformed("sig must be 64 bytes, base64url without padding".into()))?;
    let until = window(ts, now)?;
    verify_sig(key, signed_text(f, ts, nonce).as_bytes(), &sig)?;
    Ok(Checked { form: Form::Ephyr, replay_key: replay_key(key, Form::Ephyr, nonce), until })
}

fn b64_json(part: &str, what: &str) -> Result<Value, PopError> {
    let bytes = BASE64URL_NOPAD
        .decode(part.as_bytes())
        .map_err(|_| PopError::Malformed(format!("DPoP {what} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|_| PopError::Malformed(format!("DPoP {what} is not JSON")))
}

/// `htu` without scheme, query and fragment.
fn htu_target(htu: &str) -> Option<&str> {
    let rest = htu.strip_prefix("https://").or_else(|| htu.strip_prefix("http://"))?;
    Some(rest.split(['?', '#']).next().unwrap_or(rest))
}

fn check_dpop(jws: &str, f: &Facts<'_>, key: &[u8; 32], now: UnixMicros) -> Result<Checked, PopError> {
    let mut parts = jws.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(PopError::Malformed("DPoP must be a compact JWS (three parts)".into()));
    };
    let header = b64_json(h, "header")?;
    if header["typ"] != "dpop+jwt" {
        return Err(PopError::Malformed("DPoP typ must be dpop+jwt".into()));
    }
    if header["alg"] != "EdDSA" {
        return Err(PopError::Malformed("DPoP alg must be EdDSA (holder keys are Ed25519)".into()));
    }
    let jwk = &header["jwk"];
    if jwk["kty"] != "OKP" || jwk["crv"] != "Ed25519" || jwk.get("d").is_some() {
        return Err(PopError::Malformed("DPoP jwk must be a public OKP Ed25519 key".into()));
    }
    let x = jwk["x"].as_str().and_then(|x| BASE64URL_NOPAD.decode(x.as_bytes()).ok());
    if x.as_deref() != Some(key.as_slice()) {
        return Err(PopError::Mismatch("the DPoP key is not the task's holder key".into()));
    }
    let claims = b64_json(p, "payload")?;
    let iat = claims["iat"].as_i64().ok_or_else(|| PopError::Malformed("DPoP iat must be an integer".into()))?;
    let jti = claims["jti"]
        .as_str()
        .filter(|j| (1..=128).contains(&j.len()))
        .ok_or_else(|| PopError::Malformed("DPoP jti must be a string of 1-128 characters".into()))?;
    let until = window(iat, now)?;
    let sig = BASE64URL_NOPAD
        .decode(s.as_bytes())
        .map_err(|_| PopError::Malformed("DPoP signature is not base64url".into()))?;
    let signing_input = &jws[..h.len() + 1 + p.len()];
    verify_sig(key, signing_input.as_bytes(), &sig)?;
    if claims["htm"].as_str() != Some(f.http_method) {
        return Err(PopError::Mismatch(format!("htm is not {}", f.http_method)));
    }
    let target = format!("{}{}", f.authority, f.path);
    if claims["htu"].as_str().and_then(htu_target) != Some(target.as_str()) {
        return Err(PopError::Mismatch(format!("htu is not http(s)://{target}")));
    }
    if claims["ath"].as_str() != Some(BASE64URL_NOPAD.encode(&sha256(f.token.as_bytes())).as_str()) {
        return Err(PopError::Mismatch("ath is not the hash of the presented token".into()));
    }
    Ok(Checked { form: Form::Dpop, replay_key: replay_key(key, Form::Dpop, jti), until })
}

/// Most spans of forgotten windows kept; past it the two closest merge (a wider span refuses
/// more, never less).
const FORGOTTEN_SPANS: usize = 16;

/// Nonces seen within their window, and the spans of windows already forgotten.
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: HashMap<[u8; 16], UnixMicros>,
    /// Sorted, disjoint `[first, last]` ranges of the `until` of nonces pruned away (journaled
    /// with the nonces). A proof whose window ends in one may be one whose nonce is gone:
    /// refused, whatever the clock says now. A clock that only goes forward never reaches them
    /// again; one stepped back would otherwise reopen those windows to replays.
    forgotten: Vec<(UnixMicros, UnixMicros)>,
}

impl ReplayCache {
    /// Remembers `c`'s nonce, or refuses a replay (or a full cache).
    pub fn consume(&mut self, c: &Checked, now: UnixMicros) -> Result<(), PopError> {
        if self.forgotten.iter().any(|(first, last)| (*first..=*last).contains(&c.until)) {
            return Err(PopError::Forgotten);
        }
        if let Some(until) = self.seen.get(&c.replay_key)
            && *until > now
        {
            return Err(PopError::Replayed);
        }
        if self.seen.len() >= REPLAY_CAPACITY {
            self.prune(now);
            if self.seen.len() >= REPLAY_CAPACITY {
                return Err(PopError::CacheFull);
            }
        }
        self.seen.insert(c.replay_key, c.until);
        Ok(())
    }

    /// Restores a journaled nonce.
    pub fn restore(&mut self, key: [u8; 16], until: UnixMicros) {
        self.seen.insert(key, until);
    }

    /// Restores a journaled span of forgotten windows.
    pub fn restore_forgotten(&mut self, first: UnixMicros, last: UnixMicros) {
        self.forget(first.min(last), first.max(last));
    }

    /// The spans of forgotten windows (for compaction).
    pub fn forgotten(&self) -> &[(UnixMicros, UnixMicros)] {
        &self.forgotten
    }

    /// Forgets nonces whose window has passed, remembering the spans their windows ended in
    /// (ends further apart than a window start a new span: a clock stepped back onto the time
    /// between them loses nothing).
    pub fn prune(&mut self, now: UnixMicros) {
        let mut gone = Vec::new();
        self.seen.retain(|_, until| {
            let keep = *until > now;
            if !keep {
                gone.push(*until);
            }
            keep
        });
        gone.sort_unstable();
        let gap = i64::try_from((SKEW * 2).as_micros()).unwrap_or(i64::MAX);
        let mut i = 0;
        while i < gone.len() {
            let mut j = i;
            while j + 1 < gone.len() && gone[j + 1].0 - gone[j].0 <= gap {
                j += 1;
            }
            self.forget(gone[i], gone[j]);
            i = j + 1;
        }
    }

    fn forget(&mut self, first: UnixMicros, last: UnixMicros) {
        let spans = &mut self.forgotten;
        spans.push((first, last));
        spans.sort_unstable();
        let mut merged: Vec<(UnixMicros, UnixMicros)> = Vec::with_capacity(spans.len());
        for &(a, b) in spans.iter() {
            match merged.last_mut() {
                Some(m) if a <= m.1 => m.1 = m.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        while merged.len() > FORGOTTEN_SPANS {
            let i = (1..merged.len()).min_by_key(|&i| merged[i].0.0 - merged[i - 1].1.0).unwrap_or(1);
            let (_, b) = merged.remove(i);
            merged[i - 1].1 = merged[i - 1].1.max(b);
        }
        *spans = merged;
    }

    /// Live entries (for compaction).
    pub fn entries(&self) -> impl Iterator<Item = (&[u8; 16], &UnixMicros)> {
        self.seen.iter()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn keypair(seed: u8) -> (Ed25519KeyPair, [u8; 32]) {
        let kp = Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
        let pk: [u8; 32] = kp.public_key().as_ref().try_into().unwrap();
        (kp, pk)
    }

    const NOW: UnixMicros = UnixMicros(1_893_456_000_000_000);

    fn facts<'a>(tool: &'a str, body: &'a [u8]) -> Facts<'a> {
        Facts {
            http_method: "POST",
            authority: "127.0.0.1:8554",
            path: "/mcp",
            mcp_method: "tools/call",
            tool,
            body,
            token: "mac_AAAA",
        }
    }

    /// (Ephyr-PoP, DPoP) header values, as `check` takes them.
    type Headers = (Option<String>, Option<String>);

    fn run(h: &Headers, f: &Facts<'_>, key: &[u8; 32], now: UnixMicros) -> Result<Checked, PopError> {
        check(h.0.as_deref(), h.1.as_deref(), f, key, now)
    }

    fn ephyr_header(kp: &Ed25519KeyPair, f: &Facts<'_>, ts: i64, nonce: &str) -> Headers {
        let sig = BASE64URL_NOPAD.encode(kp.sign(signed_text(f, ts, nonce).as_bytes()).as_ref());
        (Some(format!("ts={ts}; nonce={nonce}; sig={sig}")), None)
    }

    fn dpop_header(kp: &Ed25519KeyPair, pk: &[u8; 32], claims: Value) -> Headers {
        let header = serde_json::json!({"typ": "dpop+jwt", "alg": "EdDSA",
            "jwk": {"kty": "OKP", "crv": "Ed25519", "x": BASE64URL_NOPAD.encode(pk)}});
        let input = format!(
            "{}.{}",
            BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
            BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
        );
        let sig = BASE64URL_NOPAD.encode(kp.sign(input.as_bytes()).as_ref());
        (None, Some(format!("{input}.{sig}")))
    }

    #[test]
    fn signed_text_is_the_documented_canonical_form() {
        let f = facts("list_targets", b"{}");
        let token_hash = HEXLOWER.encode(&sha256(b"mac_AAAA"));
        assert_eq!(
            signed_text(&f, 1_893_456_000, "AAECAwQFBgcICQoLDA0ODw"),
            format!(
                "ephyr-pop-v1\nPOST\n127.0.0.1:8554/mcp\ntools/call\nlist_targets\n\
                 44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\n{token_hash}\n\
                 1893456000\nAAECAwQFBgcICQoLDA0ODw"
            )
        );
    }

    #[test]
    fn the_ephyr_form_binds_request_tool_body_token_and_time() {
        let (kp, pk) = keypair(0x11);
        let body = br#"{"name":"list_targets"}"#;
        let f = facts("list_targets", body);
        let ts = NOW.secs();
        let h = ephyr_header(&kp, &f, ts, "nonce-0123456789abcdef");
        let ok = run(&h, &f, &pk, NOW).unwrap();
        assert_eq!(ok.form, Form::Ephyr);
        // The same proof for another tool, body, token, path or key fails.
        for (other, what) in [
            (Facts { tool: "exec", ..f }, "tool"),
            (Facts { body: b"{}", ..f }, "body"),
            (Facts { token: "mac_BBBB", ..f }, "token"),
            (Facts { path: "/other", ..f }, "path"),
            (Facts { mcp_method: "tools/list", ..f }, "method"),
        ] {
            assert_eq!(run(&h, &other, &pk, NOW).unwrap_err(), PopError::BadSignature, "{what}");
        }
        let (_, other_pk) = keypair(0x22);
        assert_eq!(run(&h, &f, &other_pk, NOW).unwrap_err(), PopError::BadSignature);
        // Stale in both directions, checked before the signature.
        let late = UnixMicros(NOW.0 + 31_000_000);
        assert_eq!(run(&h, &f, &pk, late).unwrap_err(), PopError::Stale { off_by: 31 });
        let early = UnixMicros(NOW.0 - 31_000_000);
        assert!(run(&h, &f, &pk, early).unwrap_err().message().contains("ahead of"));
        // Missing and malformed.
        assert_eq!(check(None, None, &f, &pk, NOW).unwrap_err(), PopError::Missing);
        for bad in ["ts=1", "ts=x; nonce=nonce-0123456789abcdef; sig=AA", "ts=1; nonce=short; sig=AA", "bogus"] {
            assert!(matches!(check(Some(bad), None, &f, &pk, NOW), Err(PopError::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn dpop_proofs_are_checked_per_rfc_9449() {
        let (kp, pk) = keypair(0x11);
        let f = facts("list_targets", b"{}");
        let ath = BASE64URL_NOPAD.encode(&sha256(f.token.as_bytes()));
        let claims = |htu: &str, htm: &str, ath: &str, iat: i64| serde_json::json!({"jti": "j-1", "htm": htm, "htu": htu, "iat": iat, "ath": ath});
        let good = dpop_header(&kp, &pk, claims("http://127.0.0.1:8554/mcp", "POST", &ath, NOW.secs()));
        assert_eq!(run(&good, &f, &pk, NOW).unwrap().form, Form::Dpop);
        let https = dpop_header(&kp, &pk, claims("https://127.0.0.1:8554/mcp?x=1", "POST", &ath, NOW.secs()));
        run(&https, &f, &pk, NOW).unwrap();
        for (h, code) in [
            (dpop_header(&kp, &pk, claims("http://evil/mcp", "POST", &ath, NOW.secs())), "pop_mismatch"),
            (dpop_header(&kp, &pk, claims("http://127.0.0.1:8554/mcp", "GET", &ath, NOW.secs())), "pop_mismatch"),
            (dpop_header(&kp, &pk, claims("http://127.0.0.1:8554/mcp", "POST", "xyz", NOW.secs())), "pop_mismatch"),
            (dpop_header(&kp, &pk, claims("http://127.0.0.1:8554/mcp", "POST", &ath, NOW.secs() - 60)), "pop_stale"),
        ] {
            assert_eq!(run(&h, &f, &pk, NOW).unwrap_err().code(), code);
        }
        // A proof signed by another key that names the bound key in its jwk fails the signature.
        let (other, _) = keypair(0x33);
        let forged = dpop_header(&other, &pk, claims("http://127.0.0.1:8554/mcp", "POST", &ath, NOW.secs()));
        assert_eq!(run(&forged, &f, &pk, NOW).unwrap_err(), PopError::BadSignature);
        // A proof with its own (other) key names the wrong holder.
        let (_, other_pk) = keypair(0x33);
        let own = dpop_header(&other, &other_pk, claims("http://127.0.0.1:8554/mcp", "POST", &ath, NOW.secs()));
        assert_eq!(run(&own, &f, &pk, NOW).unwrap_err().code(), "pop_mismatch");
        let both = (Some("ts=1".to_string()), good.1.clone());
        assert!(run(&both, &f, &pk, NOW).unwrap_err().message().contains("not both"));
    }

    #[test]
    fn nonces_are_consumed_once_and_forgotten_after_their_window() {
        let (kp, pk) = keypair(0x11);
        let f = facts("a", b"{}");
        let h = ephyr_header(&kp, &f, NOW.secs(), "nonce-0123456789abcdef");
        let c = run(&h, &f, &pk, NOW).unwrap();
        let mut cache = ReplayCache::default();
        cache.consume(&c, NOW).unwrap();
        assert_eq!(cache.consume(&c, NOW).unwrap_err(), PopError::Replayed);
        // The same nonce under another tool is a different proof but the same nonce: refused.
        let g = facts("b", b"{}");
        let h2 = ephyr_header(&kp, &g, NOW.secs(), "nonce-0123456789abcdef");
        let c2 = run(&h2, &g, &pk, NOW).unwrap();
        assert_eq!(cache.consume(&c2, NOW).unwrap_err(), PopError::Replayed);
        let later = UnixMicros(NOW.0 + 40_000_000);
        cache.prune(later);
        assert!(cache.is_empty());
    }

    /// The clock steps back after a nonce was forgotten: the proof that used it is inside the
    /// window again, and without the spans it would be taken a second time.
    #[test]
    fn a_clock_stepped_back_reopens_no_forgotten_window() {
        let (kp, pk) = keypair(0x12);
        let f = facts("a", b"{}");
        let proof = |at: UnixMicros, nonce: &str| run(&ephyr_header(&kp, &f, at.secs(), nonce), &f, &pk, at).unwrap();
        let mut cache = ReplayCache::default();
        cache.consume(&proof(NOW, "nonce-0123456789abcdef"), NOW).unwrap();
        // Two hours ahead (a clock stepped forward), a proof made then, and both forgotten.
        let ahead = UnixMicros(NOW.0 + 7_200_000_000);
        cache.consume(&proof(ahead, "nonce-ahead-0123456789"), ahead).unwrap();
        cache.prune(UnixMicros(ahead.0 + 120_000_000));
        assert!(cache.is_empty(), "forgotten two minutes on");
        // The clock goes back to NOW: the captured proof passes the window check again, and
        // is refused, as is any proof whose window ends in the same span.
        for again in [proof(NOW, "nonce-0123456789abcdef"), proof(NOW, "nonce-fresh-0123456789ab")] {
            let e = cache.consume(&again, NOW).unwrap_err();
            assert_eq!(e.code(), "pop_clock_went_back", "{e:?}");
            assert!(e.message().contains("clock went back"), "{}", e.message());
        }
        // Between the spans (the time the clock skipped) proofs are taken: a correct clock
        // stepped back onto it loses nothing.
        let between = UnixMicros(NOW.0 + 60_000_000);
        cache.consume(&proof(between, "nonce-between-012345678"), between).unwrap();
        // The spans survive a restart (compaction writes them; the journal restores them).
        let mut restored = ReplayCache::default();
        for (a, b) in cache.forgotten() {
            restored.restore_forgotten(*a, *b);
        }
        assert_eq!(restored.consume(&proof(NOW, "nonce-0123456789abcdef"), NOW).unwrap_err(), PopError::Forgotten);
        assert_eq!(restored.consume(&proof(ahead, "nonce-ahead-0123456789"), ahead).unwrap_err(), PopError::Forgotten);
    }

    /// Spans stay few whatever the history: the closest merge, so what is refused only grows.
    #[test]
    fn forgotten_spans_are_bounded_and_merge_conservatively() {
        let mut cache = ReplayCache::default();
        for i in 0..100i64 {
            cache.forget(UnixMicros(i * 1_000), UnixMicros(i * 1_000 + 10 + (i % 7) * 100));
        }
        cache.forget(UnixMicros(10_000_000), UnixMicros(10_000_010));
        let spans = cache.forgotten();
        assert!(spans.len() <= FORGOTTEN_SPANS, "{}", spans.len());
        assert!(spans.windows(2).all(|w| w[0].1 < w[1].0), "sorted and disjoint: {spans:?}");
        for i in 0..100i64 {
            let t = UnixMicros(i * 1_000 + 10);
            assert!(spans.iter().any(|(a, b)| (*a..=*b).contains(&t)), "{t:?} still covered");
        }
        assert_eq!(spans.last(), Some(&(UnixMicros(10_000_000), UnixMicros(10_000_010))), "the far span kept apart");
    }
}
