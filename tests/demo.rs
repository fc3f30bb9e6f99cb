//! `ephyr demo` end to end: a real OpenSSH sshd, the real broker and its MCP endpoint, as root
//! (commands run as the throwaway `ephyr-demo` account). Every step's outcome is asserted, and
//! so is the cleanup, after a normal end and after Ctrl-C.

mod common;

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The demo's steps must not run concurrently (one throwaway account name).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn demo_dirs() -> Vec<std::path::PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ephyr-demo-")))
        .collect()
}

#[test]
fn the_demo_walks_every_step_with_real_peers_and_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = demo_dirs();
    let started = Instant::now();
    let out = Command::new(ephyr_bin()).args(["demo", "--json"]).output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "demo failed:\n{}\n{}", stdout(&out), stderr(&out));
    let steps: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "tools_list",
            "exec",
            "session",
            "task_create",
            "proof_of_possession",
            "delegate",
            "envelope",
            "revoke",
            "krl",
            "audit"
        ]
    );
    for s in &steps {
        assert_eq!(s["ok"], true, "{s}");
    }
    let d = |name: &str| steps.iter().find(|s| s["name"] == name).unwrap()["detail"].clone();
    assert!(d("tools_list")["tools"].as_array().unwrap().iter().any(|t| t == "task_delegate"));
    assert_eq!(d("exec")["exit_code"], 0);
    assert!(d("exec")["stdout"].as_str().unwrap().starts_with("ephyr-demo\n"), "runs as the throwaway account");
    assert_eq!(d("session")["outputs"], serde_json::json!(["first", "second"]));
    assert_eq!(d("task_create")["holder_bound"], true);
    assert_eq!(d("proof_of_possession")["without_proof_status"], 401);
    assert_eq!(d("proof_of_possession")["with_proof_ok"], true);
    assert_eq!(d("delegate")["depth"], 1);
    assert_eq!(d("envelope")["lab_ok"], true);
    assert!(d("envelope")["reason"].as_str().unwrap().contains("token_denies_target"), "{}", d("envelope"));
    assert_eq!(d("revoke")["cascade_count"], 1);
    assert!(d("revoke")["child_reason"].as_str().unwrap().contains("revoked"));
    assert!(d("krl")["serials"].as_u64().unwrap() >= 1, "ssh-keygen -Q -l lists the revoked tree's certificate");
    assert_eq!(d("audit")["verified"], true);
    assert!(d("audit")["report"]["errors"].as_array().unwrap().is_empty());
    assert!(d("audit")["tree_events"].as_u64().unwrap() >= 5);
    // Nothing left: no temp dir, no account, no processes.
    assert_eq!(demo_dirs(), before, "the temp dir is removed");
    assert!(ephyr::users::lookup("ephyr-demo").is_none(), "the throwaway account is removed");
    eprintln!("demo took {took:?}");
}

#[test]
fn as_a_normal_user_the_demo_runs_commands_as_that_user() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let user = "ephyrt-demo-user";
    ensure_user(user);
    // A copy the user can execute wherever the build tree lives.
    let dir = TempDir::new("demo-user");
    let bin = dir.join("ephyr");
    std::fs::copy(ephyr_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = format!("HOME=/home/{user}");
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups", "env", &home])
        .arg(&bin)
        .args(["demo", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let steps: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 10);
    assert!(steps.iter().all(|s| s["ok"] == true));
    let exec = &steps[1]["detail"];
    assert!(exec["stdout"].as_str().unwrap().starts_with(&format!("{user}\n")), "{exec}");
    assert!(ephyr::users::lookup("ephyr-demo").is_none(), "no account is made for a normal user");
}

#[test]
fn ctrl_c_stops_everything_the_demo_started_and_removes_it() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(ephyr_bin())
        .args(["demo", "--step"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&seen).contains("[Enter for the next step]") {
        let mut buf = [0u8; 512];
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0 && Instant::now() < deadline, "no pause: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    let dir = text.lines().find_map(|l| l.trim().strip_prefix("Everything lives in ")).unwrap();
    let dir = std::path::PathBuf::from(dir.split(' ').next().unwrap());
    let port: u16 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("sshd (throwaway, loopback):"))
        .and_then(|l| l.trim().split(',').next()?.rsplit(':').next()?.parse().ok())
        .unwrap();
    assert!(dir.exists());
    assert!(ephyr::users::lookup("ephyr-demo").is_some());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "sshd is up while paused");
    // Only the demo gets the signal (a terminal would signal the whole group).
    ephyr::os::kill(child.id() as i32, 2).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("interrupted"), "{err}");
    assert!(!dir.exists(), "temp dir removed");
    assert!(ephyr::users::lookup("ephyr-demo").is_none(), "account removed");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "sshd stopped");
}

