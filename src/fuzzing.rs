//! What the fuzz targets check: one function per decoder that takes input from outside the
//! broker, with the properties it must keep. The libFuzzer targets in `fuzz/` call these, and
//! the test suite (`tests/fuzz_replay.rs`) replays the committed corpora through the same
//! functions, so a corpus entry that once found a bug stays a regression test without the
//! fuzzer. The broker never calls this module (the linker drops it from the binary).
//!
//! Each function must not panic on any input; an `assert!` here is a property that held for
//! every input the fuzzer tried (docs/RELIABILITY.md).

use crate::broker::federation::{auth, client, pins};
use crate::broker::journal::{self, Backend, Durable, Replayed, Store};
use crate::broker::policy::{CredentialKind, Policy};
use crate::broker::upstream::{plan, scrub::Scrubber};
use crate::broker::{Error, ports::Local};
use crate::secret::SecretBytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use std::rc::Rc;

/// A fuzz target: its name (the directory of its corpus) and its check.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub const TARGETS: &[Target] = &[
    ("token_decode", token_decode),
    ("caveat_reduce", caveat_reduce),
    ("signer_frames", signer_frames),
    ("policy_load", policy_load),
    ("mcp_decode", mcp_decode),
    ("shell_command", shell_command),
    ("remote_answer", remote_answer),
    ("oauth_answer", oauth_answer),
    ("oauth_request", oauth_request),
    ("proxy_headers", proxy_headers),
    ("scrub_stream", scrub_stream),
    ("console_form", console_form),
    ("data_files", data_files),
];

/// Task tokens: arbitrary bytes (binary and text form) decode or fail cleanly; what decodes
/// re-encodes to the same bytes and verifies (and reduces) without panicking.
pub fn token_decode(data: &[u8]) {
    use crate::macaroon::{Macaroon, RootKey};
    if let Ok(m) = Macaroon::decode_binary(data.to_vec()) {
        assert_eq!(m.to_binary(), data, "decode/encode must be the identity on accepted input");
        let back = Macaroon::decode(&m.encode()).expect("our own encoding decodes");
        assert_eq!(back, m);
        let _ = RootKey::from_bytes(b"fuzz").start(m.identifier()).verify_and_reduce(&m);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Macaroon::decode(text);
    }
}

/// Caveats (one per line, the last line appended): lists reduce or fail cleanly, and appending
/// any caveat to a list that reduces gives a subset envelope and keeps the task (monotonicity).
pub fn caveat_reduce(data: &[u8]) {
    use crate::macaroon::reduce;
    let lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    let (base, extra) = lines.split_at(lines.len().saturating_sub(1));
    if let Ok(before) = reduce(base.iter().copied())
        && let Ok(after) = reduce(base.iter().copied().chain(extra.iter().copied()))
    {
        assert!(after.envelope.is_subset_of(&before.envelope), "appending {extra:?} widened the envelope");
        if before.task().is_some() && !extra.iter().any(|e| e.starts_with(b"task = ")) {
            assert_eq!(after.task(), before.task());
        }
    }
}

/// Signer frames: every decoder accepts or rejects arbitrary bytes; accepted frames round-trip.
pub fn signer_frames(data: &[u8]) {
    use crate::signer::protocol::{ControlRequest, ControlResponse, Request, Response};
    if let Ok((id, r)) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode(id)).expect("our own encoding decodes"), (id, r));
    }
    if let Ok((id, r)) = Response::decode(data) {
        assert_eq!(Response::decode(&r.encode(id)).expect("our own encoding decodes"), (id, r));
    }
    let _ = ControlRequest::decode(data);
    let _ = ControlResponse::decode(data);
}

/// Policy files: any text loads or fails with located problems; a policy that loads can be
/// asked any SSH question.
pub fn policy_load(data: &[u8]) {
    use crate::broker::policy::{Action, ActionKind, Principal, authorize};
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Policy::parse(text, "fuzz.yaml") {
        Ok(p) => {
            for agent in p.agents.keys() {
                for target in p.targets.keys() {
                    let who = Principal { agent, token: None, delegators: &[] };
                    let _ = authorize(&p, &who, &Action::new(None, ActionKind::Ssh { target, role: "read" }));
                }
            }
        }
        Err(e) => assert!(!e.problems.is_empty(), "a refused policy names its problems"),
    }
}

