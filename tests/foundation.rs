//! Foundation: the sandboxed signer, the broker's privilege model, restarts, shutdown, init and
//! doctor — all against the real binary, a real sshd and independent attackers.

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use common::*;
use ephyr::broker::signer_client::{self, Launch};
use ephyr::signer::protocol::{CertRequest, ControlRequest, ControlResponse, ErrorCode, MAX_FRAME, Request, Response};
use ephyr::signer::{SignerConfig, TargetIds};

const POLICY: &str = "version: 1\nlimits: {cert_ttl_max: 10m, signer_rate: 100/1m}\n\
roles: {test: {principal: ephyrtest}}\ntargets:\n  local:\n    host: 127.0.0.1\n    allowed_roles: [test]\n";

#[test]
fn doctor_self_check_shows_every_escape_from_the_signer_blocked() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("doctor");
    let data = dir.join("data");
    let init =
        ephyr(&["init", "--data-dir", data.to_str().unwrap(), "--config-dir", dir.join("etc").to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    let out = ephyr(&[
        "doctor",
        "--json",
        "--offline",
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        dir.join("etc/policy.yaml").to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert!(out.status.success(), "doctor failed: {v:#}");
    let checks = v["checks"].as_array().unwrap();
    let find =
        |name: &str| checks.iter().find(|c| c["check"] == name).unwrap_or_else(|| panic!("no check {name}: {v:#}"));
    let sandbox = find("signer sandbox");
    assert_eq!(sandbox["status"], "ok");
    let detail = sandbox["detail"].as_str().unwrap();
    assert!(
        detail.contains("uid 65534") && detail.contains("seccomp Enforced") && detail.contains("Enforced"),
        "{detail}"
    );
    // Inside the full worker sandbox every escape kills the probe with SIGSYS.
    for kind in ["open_file", "socket_inet", "connect", "execve", "ptrace", "fork"] {
        let c = find(&format!("escape {kind} (full_worker_sandbox)"));
        assert_eq!(c["status"], "ok", "{c}");
        assert_eq!(c["detail"], "blocked: killed by seccomp (SIGSYS)", "{c}");
    }
    // Landlock on its own already denies files, TCP connect and exec with EACCES.
    for kind in ["open_file", "connect", "execve"] {
        let c = find(&format!("escape {kind} (landlock_only)"));
        assert!(c["detail"].as_str().unwrap().contains("Permission denied"), "{c}");
    }
}

#[test]
fn live_signer_reports_its_sandbox_and_runs_as_another_uid() {
    if !require_root() {
        return;
    }
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), ..Default::default() });
    let st = b.status();
    let sb = &st["signer"]["sandbox"];
    assert_eq!(sb["enforced"], true, "{st:#}");
    assert_eq!(sb["landlock"], "Enforced");
    assert_eq!(sb["seccomp"], "Enforced");
    assert_eq!(sb["no_new_privs"], true);
    assert_eq!(sb["dumpable"], false);
    assert_eq!(sb["caps_cleared"], true);
    let broker_uid = st["uid"].as_u64().unwrap();
    assert_ne!(broker_uid, 0, "the broker must drop root");
    assert_ne!(sb["uid"].as_u64().unwrap(), broker_uid, "signer and broker must differ");
    // The kernel agrees: read /proc for all three processes.
    let status_of = |pid: u64| std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |s: &str, f: &str| {
        s.lines().find(|l| l.starts_with(f)).unwrap().split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    };
    for pid in [st["signer"]["keeper_pid"].as_u64().unwrap(), st["signer"]["worker_pid"].as_u64().unwrap()] {
        let s = status_of(pid);
        assert_eq!(field(&s, "Seccomp:"), "2", "pid {pid}");
        assert_eq!(field(&s, "NoNewPrivs:"), "1");
        for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(&s, cap), "0000000000000000", "{cap} of {pid}");
        }
        assert_eq!(field(&s, "Uid:"), "65534 65534 65534 65534");
    }
    let bs = status_of(b.pid() as u64);
    assert_eq!(field(&bs, "CapEff:"), "0000000000000000");
    assert_eq!(field(&bs, "NoNewPrivs:"), "1");
    assert!(field(&bs, "Uid:").starts_with(&broker_uid.to_string()));
}

