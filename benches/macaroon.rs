//! Token engine costs (pure, in-process). Run: `cargo bench --bench macaroon`.
//! Allocation counts come from divan's AllocProfiler.

use divan::{AllocProfiler, Bencher};
use ephyr::macaroon::{ChainStart, LOCATION, Macaroon, RootKey, attenuate};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

const ROOT: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
const CHILDREN: [&str; 5] = [
    "01BX5ZZKBKACTAV9WEVGEMMVRZ",
    "01BX5ZZKBKACTAV9WEVGEMMVS0",
    "01BX5ZZKBKACTAV9WEVGEMMVS1",
    "01BX5ZZKBKACTAV9WEVGEMMVS2",
    "01BX5ZZKBKACTAV9WEVGEMMVS3",
];

fn start() -> ChainStart {
    RootKey::from_bytes(&[42u8; 32]).start(ROOT.as_bytes())
}

fn root_caveats_8() -> Vec<String> {
    vec![
        format!("task = {ROOT}"),
        "expires_before = 2030-01-01T00:00:00Z".into(),
        "target IN [web,db,cache]".into(),
        "role IN [read,op]".into(),
        "service IN [openai,github]".into(),
        "method IN [GET,POST]".into(),
        "can_delegate = true".into(),
        "delegation_depth <= 5".into(),
    ]
}

/// What the broker mints for a typical task: its task, expiry and the envelope it asked for.
fn root_caveats_typical() -> Vec<String> {
    vec![
        format!("task = {ROOT}"),
        "expires_before = 2030-01-01T00:00:00Z".into(),
        "target IN [web,db]".into(),
        "role IN [read]".into(),
    ]
}

fn mint(cavs: &[String]) -> Macaroon {
    let refs: Vec<&str> = cavs.iter().map(String::as_str).collect();
    start().mint(LOCATION, &refs)
}

/// Root + 5 delegations, each appending task, expiry and a narrowing (19 caveats).
fn five_deep() -> Macaroon {
    let mut m = mint(&root_caveats_typical());
    for (i, child) in CHILDREN.iter().enumerate() {
        m = attenuate(&m, &format!("task = {child}"));
        m = attenuate(&m, &format!("expires_before = 2029-0{}-01T00:00:00Z", 9 - i));
        m = attenuate(&m, if i % 2 == 0 { "target IN [web]" } else { "role IN [read]" });
    }
    m
}

#[divan::bench]
fn mint_root_8_caveats(b: Bencher) {
    let s = start();
    let cavs = root_caveats_8();
    let refs: Vec<&str> = cavs.iter().map(String::as_str).collect();
    b.bench_local(|| s.mint(LOCATION, divan::black_box(&refs)));
}

#[divan::bench]
fn mint_root_8_caveats_and_encode(b: Bencher) {
    let s = start();
    let cavs = root_caveats_8();
    let refs: Vec<&str> = cavs.iter().map(String::as_str).collect();
    b.bench_local(|| s.mint(LOCATION, divan::black_box(&refs)).encode());
}

fn verify_text(b: Bencher, m: Macaroon) {
    let s = start();
    let text = m.encode();
    s.verify_and_reduce(&m).expect("valid");
    b.bench_local(|| {
        let m = Macaroon::decode(divan::black_box(&text)).unwrap();
        s.verify_and_reduce(&m).unwrap()
    });
}

#[divan::bench]
fn verify_reduce_root_typical_4_caveats(b: Bencher) {
    verify_text(b, mint(&root_caveats_typical()));
}

#[divan::bench]
fn verify_reduce_root_8_caveats(b: Bencher) {
    verify_text(b, mint(&root_caveats_8()));
}

#[divan::bench]
fn verify_reduce_5_deep_19_caveats(b: Bencher) {
    verify_text(b, five_deep());
}

#[divan::bench]
fn decode_only_root_8_caveats(b: Bencher) {
    let text = mint(&root_caveats_8()).encode();
    b.bench_local(|| Macaroon::decode(divan::black_box(&text)).unwrap());
}

#[divan::bench]
fn decode_only_5_deep(b: Bencher) {
    let text = five_deep().encode();
    b.bench_local(|| Macaroon::decode(divan::black_box(&text)).unwrap());
}

#[divan::bench]
fn attenuate_one_caveat(b: Bencher) {
    let m = mint(&root_caveats_typical());
    b.bench_local(|| attenuate(divan::black_box(&m), "target IN [web]"));
}

#[divan::bench]
fn reduce_only_5_deep(b: Bencher) {
    let m = five_deep();
    b.bench_local(|| ephyr::macaroon::reduce(divan::black_box(&m).caveats()).unwrap());
}

#[divan::bench]
fn chain_only_5_deep(b: Bencher) {
    let s = start();
    let m = five_deep();
    b.bench_local(|| s.verify_signature(divan::black_box(&m)).unwrap());
}