/// MCP request bodies decode to a message or a JSON-RPC error that encodes as JSON; decoded
/// requests classify in both eras and go through the stateless envelope checks and
/// `initialize` validation.
pub fn mcp_decode(data: &[u8]) {
    use crate::mcp::jsonrpc::{self, Message};
    use crate::mcp::server::{self, RoutingHeaders};
    use crate::mcp::version::Version;
    match jsonrpc::decode(data) {
        Err(rej) => {
            let out = jsonrpc::encode_error(rej.id.as_ref(), &rej.error);
            assert!(serde_json::from_slice::<Value>(&out).is_ok());
        }
        Ok(Message::Request(r)) => {
            let name = r.params.get("name").or(r.params.get("uri")).and_then(Value::as_str).map(str::to_owned);
            let version = r
                .params
                .get("_meta")
                .and_then(|m| m.get("io.modelcontextprotocol/protocolVersion"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let h =
                RoutingHeaders { protocol_version: version.as_deref(), method: Some(&r.method), name: name.as_deref() };
            let _ = server::check_stateless(&r.method, &r.params, h);
            for v in [Version::V2025_11_25, Version::V2026_07_28] {
                if let Err(e) = server::classify(&r.method, r.params.clone(), v) {
                    let out = jsonrpc::encode_error(Some(&r.id), &e);
                    assert!(serde_json::from_slice::<Value>(&out).is_ok());
                }
            }
            if r.method == "initialize" {
                let _ = server::initialize(&r.params);
            }
        }
        Ok(_) => {}
    }
}

/// SSH command lines: a judged command or a refusal with a reason, never a panic or a stack
/// overflow; an allowed command's programs are literal words.
pub fn shell_command(data: &[u8]) {
    use crate::command::{CommandPolicy, Parsed};
    let Ok(cmd) = std::str::from_utf8(data) else { return };
    let policy = CommandPolicy { globs: true, redirections: true, ..Default::default() };
    if let Ok(parsed) = Parsed::parse(cmd) {
        assert!(!parsed.commands.is_empty());
        if policy.check(&parsed, cmd).is_ok() {
            for c in &parsed.commands {
                assert!(!c.words[0].value.is_empty() && !c.words[0].glob);
            }
        }
    }
}

/// What a hostile remote MCP server sends back: an event stream (events, where the last whole
/// one ends, the resume point), the answer picked by id, and tool definitions through pinning
/// (hash, warnings) and the review diff.
pub fn remote_answer(data: &[u8]) {
    let messages = client::events(data);
    if let Some(end) = client::events_end(data) {
        assert!(end <= data.len(), "an event end past the buffer");
    }
    let (last, _) = client::resume_point(data);
    assert!(last.as_ref().is_none_or(|l| !l.contains(['\n', '\r'])), "a Last-Event-ID with a line break");
    for id in [0, 1, u64::MAX] {
        if let Some(a) = client::pick(&messages, id) {
            assert_eq!(a["id"].as_u64(), Some(id));
        }
    }
    for m in &messages {
        for def in m["result"]["tools"].as_array().into_iter().flatten().chain([m]) {
            let (canonical, hash) = pins::Pins::hash(def);
            assert_eq!(pins::Pins::hash(&canonical).1, hash, "pinning hashes its canonical form to itself");
            let _ = pins::flags(def);
        }
    }
    // The review shows the diff between two definitions (the halves of the input).
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_at(text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().take(200).collect(), b.lines().take(200).collect());
    let _ = crate::broker::textdiff::lines(&a, &b);
}

/// What a remote's authorization server (or the remote itself) sends the broker: the
/// `WWW-Authenticate` challenge, metadata documents, token answers, and the addresses in them.
pub fn oauth_answer(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let c = auth::parse_challenge(&text);
    if text.len() > 4096 {
        assert_eq!(c, auth::Challenge::default(), "an oversized challenge is ignored");
    }
    // A quoted value without quotes or backslashes comes back as it was.
    if !text.contains(['"', '\\']) && text.len() < 4000 {
        let c = auth::parse_challenge(&format!("Bearer realm=\"x\", scope=\"{text}\", error=invalid_token"));
        assert_eq!(c.scope.as_deref(), Some(&*text), "scope lost");
        assert_eq!(c.error.as_deref(), Some("invalid_token"));
    }
    if let Ok(m) = serde_json::from_slice::<Value>(data) {
        let issuer = m["issuer"].as_str().unwrap_or("https://as.example");
        if let Ok(s) = auth::server_from("https://as.example/.well-known/oauth-authorization-server", issuer, &m) {
            assert_eq!(s.issuer, issuer, "the issuer is the one asked for, exactly");
        }
        let _ = auth::server_from("https://as.example/m", "https://as.example", &m);
    }
    for status in [200, 400] {
        if let Ok((access, refresh, _, _)) = auth::token_answer(status, data) {
            assert_eq!(status, 200);
            for t in std::iter::once(&access).chain(refresh.as_ref()) {
                assert!(
                    HeaderValue::from_str(&format!("Bearer {}", t.expose())).is_ok(),
                    "a token that cannot be a header"
                );
            }
        }
    }
    for line in text.lines().take(8) {
        let _ = auth::canonical(line);
        let _ = auth::redirect_is_loopback(line);
        let _ = auth::metadata_urls(line);
        if let Some(o) = auth::origin(line) {
            assert!(line.starts_with(&o), "an origin that is not a prefix of its URL");
        }
        if line.starts_with("https://") && !line.contains(['?', '#']) {
            assert!(auth::resource_covers(line, line), "a resource covers itself: {line:?}");
        }
        let _ = auth::resource_covers(line, "https://mcp.example:443/api/mcp");
        let _ = auth::path_of(line);
    }
}

/// An Ed25519 public key (RFC 8037's example) nobody fuzzing holds the private half of here.
const FUZZ_JWK: &str = r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;

/// What clients send the broker's authorization server and MCP endpoint: client ID metadata
/// documents, JWTs (Kubernetes tokens, client assertions), proofs of possession (`Ephyr-PoP`,
/// DPoP) and holder keys. Nothing here can be signed by the fuzzer, so nothing may verify.
pub fn oauth_request(data: &[u8]) {
    use crate::broker::oauth::cimd;
    use crate::broker::tasks::{parse_holder_key, pop};
    let id = "https://client.example/meta.json";
    if let Ok(c) = cimd::parse(id, data) {
        assert_eq!(c.id, id, "a document accepted for another client id");
    }
    let text = String::from_utf8_lossy(data);
    let keys = crate::broker::jose::key_set(&format!(r#"{{"keys":[{FUZZ_JWK}]}}"#)).expect("the fixed key loads");
    let any = vec!["https://issuer.example".to_owned()];
    let expect = crate::broker::jose::Expect { issuers: &any, audiences: &any, subject: None, max_lifetime: None };
    assert!(crate::broker::jose::verify(&text, &keys, &expect).is_err(), "an unsigned JWT verified: {text:?}");
    let _ = crate::broker::jose::key(&text);
    let _ = crate::broker::jose::key_set(&text);
    let f = pop::Facts {
        http_method: "POST",
        authority: "ephyr.lan:8443",
        path: "/mcp",
        mcp_method: "tools/call",
        tool: "x",
        body: data,
        token: "mac_x",
    };
    let holder = [7u8; 32];
    let now = crate::time::UnixMicros(1_800_000_000_000_000);
    let (a, b) = text.split_once('\n').unwrap_or((&text, ""));
    for (ephyr, dpop) in [(Some(a), None), (None, Some(a)), (Some(a), Some(b))] {
        assert!(pop::check(ephyr, dpop, &f, &holder, now).is_err(), "a proof the fuzzer could not sign passed");
    }
    let _ = parse_holder_key(&text);
}

thread_local! {
    static PROXY_POLICY: Policy = Policy::parse(
        r#"
version: 1
services:
  bearer: { url: "https://api.example.com/v1", credential: { type: bearer, secret: "env:X" }, allowed_hosts: [up.example.com] }
  header: { url: "https://h.example.com", credential: { type: header, header: X-Api-Key, secret: "env:X" }, headers: { X-Static: "1" } }
  basic: { url: "http://lan.example:8080/b", credential: { type: basic, username: u, secret: "env:X" } }
  any: { url: "http://any.invalid", allowed_hosts: ["*"] }
"#,
        "fuzz.yaml",
    )
    .unwrap_or_else(|e| panic!("the fuzzing policy loads: {e:?}"));
}

/// Header lines `name: value` (what parses as a header) from `text`.
fn header_map(text: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in text.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let value = line[colon + 1..].strip_prefix(b" ").unwrap_or(&line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value)) {
            h.append(n, v);
        }
    }
    h
}

/// The HTTP proxy's request side: a full URL matched to a service (no `..` survives, the host is
/// one the service allows), the agent's headers passed on (what the broker sets, it alone sets:
/// the credential, `Host`), and the upstream's headers passed back without the secret.
pub fn proxy_headers(data: &[u8]) {
    let (first, rest) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    PROXY_POLICY.with(|p| {
        if let Ok(url) = std::str::from_utf8(first)
            && let Ok(m) = plan::match_url(p, url)
        {
            let path = m.path.split('?').next().unwrap_or_default();
            assert!(!path.split('/').any(|s| s == ".." || s == "."), "{url:?} matched with {:?}", m.path);
            let svc = &p.services[&m.service];
            assert!(
                svc.url.host.eq_ignore_ascii_case(&m.host)
                    || svc.allowed_hosts.contains("*")
                    || svc.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&m.host)),
                "{url:?} matched {} on a host it does not allow",
                m.service
            );
        }
        let agent = header_map(rest);
        let _ = plan::foreign_transfer_coding(&agent);
        let secret = SecretBytes::new(b"s3cr3t/K3y+v4lue".to_vec());
        for (name, svc) in &p.services {
            let Ok(out) = plan::request_headers(&agent, svc, "up.example.com", Some(&secret), "req-1") else {
                continue;
            };
            assert_eq!(out.get_all(http::header::HOST).iter().count(), 1, "{name}: one Host");
            let host = plan::host_header(&svc.url.scheme, "up.example.com", svc.url.port);
            assert_eq!(
                out.get(http::header::HOST).map(HeaderValue::as_bytes),
                Some(host.as_bytes()),
                "{name}: our Host"
            );
            if let Some(c) = &svc.credential {
                let header = match &c.kind {
                    CredentialKind::Header { name, .. } => name.to_ascii_lowercase(),
                    CredentialKind::Query { .. } => continue,
                    _ => "authorization".to_owned(),
                };
                let sent: Vec<_> = out.get_all(header.as_str()).iter().collect();
                assert_eq!(sent.len(), 1, "{name}: the credential header once, the broker's");
                assert!(sent[0].is_sensitive(), "{name}: the credential is marked sensitive");
            }
            let kind = svc.credential.as_ref().map_or(CredentialKind::Bearer, |c| c.kind.clone());
            let scrub = Scrubber::new(plan::secret_forms(&kind, &secret));
            let mut upstream = header_map(rest);
            if let Ok(v) = HeaderValue::from_bytes(&[rest.get(..8).unwrap_or(rest), secret.expose()].concat()) {
                upstream.append("x-echo", v);
            }
            let back = plan::response_headers(&upstream, &scrub, name, "req-1");
            for (k, v) in &back {
                assert!(!scrub.contains(v.as_bytes()), "{name}: the secret went back in {k}");
            }
        }
    });
}

