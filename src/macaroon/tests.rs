//! Cross-cutting tests of the token engine: published libmacaroons vectors, tamper resistance,
//! and the monotonicity properties DESIGN.md §4 promises.

use proptest::prelude::*;

use super::*;

const KEY: &[u8] = b"this is the key";
const ROOT_V2: &str = "AgETaHR0cDovL2V4YW1wbGUub3JnLwIFa2V5aWQAAAYgfN7nklEcW8b1KEhYBd_psk54XijiqZMB-dcRxgnjjvc";
const ONE_CAVEAT_V2: &str = "AgETaHR0cDovL2V4YW1wbGUub3JnLwIFa2V5aWQAAhRhY2NvdW50ID0gMzczNTkyODU1OQAABiD1SAf23G7fiL8PcwazgiVio2JTPb9zObphdl2kvSWdhw";
const TWO_CAVEATS_V2: &str = "AgETaHR0cDovL2V4YW1wbGUub3JnLwIFa2V5aWQAAhRhY2NvdW50ID0gMzczNTkyODU1OQACDHVzZXIgPSBhbGljZQAABiBL6WfNHqDGsmuvakqU7psFsViG2guoXoxCqTyNDhJe_A";

fn lib(token: &str) -> Macaroon {
    Macaroon::decode(&format!("mac_{token}")).unwrap()
}

/// libmacaroons' "exact" verifier: the chain must verify and every caveat must equal one of the
/// predicates the verifier knows.
fn authorized(key: &[u8], m: &Macaroon, exact: &[&str]) -> bool {
    RootKey::from_bytes(key).start(m.identifier()).verify_signature(m).is_ok()
        && m.caveats().all(|c| exact.iter().any(|e| e.as_bytes() == c))
}

#[test]
fn libmacaroons_v2_vectors() {
    // root_v2_1: authorized; root_v2_2: wrong key.
    assert!(authorized(KEY, &lib(ROOT_V2), &[]));
    assert!(!authorized(b"this is not the key", &lib(ROOT_V2), &[]));
    // caveat_v2_1 .. v2_6.
    assert!(authorized(KEY, &lib(ONE_CAVEAT_V2), &["account = 3735928559"]));
    assert!(!authorized(KEY, &lib(ONE_CAVEAT_V2), &["account = 0000000000"]));
    assert!(!authorized(KEY, &lib(ONE_CAVEAT_V2), &[]));
    assert!(authorized(KEY, &lib(TWO_CAVEATS_V2), &["account = 3735928559", "user = alice"]));
    assert!(!authorized(KEY, &lib(TWO_CAVEATS_V2), &["account = 3735928559"]));
    assert!(!authorized(KEY, &lib(TWO_CAVEATS_V2), &["user = alice"]));
    // We mint byte-identical tokens from the same inputs.
    let start = RootKey::from_bytes(KEY).start(b"keyid");
    assert_eq!(start.mint("http://example.org/", &["account = 3735928559"]).encode(), format!("mac_{ONE_CAVEAT_V2}"));
    assert_eq!(attenuate(&lib(ONE_CAVEAT_V2), "user = alice").encode(), format!("mac_{TWO_CAVEATS_V2}"));
    assert_eq!(
        data_encoding::HEXLOWER.encode(lib(ONE_CAVEAT_V2).signature()),
        "f54807f6dc6edf88bf0f7306b3822562a362533dbf7339ba61765da4bd259d87"
    );
}

const ROOT: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
const CHILD: &str = "01BX5ZZKBKACTAV9WEVGEMMVRZ";

fn key() -> RootKey {
    RootKey::from_bytes(&[7u8; 32])
}

fn root_token() -> Macaroon {
    key().start(ROOT.as_bytes()).mint(
        LOCATION,
        &[
            &format!("task = {ROOT}"),
            "expires_before = 2030-01-01T00:00:00Z",
            "target IN [web,db]",
            "role IN [read,op]",
            "can_delegate = true",
            "delegation_depth <= 3",
        ],
    )
}

#[test]
fn mint_verify_reduce_and_attenuate() {
    let start = key().start(ROOT.as_bytes());
    let t = root_token();
    let r = start.verify_and_reduce(&t).unwrap();
    assert_eq!(r.task().unwrap().to_string(), ROOT);
    assert!(r.envelope.dim(SetKey::Target).allows("web") && !r.envelope.dim(SetKey::Target).allows("cache"));
    assert_ne!(r.lineage[0].binding, [0; 32], "verified lineage carries a binding digest");
    // Offline attenuation by a holder narrows and still verifies.
    let narrow = attenuate(&attenuate(&t, "target IN [web]"), "can_delegate = false");
    let rn = start.verify_and_reduce(&narrow).unwrap();
    assert!(rn.envelope.is_subset_of(&r.envelope));
    assert!(!rn.envelope.dim(SetKey::Target).allows("db"));
    assert!(!rn.envelope.can_delegate);
    assert_eq!(rn.task(), r.task(), "attenuation does not change the task");
    // Round trip through text.
    assert_eq!(Macaroon::decode(&narrow.encode()).unwrap(), narrow);
    // Clock checks.
    let now = crate::time::parse_rfc3339("2029-01-01T00:00:00Z").unwrap();
    assert!(start.verify(&t, now).is_ok());
    let later = crate::time::parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
    assert!(matches!(start.verify(&t, later), Err(VerifyError::Time(_))));
}

