//! The injected faults of `scripts/faults.py` against the debug binary, with fewer rounds than
//! the recorded runs (docs/RELIABILITY.md): the broker SIGKILLed during writes, a full data dir
//! (the audit log and journals resume when space returns), the signer's worker and keeper
//! killed under load, hostile, slow and down upstreams and remotes, a burst of policy
//! reloads, and the wall clock stepped forward and back. Each case asserts its outcome and
//! reason.

mod common;
use common::require_root;

#[test]
fn injected_faults_lose_nothing_acknowledged_and_the_service_recovers() {
    if !require_root() {
        return;
    }
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/faults.py"))
        .args(["--bin", env!("CARGO_BIN_EXE_ephyr"), "--rounds", "12"])
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for case in ["kill", "disk", "signer", "keeper", "hostile", "reload", "clock"] {
        assert!(
            text.contains(&format!("PASS {case} ")),
            "case {case}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(out.status.success(), "{text}");
}