#[test]
fn broker_uid_cannot_ptrace_or_read_signer_memory() {
    if !require_root() {
        return;
    }
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), ..Default::default() });
    let st = b.status();
    let uid = st["uid"].as_u64().unwrap();
    let gid = st["gid"].as_u64().unwrap();
    for key in ["keeper_pid", "worker_pid"] {
        let pid = st["signer"][key].as_u64().unwrap();
        // As root we can read the target's maps to give the attacker a valid address.
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let addr = maps.lines().find(|l| l.split_whitespace().nth(1).unwrap().starts_with('r')).unwrap();
        let addr = addr.split('-').next().unwrap();
        let out = Command::new("setpriv")
            .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string(), "--clear-groups", "/usr/bin/python3"])
            .arg(repo().join("tests/helpers/attack_memory.py"))
            .args([&pid.to_string(), addr])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["uid"], uid);
        // The attack code works (on a process it may read)...
        assert_eq!(v["control"]["process_vm_readv"], "ok", "{v}");
        assert_eq!(v["control"]["proc_mem"], "ok", "{v}");
        // ...and fails against the signer.
        assert_eq!(v["target"]["ptrace_attach"], "EPERM", "{key}: {v}");
        assert_eq!(v["target"]["process_vm_readv"], "EPERM", "{key}: {v}");
        assert_eq!(v["target"]["proc_mem"], "EACCES", "{key}: {v}");
    }
}

fn cert_sign(b: &Broker, pubkey: &std::path::Path, principal: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "cert",
        "sign",
        "--socket",
        b.socket.to_str().unwrap(),
        "--public-key",
        pubkey.to_str().unwrap(),
        "--principal",
        principal,
    ];
    args.extend_from_slice(extra);
    ephyr(&args)
}

