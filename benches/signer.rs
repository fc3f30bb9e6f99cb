//! Signer costs: a certificate signed in-process (crypto + encoding only) and the full round trip
//! to a real, sandboxed signer worker over its SEQPACKET socket.
//!
//! Run: `cargo build --release && cargo bench --bench signer` (as root, the signer drops to 65534).
//! EPHYR_BIN overrides the signer executable (default target/release/ephyr).

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use divan::Bencher;
use ephyr::broker::signer_client::{self, Launch};
use ephyr::os;
use ephyr::signer::custody::Custody;
use ephyr::signer::keys::{CaKey, SealingKey};
use ephyr::signer::protocol::{CertRequest, ControlRequest, ControlResponse, MAX_FRAME, Request, Response};
use ephyr::signer::{SignerConfig, TargetIds};

fn main() {
    divan::main();
}

fn config() -> SignerConfig {
    SignerConfig {
        max_cert_ttl_secs: 3600,
        principals: ["agent-read".to_string()].into(),
        rate_limit: 100_000_000,
        rate_window_secs: 60,
        sealed: Default::default(),
    }
}

fn cert_request() -> Request {
    let now = ephyr::time::now().secs() as u64;
    Request::SignUserCert(CertRequest {
        public_key: CaKey::generate().unwrap().public_line(),
        principals: vec!["agent-read".into()],
        key_id: "ephyr:bench:01JBENCH:1".into(),
        valid_after: now - 30,
        valid_before: now + 300,
        force_command: None,
        source_address: None,
        extensions: vec!["permit-pty".into()],
    })
}

#[divan::bench]
fn sign_certificate_in_process(b: Bencher) {
    let custody = Custody::new(
        &CaKey::generate().unwrap(),
        &SealingKey::generate().unwrap(),
        config(),
        os::SharedCounters::new().unwrap(),
    );
    let req = cert_request();
    let now = ephyr::time::now().secs() as u64;
    b.bench_local(|| match custody.handle(divan::black_box(req.clone()), now) {
        Response::Certificate { .. } => {}
        other => panic!("{other:?}"),
    });
}

struct LiveWorker {
    sock: OwnedFd,
    _keeper: signer_client::KeeperProcess,
    _control: std::rc::Rc<ephyr::broker::reactor::Io<OwnedFd>>,
}

fn live_worker() -> LiveWorker {
    let exe = std::env::var_os("EPHYR_BIN").map(PathBuf::from).unwrap_or_else(|| "target/release/ephyr".into());
    let target = (os::user_ids().1 == 0).then_some(TargetIds { uid: 65534, gid: 65534 });
    let launch = Launch::new(None, false, target, &config(), false).with_exe(exe);
    ephyr::broker::reactor::block_on(async {
        let mut keeper = launch.spawn(false).expect("spawn the signer (build target/release/ephyr first)");
        let (status, control) = signer_client::wait_ready(&mut keeper).await.expect("signer ready");
        assert!(status.sandbox.enforced, "benchmarking an unsandboxed signer: {:?}", status.sandbox.problems);
        control.write_with(|s| os::send_packet(s.as_fd(), &ControlRequest::SpawnWorker.encode(1))).await.unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let (pkt, fd) = control.read_with(|s| os::recv_with_fd(s.as_fd(), &mut buf)).await.unwrap();
        assert!(matches!(ControlResponse::decode(&buf[..pkt.len]).unwrap().1, ControlResponse::Spawned { .. }));
        LiveWorker { sock: fd.unwrap(), _keeper: keeper, _control: control }
    })
}

fn round_trip(w: &LiveWorker, frame: &[u8], buf: &mut [u8]) -> usize {
    os::send_packet(w.sock.as_fd(), frame).unwrap();
    os::recv_packet(w.sock.as_fd(), buf).unwrap().len
}

#[divan::bench]
fn sign_certificate_round_trip(b: Bencher) {
    let w = live_worker();
    let frame = cert_request().encode(1);
    let mut buf = vec![0u8; MAX_FRAME];
    b.bench_local(|| {
        let n = round_trip(&w, &frame, &mut buf);
        assert!(matches!(Response::decode(&buf[..n]).unwrap().1, Response::Certificate { .. }));
    });
}

#[divan::bench]
fn status_round_trip(b: Bencher) {
    let w = live_worker();
    let frame = Request::Status.encode(1);
    let mut buf = vec![0u8; MAX_FRAME];
    b.bench_local(|| round_trip(&w, &frame, &mut buf));
}

#[divan::bench]
fn seal_round_trip_64_bytes(b: Bencher) {
    let w = live_worker();
    let frame =
        Request::Seal { context: "rootkey:01JBENCH".into(), plaintext: ephyr::secret::SecretBytes::new(vec![7; 64]) }
            .encode(1);
    let mut buf = vec![0u8; MAX_FRAME];
    b.bench_local(|| round_trip(&w, &frame, &mut buf));
}
