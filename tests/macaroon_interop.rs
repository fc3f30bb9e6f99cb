//! Token interop with pymacaroons (PyPI), a macaroon library nobody here wrote: it verifies and
//! attenuates tokens we mint, and we verify and reduce tokens it mints or attenuates.

mod common;

use common::python;
use ephyr::macaroon::{LOCATION, Macaroon, RootKey, SetKey};

const ROOT: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

fn py(args: &[&str]) -> String {
    let out = python("pymacaroons_interop.py").args(args).output().expect("python3");
    assert!(
        out.status.success(),
        "pymacaroons helper failed (is tests/requirements.txt installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn key_bytes() -> Vec<u8> {
    let mut k = vec![0u8; 32];
    ephyr::signer::keys::random_bytes(&mut k).unwrap();
    k
}

#[test]
fn pymacaroons_verifies_and_attenuates_our_token_and_we_reduce_the_result() {
    let kb = key_bytes();
    let hex = data_encoding::HEXLOWER.encode(&kb);
    let start = RootKey::from_bytes(&kb).start(ROOT.as_bytes());
    let ours = start.mint(
        LOCATION,
        &[
            &format!("task = {ROOT}"),
            "expires_before = 2099-01-01T00:00:00Z",
            "target IN [web,db]",
            "role IN [read,op]",
        ],
    );
    assert_eq!(py(&["verify", &hex, &ours.encode()]), "valid");
    let theirs = py(&[
        "verify-attenuate",
        &hex,
        &ours.encode(),
        "target IN [web]",
        "arg.path prefix /data",
        "can_delegate = false",
    ]);
    let m = Macaroon::decode(&theirs).expect("pymacaroons produced a valid V2 token");
    let r = start.verify_and_reduce(&m).expect("we verify pymacaroons' attenuation");
    assert_eq!(r.task().unwrap().to_string(), ROOT);
    assert!(r.envelope.dim(SetKey::Target).allows("web"));
    assert!(!r.envelope.dim(SetKey::Target).allows("db"), "pymacaroons' caveat narrowed the token");
    assert!(r.envelope.dim(SetKey::Role).allows("op"));
    assert!(!r.envelope.can_delegate);
    assert!(r.envelope.args["path"].check(&serde_json::json!("/data/x")).is_ok());
    assert!(r.envelope.args["path"].check(&serde_json::json!("/etc/passwd")).is_err());
    // A wrong key is refused by pymacaroons too.
    assert!(py(&["verify", &"00".repeat(32), &ours.encode()]).starts_with("invalid"));
    // A caveat outside our grammar, appended by pymacaroons, verifies cryptographically but grants nothing.
    let odd = py(&["verify-attenuate", &hex, &ours.encode(), "time < 2030"]);
    let e = start.verify_and_reduce(&Macaroon::decode(&odd).unwrap()).unwrap_err();
    assert!(e.to_string().contains("unknown caveat key"), "{e}");
}

#[test]
fn we_verify_and_reduce_a_token_pymacaroons_minted() {
    let kb = key_bytes();
    let hex = data_encoding::HEXLOWER.encode(&kb);
    let theirs = py(&[
        "mint",
        &hex,
        ROOT,
        &format!("task = {ROOT}"),
        "service IN [openai]",
        "method IN [GET,POST]",
        "delegation_depth <= 2",
    ]);
    let m = Macaroon::decode(&theirs).unwrap();
    assert_eq!(m.location(), Some(&b"pymacaroons"[..]));
    let start = RootKey::from_bytes(&kb).start(ROOT.as_bytes());
    let r = start.verify_and_reduce(&m).unwrap();
    assert!(r.envelope.dim(SetKey::Service).allows("openai"));
    assert!(r.envelope.dim(SetKey::Method).allows("POST") && !r.envelope.dim(SetKey::Method).allows("DELETE"));
    assert_eq!(r.envelope.delegation_depth, Some(2));
    // And our attenuation of their token verifies in pymacaroons.
    let narrowed = ephyr::macaroon::attenuate(&m, "method IN [GET]");
    assert_eq!(py(&["verify", &hex, &narrowed.encode()]), "valid");
    // A token they minted under another key does not verify here.
    let other = py(&["mint", &"11".repeat(32), ROOT, &format!("task = {ROOT}")]);
    assert_eq!(
        start.verify_and_reduce(&Macaroon::decode(&other).unwrap()),
        Err(ephyr::macaroon::VerifyError::BadSignature)
    );
}

#[test]
fn inspect_shows_caveats_envelope_lineage_and_expiry_and_verifies_with_a_key() {
    let kb = key_bytes();
    let hex = data_encoding::HEXLOWER.encode(&kb);
    let child = "01BX5ZZKBKACTAV9WEVGEMMVRZ";
    let token = py(&[
        "mint",
        &hex,
        ROOT,
        &format!("task = {ROOT}"),
        "expires_before = 2030-01-01T00:00:00Z",
        "target IN [web,db]",
        &format!("task = {child}"),
        "target IN [web]",
        "arg.path prefix /data",
        "agent = claude",
    ]);
    let dir = common::TempDir::new("inspect");
    let keyfile = dir.join("root.key");
    std::fs::write(&keyfile, &kb).unwrap();

    // Human output, no key.
    let out =
        std::process::Command::new(common::ephyr_bin()).env("TZ", "UTC").args(["inspect", &token]).output().unwrap();
    let text = common::stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", common::stderr(&out));
    assert!(text.contains("signature  not verified"), "{text}");
    assert!(text.contains(&format!("task       {child}")), "{text}");
    assert!(text.contains(&format!("lineage    {ROOT} -> {child}")), "{text}");
    assert!(text.contains("expires    2030-01-01T00:00:00Z UTC | 2030-01-01T00:00:00Z local"), "{text}");
    assert!(text.contains("targets          web\n"), "{text}");
    assert!(text.contains("services         unconstrained by the token"), "{text}");
    assert!(text.contains("arg.path         under /data"), "{text}");
    let caveat_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("   ")).collect();
    assert_eq!(caveat_lines.len(), 7, "caveats in order: {text}");
    assert!(caveat_lines[3].ends_with(&format!("task = {child}")));

    // JSON from stdin, verified with the root key; local time follows TZ.
    let mut cmd = std::process::Command::new(common::ephyr_bin());
    cmd.env("TZ", "Asia/Kolkata").args(["inspect", "-", "--json", "--root-key-file", keyfile.to_str().unwrap()]);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child_proc = cmd.spawn().unwrap();
    use std::io::Write;
    child_proc.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
    let out = child_proc.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true, "{v:#}");
    assert_eq!(v["task"], child);
    assert_eq!(v["envelope"]["targets"], serde_json::json!(["web"]));
    assert_eq!(v["expires"]["utc"], "2030-01-01T00:00:00Z");
    assert_eq!(v["expires"]["local"], "2030-01-01T05:30:00+05:30");
    assert_eq!(v["metadata"]["agent"], "claude");
    assert_eq!(v["size"]["text"].as_u64().unwrap() as usize, token.len());

    // A wrong key: exit 3, INVALID.
    std::fs::write(&keyfile, [0u8; 32]).unwrap();
    let out = common::ephyr(&["inspect", &token, "--root-key-file", keyfile.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(common::stdout(&out).contains("signature  INVALID: token signature is invalid"));
    // Malformed tokens: exit 3 with the reason.
    for (bad, why) in [("mac_!!!", "base64url"), ("abc", "starts with \"mac_\""), ("mac_AQ", "version byte")] {
        let out = common::ephyr(&["inspect", bad]);
        assert_eq!(out.status.code(), Some(3), "{bad}");
        assert!(common::stderr(&out).contains(why), "{bad}: {}", common::stderr(&out));
    }
}
