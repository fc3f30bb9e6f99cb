//! `ephyr isolate` in a network namespace the test creates: with the rules loaded an agent uid
//! (and an agent gid) reaches the broker's port but not a target's, the broker's own users and
//! root still reach both, loading twice is harmless, and removing the rules restores access.

mod common;

use std::process::{Child, Command, Stdio};

use common::*;

const AGENT: &str = "ephyrt-iso";

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns pids {0} | xargs -r kill -9; ip netns del {0}", self.0))
            .status();
    }
}

struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `Ok(())` if `uid:gid` (None: root) connects to 127.0.0.1:`port` inside `ns`, else the error.
fn connect(ns: &str, who: Option<(u32, u32)>, port: u16) -> Result<(), String> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]);
    if let Some((uid, gid)) = who {
        c.args(["setpriv", "--reuid", &uid.to_string(), "--regid", &gid.to_string(), "--clear-groups"]);
    }
    let out = c
        .args(["/usr/bin/python3", "-c", "import socket,sys\ntry:\n socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3)\n print('ok')\nexcept OSError as e:\n print(type(e).__name__, e)"])
        .arg(port.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if text == "ok" { Ok(()) } else { Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))) }
}

fn isolate(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip").args(["netns", "exec", ns]).arg(ephyr_bin()).arg("isolate").args(args).output().unwrap()
}

#[test]
fn agents_reach_the_broker_and_nothing_else_until_the_rules_are_removed() {
    if !require_root() {
        panic!("tests/isolate.rs needs root (a network namespace and nftables)");
    }
    ensure_user(AGENT);
    let agent = ephyr::users::lookup(AGENT).unwrap();
    let ns = Ns(format!("ephyr-iso-{}", std::process::id()));
    for c in [format!("ip netns add {}", ns.0), format!("ip -n {} link set lo up", ns.0)] {
        assert!(Command::new("sh").arg("-c").arg(&c).status().unwrap().success(), "{c}");
    }
    // Two listeners in the namespace: "the broker" and "a target's sshd".
    let (broker, target) = (free_port(), free_port());
    let server = "import socket,sys,threading\n\
                  def serve(p):\n s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n s.bind(('127.0.0.1', p)); s.listen(64)\n while True: s.accept()[0].close()\n\
                  for p in sys.argv[1:]: threading.Thread(target=serve, args=(int(p),), daemon=True).start()\n\
                  print('READY', flush=True); threading.Event().wait()";
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c", server, &broker.to_string(), &target.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "READY");
    let _server = Listener(child);
    let me = Some((agent.uid, agent.gid));
    let nobody = Some((65534, 65534));
    connect(&ns.0, me, target).expect("before the rules the agent reaches the target");

    // Bad input changes nothing.
    let out = isolate(&ns.0, &["--apply"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no agent to isolate"), "{}", stderr(&out));
    let out = isolate(&ns.0, &["--uid", "abc"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    connect(&ns.0, me, target).unwrap();

    let uid = agent.uid.to_string();
    let port = broker.to_string();
    for _ in 0..2 {
        let out = isolate(&ns.0, &["--uid", &uid, "--gid", "65534", "--port", &port, "--apply"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    connect(&ns.0, me, broker).expect("the agent reaches the broker");
    let e = connect(&ns.0, me, target).unwrap_err();
    assert!(e.contains("ConnectionRefusedError"), "refused at once, not a timeout: {e}");
    let e = connect(&ns.0, nobody, target).unwrap_err();
    assert!(e.contains("ConnectionRefused"), "an agent gid is isolated too: {e}");
    connect(&ns.0, None, target).expect("root (the broker starts as root) is not isolated");
    connect(&ns.0, Some((65533, 65533)), target).expect("another user is not isolated");
    // One table, listed by nft, and printed rules name the uids.
    let listed = Command::new("ip").args(["netns", "exec", &ns.0, "nft", "list", "tables"]).output().unwrap();
    assert_eq!(stdout(&listed).matches("ephyr_isolate").count(), 1, "{}", stdout(&listed));

    let out = isolate(&ns.0, &["--remove"]);
    assert!(out.status.success(), "{}", stderr(&out));
    connect(&ns.0, me, target).expect("removing the rules restores access");
    assert!(isolate(&ns.0, &["--remove"]).status.success(), "removing twice is not an error");
}
