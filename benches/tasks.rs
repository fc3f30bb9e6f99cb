//! Task authentication per request, in-process: the full token pipeline (fingerprint, decode,
//! chain verify, reduce, lineage and watermark checks) for a 5-deep delegated token, cold (first
//! sight) and warm (memoised verification; lineage, expiry and watermarks are still checked on
//! every use), and proof-of-possession checks in both forms.
//! Run: `cargo bench --bench tasks`.

use data_encoding::BASE64URL_NOPAD;
use divan::{AllocProfiler, Bencher};
use ephyr::broker::auth::fingerprint;
use ephyr::broker::tasks::pop::{self, Facts};
use ephyr::broker::tasks::{NewTask, TaskStore};
use ephyr::macaroon::RootKey;
use ephyr::time::UnixMicros;
use ring::signature::{Ed25519KeyPair, KeyPair};
use ulid::Ulid;

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

const T0: UnixMicros = UnixMicros(1_893_456_000_000_000);

fn new_task(expires_s: i64) -> NewTask {
    NewTask {
        agent: "claude".into(),
        delegated_by: None,
        description: "bench".into(),
        expires: UnixMicros::from_secs(T0.secs() + expires_s),
        can_delegate: true,
        delegation_depth: 5,
        narrowing: vec!["target IN [web,db,cache]".into(), "role IN [read,op]".into()],
        holder_key: None,
        bind_deadline: None,
    }
}

/// A store with a root and a 5-deep chain below it; returns the deepest token.
fn five_deep() -> (TaskStore, String) {
    let s = TaskStore::new();
    let key = RootKey::from_bytes(&[7; 32]);
    let id = |n: u128| Ulid::from_parts(T0.0 as u64 / 1000, n);
    let (_, mut token) =
        ephyr::broker::reactor::block_on(s.create(id(1), new_task(3600), "agent:claude".into(), &key, vec![], T0))
            .unwrap();
    for n in 2..=6u128 {
        let v = s.verify_token(&token, &fingerprint(&token), T0).unwrap();
        let parent = Ulid::from_string(&v.task).unwrap();
        let mut t = new_task(3600 - n as i64 * 60);
        t.narrowing = vec![format!("target IN [web,db]"), format!("delegation_depth <= {}", 6 - n)];
        token = ephyr::broker::reactor::block_on(s.delegate(parent, &v.verified.macaroon, id(n), t, T0)).unwrap().1;
    }
    assert_eq!(s.verify_token(&token, &fingerprint(&token), T0).unwrap().depth, 5);
    (s, token)
}

#[divan::bench]
fn authenticate_5_deep_cold(b: Bencher) {
    let (s, token) = five_deep();
    let n = std::cell::Cell::new(0u64);
    b.bench_local(|| {
        // The memo is keyed by the fingerprint: a fresh key each time forces the whole path
        // (decode, 20 HMAC steps, reduce) after the fingerprint is computed.
        let mut fp = fingerprint(divan::black_box(&token));
        n.set(n.get() + 1);
        fp[..8].copy_from_slice(&n.get().to_le_bytes());
        s.verify_token(&token, &fp, T0).unwrap()
    });
}

#[divan::bench]
fn authenticate_5_deep_warm(b: Bencher) {
    let (s, token) = five_deep();
    b.bench_local(|| {
        let fp = fingerprint(divan::black_box(&token));
        s.verify_token(&token, &fp, T0).unwrap()
    });
}

fn facts<'a>(body: &'a [u8], token: &'a str) -> Facts<'a> {
    Facts {
        http_method: "POST",
        authority: "127.0.0.1:8554",
        path: "/mcp",
        mcp_method: "tools/call",
        tool: "exec",
        body,
        token,
    }
}

const BODY: &[u8] = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"exec","arguments":{"target":"web","role":"read","command":"uptime"}}}"#;

#[divan::bench]
fn pop_ephyr_form(b: Bencher) {
    let (_, token) = five_deep();
    let kp = Ed25519KeyPair::from_seed_unchecked(&[0x11; 32]).unwrap();
    let pk: [u8; 32] = kp.public_key().as_ref().try_into().unwrap();
    let f = facts(BODY, &token);
    let nonce = "AAECAwQFBgcICQoLDA0ODw";
    let sig = BASE64URL_NOPAD.encode(kp.sign(pop::signed_text(&f, T0.secs(), nonce).as_bytes()).as_ref());
    let h = format!("ts={}; nonce={nonce}; sig={sig}", T0.secs());
    b.bench_local(|| pop::check(Some(divan::black_box(h.as_str())), None, &f, &pk, T0).unwrap());
}

#[divan::bench]
fn pop_dpop(b: Bencher) {
    let (_, token) = five_deep();
    let kp = Ed25519KeyPair::from_seed_unchecked(&[0x11; 32]).unwrap();
    let pk: [u8; 32] = kp.public_key().as_ref().try_into().unwrap();
    let f = facts(BODY, &token);
    let ath = BASE64URL_NOPAD.encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    let header = serde_json::json!({"typ": "dpop+jwt", "alg": "EdDSA",
        "jwk": {"kty": "OKP", "crv": "Ed25519", "x": BASE64URL_NOPAD.encode(&pk)}});
    let claims = serde_json::json!({"jti": "j-1", "htm": "POST", "htu": "http://127.0.0.1:8554/mcp",
        "iat": T0.secs(), "ath": ath});
    let input = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    let jws = format!("{input}.{}", BASE64URL_NOPAD.encode(kp.sign(input.as_bytes()).as_ref()));
    b.bench_local(|| pop::check(None, Some(divan::black_box(jws.as_str())), &f, &pk, T0).unwrap());
}

#[divan::bench]
fn ed25519_verify_alone(b: Bencher) {
    let kp = Ed25519KeyPair::from_seed_unchecked(&[0x11; 32]).unwrap();
    let msg = [0u8; 300];
    let sig = kp.sign(&msg);
    let pk = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, kp.public_key().as_ref().to_vec());
    b.bench_local(|| pk.verify(divan::black_box(&msg), sig.as_ref()).unwrap());
}