#[test]
fn wrong_keys_tampering_reordering_and_removal_fail() {
    let t = root_token();
    let start = key().start(ROOT.as_bytes());
    assert_eq!(
        RootKey::from_bytes(&[8u8; 32]).start(ROOT.as_bytes()).verify_and_reduce(&t),
        Err(VerifyError::BadSignature)
    );
    assert_eq!(key().start(CHILD.as_bytes()).verify_and_reduce(&t), Err(VerifyError::WrongRootKey));
    let cavs: Vec<Vec<u8>> = t.caveats().map(<[u8]>::to_vec).collect();
    let rebuild = |cs: &[Vec<u8>]| {
        let refs: Vec<&[u8]> = cs.iter().map(|c| &c[..]).collect();
        Macaroon::from_parts(LOCATION.as_bytes(), ROOT.as_bytes(), &refs, *t.signature())
    };
    let mut swapped = cavs.clone();
    swapped.swap(2, 3);
    assert_eq!(start.verify_and_reduce(&rebuild(&swapped)), Err(VerifyError::BadSignature));
    for i in 0..cavs.len() {
        let mut fewer = cavs.clone();
        fewer.remove(i);
        assert_eq!(start.verify_and_reduce(&rebuild(&fewer)), Err(VerifyError::BadSignature), "removed caveat {i}");
    }
    // A widened caveat (same length) fails.
    let mut widened = cavs.clone();
    widened[3] = b"role IN [op,ro]".to_vec();
    assert_eq!(start.verify_and_reduce(&rebuild(&widened)), Err(VerifyError::BadSignature));
    // A caveat the grammar does not know fails even with a valid chain.
    let odd = attenuate(&t, "colour = blue");
    assert!(
        matches!(start.verify_and_reduce(&odd), Err(VerifyError::Caveat(e)) if e.reason.contains("unknown caveat key"))
    );
    // A token whose first task is not its identifier fails.
    let bad_root = key().start(ROOT.as_bytes()).mint(LOCATION, &[&format!("task = {CHILD}")]);
    assert!(matches!(start.verify_and_reduce(&bad_root), Err(VerifyError::Caveat(_))));
    // The location is not MACed: changing it does not matter.
    let moved = Macaroon::from_parts(
        b"elsewhere",
        ROOT.as_bytes(),
        &cavs.iter().map(|c| &c[..]).collect::<Vec<_>>(),
        *t.signature(),
    );
    assert!(start.verify_and_reduce(&moved).is_ok());
}

/// Valid caveats from a small universe, so that intersections actually happen.
fn caveat() -> impl Strategy<Value = String> {
    let names = proptest::sample::subsequence(vec!["a", "b", "c", "d"], 1..=4);
    let methods = proptest::sample::subsequence(vec!["GET", "POST", "PUT"], 1..=3);
    let times = proptest::sample::select(vec!["2029-01-01T00:00:00Z", "2030-01-01T00:00:00Z", "2031-06-01T12:00:00Z"]);
    prop_oneof![
        (proptest::sample::select(vec!["target", "role", "service", "remote", "tool"]), names.clone())
            .prop_map(|(k, v)| format!("{k} IN [{}]", v.join(","))),
        methods.prop_map(|v| format!("method IN [{}]", v.join(","))),
        times.clone().prop_map(|t| format!("expires_before = {t}")),
        times.prop_map(|t| format!("not_before = {t}")),
        any::<bool>().prop_map(|b| format!("can_delegate = {b}")),
        (0u8..8).prop_map(|n| format!("delegation_depth <= {n}")),
        proptest::sample::select(vec!["/", "/a", "/a/b", "/b", "/a/b/c"]).prop_map(|p| format!("arg.p prefix {p}")),
        proptest::sample::select(vec!["0", "1.5", "10", "100"]).prop_map(|n| format!("arg.n <= {n}")),
        proptest::sample::subsequence(vec!["x", "y", "z"], 1..=3).prop_map(|v| format!("arg.r IN [{}]", v.join(","))),
        proptest::sample::select(vec!["agent = a", "agent = b", "initiated_by = x"]).prop_map(str::to_owned),
    ]
}

fn token_with(cavs: &[String]) -> Macaroon {
    let mut all = vec![format!("task = {ROOT}")];
    all.extend(cavs.iter().cloned());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    key().start(ROOT.as_bytes()).mint(LOCATION, &refs)
}