/// The streaming scrubber: a secret (its length the first byte, then its bytes) in a body cut
/// into chunks (sizes from the last bytes) never comes out whole, every other byte comes out
/// unchanged, and nothing is lost or added.
pub fn scrub_stream(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = usize::from(n % 24) + 1;
    if rest.len() < n + 2 {
        return;
    }
    let (secret, rest) = rest.split_at(n);
    let (cuts, body) = rest.split_at(rest.len().min(4));
    let secret = SecretBytes::new(secret.to_vec());
    for kind in [CredentialKind::Bearer, CredentialKind::Basic { username: "u".into() }] {
        let forms = plan::secret_forms(&kind, &secret);
        let mut s = Scrubber::new(forms.clone());
        let mut out = Vec::new();
        let mut at = 0;
        for (i, c) in cuts.iter().cycle().enumerate() {
            if at >= body.len() || i > body.len() {
                break;
            }
            let step = (usize::from(*c) % 16).min(body.len() - at);
            out.extend(s.push(&body[at..at + step]));
            at += step;
        }
        out.extend(s.push(&body[at..]));
        out.extend(s.finish());
        assert_eq!(out.len(), body.len(), "the scrubber changed the length");
        for (o, b) in out.iter().zip(body) {
            assert!(o == b || *o == b'*', "a byte changed into something other than *");
        }
        // No form of the secret passes through unchanged. (Not "no form in the output": a
        // secret with a `*` in it can appear where masking met a neighbour, one of only `*` is
        // its own mask; and of overlapping occurrences the first is masked, which leaves none
        // whole.)
        for f in forms.iter().filter(|f| f.iter().any(|&b| b != b'*')) {
            for (i, w) in out.windows(f.len()).enumerate() {
                assert!(w != &f[..] || body[i..i + f.len()] != f[..], "a form of the secret came through");
            }
        }
    }
}