#[test]
fn sshd_accepts_a_certificate_from_the_running_signer_and_the_signer_enforces_its_limits() {
    if !require_root() {
        return;
    }
    ensure_user("ephyrtest");
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), ..Default::default() });
    let sshd = Sshd::start(&b.data_dir.join("keys/ca_key.pub"), "");
    let dir = TempDir::new("cert");
    let key = keygen(dir.path(), "id");
    let pubkey = dir.join("id.pub");

    let out = cert_sign(&b, &pubkey, "ephyrtest", &["--ttl", "2m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cert = dir.join("id-cert.pub");
    std::fs::write(&cert, stdout(&out)).unwrap();
    let ssh = sshd.ssh(&key, &cert, "ephyrtest", "echo hello; whoami");
    assert_eq!(stdout(&ssh), "hello\nephyrtest\n", "ssh failed: {}\nsshd: {}", stderr(&ssh), sshd.log());

    // ssh-keygen agrees on what was signed.
    let l = Command::new("ssh-keygen").args(["-L", "-f", cert.to_str().unwrap()]).output().unwrap();
    let listing = stdout(&l);
    assert!(listing.contains("Principals: \n                ephyrtest"), "{listing}");
    assert!(listing.contains("Type: ssh-ed25519-cert-v01@openssh.com user certificate"), "{listing}");

    // The same cert cannot log in as another user (not a listed principal).
    ensure_user("ephyrother");
    let other = sshd.ssh(&key, &cert, "ephyrother", "true");
    assert!(!other.status.success());

    // force-command is enforced by sshd.
    let out = cert_sign(&b, &pubkey, "ephyrtest", &["--force-command", "/usr/bin/id -un"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(&cert, stdout(&out)).unwrap();
    let forced = sshd.ssh(&key, &cert, "ephyrtest", "echo not-this");
    assert_eq!(stdout(&forced), "ephyrtest\n", "{}", stderr(&forced));

    // The signer itself refuses a principal outside its allow-list and a TTL over its cap.
    let out = cert_sign(&b, &pubkey, "root", &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("principal_not_allowed")
            && stderr(&out).contains("\"root\" is not on the signer's allow-list"),
        "{}",
        stderr(&out)
    );
    let out = cert_sign(&b, &pubkey, "ephyrtest", &["--ttl", "11m"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ttl_too_long") && stderr(&out).contains("cap of 600s"), "{}", stderr(&out));
    let out = cert_sign(&b, &pubkey, "ephyrtest", &["--ttl", "25h"]);
    assert!(stderr(&out).contains("ttl_too_long"), "{}", stderr(&out));
}

#[test]
fn a_killed_signer_worker_or_keeper_is_replaced_and_the_next_request_succeeds() {
    if !require_root() {
        return;
    }
    let b = Broker::start(BrokerOpts { policy: Some(POLICY), ..Default::default() });
    let dir = TempDir::new("restart");
    keygen(dir.path(), "id");
    let pubkey = dir.join("id.pub");
    let st = b.status();
    let worker = st["signer"]["worker_pid"].as_u64().unwrap() as i32;
    let keeper = st["signer"]["keeper_pid"].as_u64().unwrap() as i32;
    ephyr::os::kill(worker, libc::SIGKILL).unwrap();
    // kill() returns before the signal lands; a request written to a worker that is still dying
    // is (correctly) reported as lost. "The next request" is the one after the worker is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(worker as u32) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = cert_sign(&b, &pubkey, "ephyrtest", &[]);
    assert!(out.status.success(), "sign after worker kill: {}\n{}", stderr(&out), b.log());
    let st = b.status();
    assert_eq!(st["signer"]["restarts"], 1, "{st:#}");
    assert_ne!(st["signer"]["worker_pid"].as_u64().unwrap() as i32, worker);
    assert!(b.log().contains(&format!("signer worker {worker} ended")), "{}", b.log());

    // Killing the keeper (which takes its worker with it): the broker, now unprivileged, cannot
    // read the root-only CA key to start a new one — by design — so it stops with exit code 70
    // and says why; the service manager restarts it. (Unprivileged brokers relaunch: see
    // serve_as_a_normal_user_runs_as_that_user_and_says_so.)
    let mut b = b;
    ephyr::os::kill(keeper, libc::SIGKILL).unwrap();
    let status = b.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(70), "{}", b.log());
    assert!(b.log().contains("restart the ephyr service"), "{}", b.log());
    std::thread::sleep(Duration::from_millis(100));
    assert!(!alive(keeper as u32));
}

#[test]
fn sigterm_stops_the_broker_cleanly_with_no_orphans() {
    if !require_root() {
        return;
    }
    let mut b = Broker::start(BrokerOpts { policy: Some(POLICY), ..Default::default() });
    let st = b.status();
    let pids: Vec<u32> =
        ["keeper_pid", "worker_pid"].iter().map(|k| st["signer"][k].as_u64().unwrap() as u32).collect();
    // The event loop and signal delivery run on the executor's own thread: no async-io helper
    // thread, and no thread at all besides the blocking pool's (decision 0011).
    let threads: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{}/task", b.pid()))
        .unwrap()
        .map(|t| t.unwrap().path())
        .map(|p| {
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(p.join("comm")).unwrap())
        })
        .collect();
    let main = b.pid().to_string();
    let others: Vec<_> = threads.iter().filter(|(tid, n)| *tid != main && n.trim() != "ephyr-blocking").collect();
    assert!(others.is_empty(), "threads besides the executor's and the pool's: {threads:?}");
    b.signal(libc::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", b.log());
    std::thread::sleep(Duration::from_millis(100));
    for pid in pids {
        assert!(!alive(pid), "signer process {pid} outlived the broker");
    }
    assert!(b.log().contains("Term received: shutting down") && b.log().contains("stopped"), "{}", b.log());
    // Nothing answers on the local socket any more (the file itself may remain in a directory the
    // unprivileged broker cannot write; the next start removes a stale socket).
    assert!(std::os::unix::net::UnixStream::connect(&b.socket).is_err(), "socket still answers");
}

#[test]
fn serve_dev_needs_no_setup_and_prints_how_to_connect() {
    if !require_root() {
        return;
    }
    let mut b = Broker::start(BrokerOpts { dev: true, ..Default::default() });
    let log = b.log();
    assert!(log.contains("MCP endpoint:   http://") && log.contains("/mcp"), "{log}");
    assert!(log.contains("TrustedUserCAKeys") && log.contains("ssh-ed25519 "), "{log}");
    let health = Command::new("curl").args(["-sf", &format!("http://{}/healthz", b.api)]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["signer"]["sandbox_enforced"], true);
    let tmp = b.status()["data_dir"].as_str().unwrap().to_owned();
    assert!(std::path::Path::new(&tmp).exists());
    b.signal(libc::SIGINT);
    assert_eq!(b.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(!std::path::Path::new(&tmp).exists(), "temporary data dir not removed");
}

#[test]
fn serve_as_a_normal_user_runs_as_that_user_and_says_so() {
    if !require_root() {
        return;
    }
    ensure_user("ephyrdev");
    let u = ephyr::users::lookup("ephyrdev").unwrap();
    let dir = TempDir::new("unpriv");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = dir.join("data");
    let wrapper = vec![
        "setpriv".to_string(),
        format!("--reuid={}", u.uid),
        format!("--regid={}", u.gid),
        "--clear-groups".into(),
    ];
    let mut b = Broker::start(BrokerOpts { dev: true, wrapper, data_dir: Some(data.clone()), ..Default::default() });
    let st = b.status();
    assert_eq!(st["uid"].as_u64().unwrap(), u.uid as u64);
    assert_eq!(st["signer"]["sandbox"]["uid"].as_u64().unwrap(), u.uid as u64);
    assert_eq!(st["signer"]["sandbox"]["enforced"], true, "{st:#}");
    assert!(b.log().contains("running unprivileged as uid"), "{}", b.log());
    // Same uid, so a killed keeper can be relaunched (with the same keys) and signing goes on.
    let keeper = st["signer"]["keeper_pid"].as_u64().unwrap() as i32;
    ephyr::os::kill(keeper, libc::SIGKILL).unwrap();
    let key = keygen(dir.path(), "id");
    let _ = key;
    let out = ephyr(&[
        "cert",
        "sign",
        "--socket",
        b.socket.to_str().unwrap(),
        "--public-key",
        dir.join("id.pub").to_str().unwrap(),
        "--principal",
        "ephyr-read",
    ]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), b.log());
    let st2 = b.status();
    assert_ne!(st2["signer"]["keeper_pid"].as_u64().unwrap() as i32, keeper);
    assert_eq!(st2["signer"]["sandbox"]["enforced"], true);
    assert!(b.log().contains("signer keeper relaunched"), "{}", b.log());
    // --dev with --data-dir keeps its keys for the next run.
    let ca = st["signer"]["ca_public_key"].as_str().unwrap().to_owned();
    assert_eq!(st2["signer"]["ca_public_key"].as_str().unwrap(), ca);
    b.signal(libc::SIGTERM);
    assert_eq!(b.wait_exit(Duration::from_secs(15)).code(), Some(0));
    let wrapper = vec![
        "setpriv".to_string(),
        format!("--reuid={}", u.uid),
        format!("--regid={}", u.gid),
        "--clear-groups".into(),
    ];
    let b2 = Broker::start(BrokerOpts { dev: true, wrapper, data_dir: Some(data), ..Default::default() });
    assert_eq!(b2.status()["signer"]["ca_public_key"].as_str().unwrap(), ca);
}

#[test]
fn signer_refuses_to_serve_without_landlock_unless_explicitly_insecure() {
    if !require_root() {
        return;
    }
    let wrapper = vec!["python3".to_string(), repo().join("tests/helpers/hide_landlock.py").to_str().unwrap().into()];
    let mut b = Broker::start(BrokerOpts {
        policy: Some(POLICY),
        wrapper: wrapper.clone(),
        expect_ready: false,
        ..Default::default()
    });
    let status = b.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", b.log());
    assert!(b.log().contains("refusing to serve: the signer sandbox is not fully enforced"), "{}", b.log());
    assert!(b.log().contains("Landlock is not available"), "{}", b.log());

    let b = Broker::start(BrokerOpts {
        policy: Some(POLICY),
        wrapper,
        extra: vec!["--insecure-no-sandbox".into()],
        ..Default::default()
    });
    let st = b.status();
    assert_eq!(st["signer"]["sandbox"]["enforced"], false);
    assert_eq!(st["signer"]["sandbox"]["insecure_override"], true);
    assert_eq!(st["signer"]["sandbox"]["seccomp"], "Enforced", "the other layers still apply");
    assert!(b.log().contains("INSECURE"), "{}", b.log());
    let health = Command::new("curl").args(["-s", &format!("http://{}/healthz", b.api)]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["signer"]["sandbox_enforced"], false);
}

#[test]
fn the_units_capabilities_suffice_on_an_initialised_data_dir_and_a_missing_handover_is_named() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("unit-caps");
    let (data, etc) = (dir.join("data"), dir.join("etc"));
    let init = ephyr(&["init", "--data-dir", data.to_str().unwrap(), "--config-dir", etc.to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    let exposed = vec!["--listen".into(), "0.0.0.0:0".into(), "--dashboard-listen".into(), "0.0.0.0:0".into()];
    let b = Broker::start(BrokerOpts {
        policy: Some(POLICY),
        data_dir: Some(data.clone()),
        wrapper: as_the_unit(),
        extra: exposed.clone(),
        ..Default::default()
    });
    // The local CA was made after the drop, by the broker's user, in the tls/ init handed over.
    let st = b.status();
    assert!(st["tls"]["ca_fingerprint"].as_str().unwrap_or("").starts_with("SHA256:"), "{st}");
    let broker_uid = std::fs::metadata(data.join("state")).unwrap().uid();
    assert_ne!(broker_uid, 0);
    for f in ["tls", "tls/ca.pem", "tls/ca.key"] {
        assert_eq!(std::fs::metadata(data.join(f)).unwrap().uid(), broker_uid, "{f} is not the broker's");
    }
    b.signal(libc::SIGTERM);
    drop(b);
    // A directory left to root (a data dir not prepared by init) stops start-up with the reason.
    std::os::unix::fs::chown(data.join("audit"), Some(0), Some(0)).unwrap();
    let mut b = Broker::start(BrokerOpts {
        policy: Some(POLICY),
        data_dir: Some(data.clone()),
        wrapper: as_the_unit(),
        extra: exposed,
        expect_ready: false,
        ..Default::default()
    });
    assert_ne!(b.wait_exit(Duration::from_secs(20)).code(), Some(0), "{}", b.log());
    assert!(b.log().contains("audit: handing it to the broker's user"), "{}", b.log());
    assert!(b.log().contains("`ephyr init`"), "{}", b.log());
    assert_eq!(std::fs::metadata(data.join("audit")).unwrap().uid(), 0, "nothing changed");
}

#[test]
fn init_twice_keeps_the_ca_and_doctor_reports_bad_permissions() {
    let dir = TempDir::new("init");
    let data = dir.join("data");
    let etc = dir.join("etc");
    let args = ["init", "--data-dir", data.to_str().unwrap(), "--config-dir", etc.to_str().unwrap()];
    let first = ephyr(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    let line = stdout(&first);
    assert!(line.starts_with("ssh-ed25519 ") && line.ends_with(" ephyr-ca\n"), "{line:?}");
    let second = ephyr(&args);
    assert_eq!(stdout(&second), line, "the CA changed on a second init");
    assert!(stderr(&second).contains("kept"));
    let forced = ephyr(&[&args[..], &["--force-new-ca"]].concat());
    assert_ne!(stdout(&forced), line);
    assert!(stderr(&forced).contains("REPLACED") && stderr(&forced).contains("warning"), "{}", stderr(&forced));

    std::fs::set_permissions(data.join("keys/ca_key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let doc = ephyr(&[
        "doctor",
        "--json",
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        etc.join("policy.yaml").to_str().unwrap(),
    ]);
    assert_eq!(doc.status.code(), Some(1), "{}", stdout(&doc));
    let v: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    let ca = v["checks"].as_array().unwrap().iter().find(|c| c["check"] == "CA key").unwrap();
    assert_eq!(ca["status"], "fail");
    assert!(ca["detail"].as_str().unwrap().contains("must be 0600"), "{ca}");
    // The human table says the same.
    let table =
        ephyr(&["doctor", "--data-dir", data.to_str().unwrap(), "--config", etc.join("policy.yaml").to_str().unwrap()]);
    assert!(stdout(&table).contains("FAIL") && stdout(&table).contains("Problems found"), "{}", stdout(&table));
}

#[test]
fn malformed_truncated_and_oversized_frames_are_rejected_and_the_signer_lives_on() {
    if !require_root() {
        return;
    }
    let cfg = SignerConfig {
        max_cert_ttl_secs: 600,
        principals: ["ephyrtest".to_string()].into(),
        rate_limit: 100,
        rate_window_secs: 60,
        sealed: Default::default(),
    };
    let launch =
        Launch::new(None, false, Some(TargetIds { uid: 65534, gid: 65534 }), &cfg, false).with_exe(ephyr_bin());
    ephyr::broker::reactor::block_on(async {
        let mut keeper = launch.spawn(false).unwrap();
        let (status, control) = signer_client::wait_ready(&mut keeper).await.unwrap();
        assert!(status.sandbox.enforced, "{status:?}");
        control
            .write_with(|s| ephyr::os::send_packet(s.as_fd(), &ControlRequest::SpawnWorker.encode(1)))
            .await
            .unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let (pkt, fd) = control.read_with(|s| ephyr::os::recv_with_fd(s.as_fd(), &mut buf)).await.unwrap();
        assert!(matches!(ControlResponse::decode(&buf[..pkt.len]).unwrap().1, ControlResponse::Spawned { .. }));
        let worker = ephyr::broker::reactor::Io::new(fd.unwrap()).unwrap();
        let ask = async |frame: &[u8]| -> Response {
            worker.write_with(|s| ephyr::os::send_packet(s.as_fd(), frame)).await.unwrap();
            let mut buf = vec![0u8; MAX_FRAME];
            let pkt = worker.read_with(|s| ephyr::os::recv_packet(s.as_fd(), &mut buf)).await.unwrap();
            assert!(pkt.len > 0, "worker closed its socket");
            Response::decode(&buf[..pkt.len]).unwrap().1
        };
        let code = |r: Response| match r {
            Response::Error(e) => e.code,
            other => panic!("expected an error frame, got {other:?}"),
        };
        let good = Request::Status.encode(7);
        assert_eq!(code(ask(&good[..6]).await), ErrorCode::Malformed);
        assert_eq!(code(ask(&vec![0xff; MAX_FRAME + 100]).await), ErrorCode::TooLarge);
        let mut wrong_version = good.clone();
        wrong_version[0] = 9;
        assert_eq!(code(ask(&wrong_version).await), ErrorCode::UnsupportedVersion);
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"junk");
        assert_eq!(code(ask(&trailing).await), ErrorCode::Malformed);
        let mut cert = Request::SignUserCert(CertRequest {
            public_key: "ssh-ed25519 AAAA".into(),
            principals: vec!["ephyrtest".into()],
            key_id: "k".into(),
            valid_after: 0,
            valid_before: 1,
            force_command: None,
            source_address: None,
            extensions: vec![],
        })
        .encode(8);
        let keep = cert.len() - 3;
        cert.truncate(keep);
        assert_eq!(code(ask(&cert).await), ErrorCode::Malformed);
        // Still alive and answering.
        match ask(&Request::Status.encode(9)).await {
            Response::Status(s) => assert_eq!(s.limits.principals, vec!["ephyrtest".to_string()]),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn every_command_has_help_and_usage_errors_exit_2() {
    for cmd in [&["serve"][..], &["init"], &["doctor"], &["status"], &["cert", "sign"], &["cert"]] {
        let out = ephyr(&[cmd, &["--help"]].concat());
        assert!(out.status.success(), "{cmd:?} --help: {}", stderr(&out));
        assert!(stdout(&out).starts_with("Usage: ephyr"), "{cmd:?}: {}", stdout(&out));
    }
    let v = ephyr(&["--version"]);
    // `ephyr 0.1.0 (0123456789ab)`: the commit it was built from (or `unknown` without git).
    let text = stdout(&v);
    let commit = text
        .strip_prefix(&format!("ephyr {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(commit == "unknown" || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())), "{text:?}");
    for bad in [&["serve", "--bogus"][..], &["frobnicate"], &["serve", "--listen", "nope"], &["cert", "sign"]] {
        let out = ephyr(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("ephyr:"), "{bad:?}: {}", stderr(&out));
    }
    // Invalid configuration is exit 3 and names the problem.
    let dir = TempDir::new("badcfg");
    std::fs::write(dir.join("p.yaml"), "version: 1\ntargets:\n  a: {host: x, rolez: {}}\n").unwrap();
    let out = ephyr(&[
        "serve",
        "--config",
        dir.join("p.yaml").to_str().unwrap(),
        "--data-dir",
        dir.join("d").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown field `rolez`") && stderr(&out).contains("p.yaml:3:3: targets.a.rolez"),
        "{}",
        stderr(&out)
    );
}