#[test]
fn without_sshd_the_demo_says_what_to_install_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = demo_dirs();
    // sshd hidden in a private mount namespace (/dev/null over it): not a file any more.
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount --bind /dev/null /usr/sbin/sshd && exec \"$0\" demo",
            ephyr_bin().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("/usr/sbin/sshd is not installed") && err.contains("apt install openssh-server"), "{err}");
    assert_eq!(demo_dirs(), before);
}

#[test]
fn demo_help_and_usage_errors() {
    let out = ephyr(&["demo", "--help"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("throwaway"), "{}", stdout(&out));
    let out = ephyr(&["demo", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The first hour's goal: from nothing to a scoped SSH command run by a real MCP client (the
/// Python `mcp` SDK). `ephyr demo --keep` leaves its lab up with an agent key; the client runs
/// `id -un` on target `lab`; Ctrl-C removes everything and exits 0.
#[test]
fn a_real_mcp_client_runs_a_scoped_command_on_the_kept_lab() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = demo_dirs();
    let started = Instant::now();
    let mut child = Command::new(ephyr_bin())
        .args(["demo", "--keep", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = loop {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "demo ended before it was ready");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["step"] == "ready" {
            break v;
        }
        assert_eq!(v["ok"], true, "{v}");
    };
    let (url, key) = (ready["mcp"].as_str().unwrap(), ready["api_key"].as_str().unwrap());
    let o = python("mcp_exec.py").args([url, key, "lab", "shell", "id -un"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["is_error"], false, "{r}");
    let result: Value = serde_json::from_str(r["text"].as_str().unwrap()).unwrap();
    assert_eq!(result["stdout"], "ephyr-demo\n", "{r}");
    assert_eq!(r["structured"]["exit_code"], 0, "structuredContent carries the same result: {r}");
    assert_eq!(r["structured"]["stdout"], "ephyr-demo\n", "{r}");
    eprintln!("from nothing to a command run by a real MCP client: {:?}", started.elapsed());
    // Every kind of tool, with the SDK checking each structuredContent against its outputSchema.
    let o = python("mcp_tour.py").args([url, key, "lab", "shell"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tour: Value = serde_json::from_slice(&o.stdout).unwrap();
    for tool in [
        "list_targets",
        "exec",
        "session_create",
        "session_close",
        "list_sessions",
        "list_certs",
        "task_create",
        "task_delegate",
        "task_info",
        "task_list",
        "task_revoke",
    ] {
        assert!(tour["schemas"][tool].is_object(), "{tool} declares an outputSchema: {tour}");
        assert!(tour["structured"][tool].is_object(), "{tool} returned structuredContent: {tour}");
    }
    assert_eq!(tour["structured"]["exec"]["stdout"], "structured\n");
    assert_eq!(tour["structured"]["task_revoke"]["cascade_count"], 1);
    assert!(tour["structured"]["list_targets"]["targets"].as_array().unwrap().len() >= 2);
    assert!(started.elapsed() < Duration::from_secs(120));
    ephyr::os::kill(child.id() as i32, 2).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C is the normal end of --keep");
    assert!(ephyr::users::lookup("ephyr-demo").is_none());
    assert_eq!(demo_dirs(), before, "the temp dir is removed");
}