/// The console's form bodies and cookies: pairs decode as written (what the broker encodes
/// comes back the same), `next` only ever leads to a consent page, and the session cookie is
/// the named one.
pub fn console_form(data: &[u8]) {
    use crate::broker::console::{actions, auth};
    let pairs = actions::form(data);
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", plan::percent_encode(k.as_bytes()), plan::percent_encode(v.as_bytes())))
        .collect();
    assert_eq!(actions::form(encoded.join("&").as_bytes()), pairs, "pairs do not survive their own encoding");
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(next) = actions::next_page(text)
    {
        let id = next.strip_prefix("/oauth/consent?request=").expect("next leads to a consent page");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{next:?}");
    }
    let _ = auth::cookie(&header_map(data));
}

/// A data dir whose journals were forged: the first byte picks the log, each further line is
/// one record (framed with a valid checksum, so the fuzzer reaches the record decoders), unless
/// the input starts with the journal header (then it is the file itself). Every store loads or
/// refuses with an error naming the log; none panics. The audit log verifier reads the same
/// bytes as a log file.
pub fn data_files(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let bytes = if rest.starts_with(journal::MAGIC) {
        rest.to_vec()
    } else {
        let mut b = journal::MAGIC.to_vec();
        for rec in rest.split(|b| *b == b'\n').filter(|r| !r.is_empty()) {
            b.extend(journal::frame(rec));
        }
        b
    };
    let Ok(replayed) = journal::parse(&bytes) else { return };
    // What parsed frames again to the same records.
    let mut again = journal::MAGIC.to_vec();
    for r in &replayed.records {
        again.extend(journal::frame(r));
    }
    assert_eq!(journal::parse(&again).map(|r| r.records).ok().as_ref(), Some(&replayed.records));
    let forged = Forged(replayed);
    let now = crate::time::UnixMicros(1_800_000_000_000_000);
    smol::block_on(async {
        match which % 5 {
            0 => {
                let unseal = |_: String, _: Vec<u8>| async { Err::<crate::macaroon::RootKey, _>("forged".to_owned()) };
                let _ = crate::broker::tasks::TaskStore::load(&forged, now, unseal).await;
            }
            1 => {
                let _ = crate::broker::agents::Directory::load(&forged).await;
            }
            2 => {
                let _ = crate::broker::approvals::Approvals::load(&forged).await;
            }
            3 => {
                let _ = pins::Pins::load(&forged).await;
            }
            _ => {
                let _ = crate::broker::ssh::registry::Registry::load(&forged, 1_800_000_000).await;
            }
        }
    });
    let report = crate::broker::audit::verify::verify(&[("audit.log".to_owned(), rest.to_vec())], Some(&[7; 32]), &[]);
    assert!(!rest.is_empty() || report.ok(), "an empty log verifies");
}

/// A journal backend whose every log replays to the forged records; appends are dropped.
struct Forged(Replayed);

struct Discard;

impl Store for Discard {
    fn append(&self, _payload: &[u8]) -> Result<Durable, Error> {
        Ok(Durable::settled(Ok(())))
    }
}

impl Backend for Forged {
    fn replay<'a>(&'a self, _name: &'a str) -> Local<'a, Result<Replayed, Error>> {
        let r = Replayed { records: self.0.records.clone(), torn_bytes: self.0.torn_bytes };
        Box::pin(async move { Ok(r) })
    }

    fn open<'a>(&'a self, _name: &'a str, _compacted: Option<Vec<Vec<u8>>>) -> Local<'a, Result<Rc<dyn Store>, Error>> {
        Box::pin(async { Ok(Rc::new(Discard) as Rc<dyn Store>) })
    }
}