fn arg_values() -> Vec<serde_json::Value> {
    ["/", "/a", "/a/b", "/a/b/c", "/b", "/ab", "/a/../b", "x", "y", "z"]
        .iter()
        .map(|s| serde_json::json!(s))
        .chain([0.0, 1.0, 1.5, 10.0, 50.0, 100.0, 101.0].iter().map(|n| serde_json::json!(n)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn appending_a_caveat_only_narrows(base in proptest::collection::vec(caveat(), 0..8), extra in caveat()) {
        let start = key().start(ROOT.as_bytes());
        let t = token_with(&base);
        let before = start.verify_and_reduce(&t).unwrap();
        let after = start.verify_and_reduce(&attenuate(&t, &extra)).unwrap();
        prop_assert!(after.envelope.is_subset_of(&before.envelope), "{extra} widened {:?}", before.envelope);
        prop_assert_eq!(after.task(), before.task(), "which task the token acts as never changes");
        if before.agent.is_some() {
            prop_assert_eq!(&after.agent, &before.agent, "metadata: the first value wins");
        }
        // Semantically too: every name and argument value allowed after was allowed before.
        for k in SetKey::ALL {
            for n in ["a", "b", "c", "d", "GET", "POST", "PUT", "zz"] {
                prop_assert!(!after.envelope.dim(k).allows(n) || before.envelope.dim(k).allows(n));
            }
        }
        for (name, rule) in &after.envelope.args {
            for v in arg_values() {
                if let (Ok(()), Some(old)) = (rule.check(&v), before.envelope.args.get(name)) {
                    prop_assert!(old.check(&v).is_ok(), "arg.{name}: {v} newly allowed");
                }
            }
        }
        let t0 = crate::time::parse_rfc3339("2030-06-01T00:00:00Z").unwrap();
        prop_assert!(after.envelope.check_time(t0).is_err() || before.envelope.check_time(t0).is_ok());
        prop_assert!(!after.envelope.can_delegate || before.envelope.can_delegate);
    }

    #[test]
    fn encode_decode_round_trip(base in proptest::collection::vec(caveat(), 0..12)) {
        let t = token_with(&base);
        let text = t.encode();
        prop_assert!(text.starts_with("mac_"));
        prop_assert_eq!(Macaroon::decode(&text).unwrap(), t);
    }

    #[test]
    fn tampering_any_byte_fails(base in proptest::collection::vec(caveat(), 0..6), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let start = key().start(ROOT.as_bytes());
        let t = token_with(&base);
        let mut bytes = t.to_binary().to_vec();
        let i = pos.index(bytes.len());
        bytes[i] ^= flip;
        // Either it no longer decodes, or the chain no longer verifies, or (only for the location
        // hint, which is not MACed) it still verifies to exactly the same authority.
        if let Ok(m) = Macaroon::decode_binary(bytes) {
            match start.verify_and_reduce(&m) {
                Err(_) => {}
                Ok(r) => {
                    prop_assert_eq!(m.identifier(), t.identifier());
                    prop_assert_eq!(m.caveats().collect::<Vec<_>>(), t.caveats().collect::<Vec<_>>());
                    prop_assert_eq!(r, start.verify_and_reduce(&t).unwrap());
                }
            }
        }
    }

    #[test]
    fn reordering_or_removing_caveats_fails(base in proptest::collection::vec(caveat(), 2..8), i in any::<prop::sample::Index>(), j in any::<prop::sample::Index>()) {
        let start = key().start(ROOT.as_bytes());
        let t = token_with(&base);
        let cavs: Vec<Vec<u8>> = t.caveats().map(<[u8]>::to_vec).collect();
        let (a, b) = (i.index(cavs.len()), j.index(cavs.len()));
        let mut moved = cavs.clone();
        moved.swap(a, b);
        if moved != cavs {
            let refs: Vec<&[u8]> = moved.iter().map(|c| &c[..]).collect();
            let m = Macaroon::from_parts(LOCATION.as_bytes(), ROOT.as_bytes(), &refs, *t.signature());
            prop_assert_eq!(start.verify_and_reduce(&m), Err(VerifyError::BadSignature));
        }
        let mut fewer = cavs.clone();
        fewer.remove(a);
        let refs: Vec<&[u8]> = fewer.iter().map(|c| &c[..]).collect();
        let m = Macaroon::from_parts(LOCATION.as_bytes(), ROOT.as_bytes(), &refs, *t.signature());
        prop_assert_eq!(start.verify_and_reduce(&m), Err(VerifyError::BadSignature));
    }

    #[test]
    fn decoding_arbitrary_text_never_panics(s in "mac_[A-Za-z0-9_-]{0,200}") {
        let _ = Macaroon::decode(&s);
    }
}
