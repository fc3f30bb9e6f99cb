//! The file tools (`file_read`, `file_write`, `file_list`) over SFTP against a real OpenSSH sshd
//! (`/usr/lib/openssh/sftp-server`): confinement by the target's `files:` rules and by a task
//! token's `arg.path prefix`, both on the path the target resolved (`..` refused as spelled,
//! symbolic links followed by the target), atomic writes with an expected content hash, size
//! caps, and the audit trail. The same lab checks the policy's output cap and session lifetime.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use common::*;
use serde_json::{Value, json};

const USER: &str = "ephyrt-files";

struct Lab {
    /// The tree on the target: `www/` (read and write), `logs/` (read), `secret/` (neither).
    base: PathBuf,
    _sshd: Sshd,
    broker: Broker,
    alice: String,
    _dirs: (TempDir, TempDir),
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn lab() -> Lab {
    if !require_root() {
        panic!("tests/ssh_files.rs needs root (a user for sshd)");
    }
    ensure_user(USER);
    let data = TempDir::new("files-data");
    let conf = TempDir::new("files-conf");
    let out =
        ephyr(&["init", "--data-dir", data.path().to_str().unwrap(), "--config-dir", conf.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sshd = Sshd::start(
        &data.join("keys/ca_key.pub"),
        "Subsystem sftp /usr/lib/openssh/sftp-server\nListenAddress 127.0.0.2\nListenAddress 127.0.0.3\nMaxStartups 100\n",
    );
    let fp = ssh_fingerprint(&sshd.dir.join("host_ed25519.pub"));
    let base = PathBuf::from(format!("/tmp/ephyr-files-{}-{}", std::process::id(), sshd.port));
    let uid = ephyr::users::lookup(USER).unwrap().uid;
    for d in ["", "www", "www/sub", "logs", "secret"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
        std::os::unix::fs::chown(base.join(d), Some(uid), None).unwrap();
    }
    let put = |p: &str, content: &str, mode: u32| {
        std::fs::write(base.join(p), content).unwrap();
        std::fs::set_permissions(base.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(base.join(p), Some(uid), None).unwrap();
    };
    put("www/index.html", "<h1>hello</h1>\n", 0o640);
    put("logs/app.log", &"line\n".repeat(30_000), 0o644);
    put("secret/key", "PRIVATE KEY MATERIAL\n", 0o600);
    // Links the target follows: out of www into secret, and from www/sub back into www.
    std::os::unix::fs::symlink(base.join("secret/key"), base.join("www/escape")).unwrap();
    std::os::unix::fs::symlink("../secret", base.join("www/secretdir")).unwrap();
    std::os::unix::fs::symlink(base.join("www/index.html"), base.join("www/sub/up")).unwrap();
    // Readable by root only: the target's own permissions still apply.
    std::fs::write(base.join("www/root-only"), "x").unwrap();
    std::fs::set_permissions(base.join("www/root-only"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (alice, alice_hash) = agent_key("alice");
    let (port, b) = (sshd.port, base.display());
    let policy = format!(
        r#"version: 1
limits: {{ file_max_size: 64KiB, output_max: 4KiB, session_max: 10s }}
roles:
  op: {{ principal: {USER} }}
targets:
  web:
    host: 127.0.0.1
    port: {port}
    allowed_roles: [op]
    host_key_fingerprint: "{fp}"
    commands: {{ allow: ["uptime"] }}
    files: {{ read: ["{b}/logs/*"], write: ["{b}/www/*"] }}
  locked:
    host: 127.0.0.2
    port: {port}
    allowed_roles: [op]
    host_key_fingerprint: "{fp}"
    commands: {{ allow: ["uptime"] }}
  open: {{ host: 127.0.0.3, port: {port}, allowed_roles: [op], host_key_fingerprint: "{fp}" }}
agents:
  alice:
    api_key_hash: "{alice_hash}"
    ssh:
      "*": {{ roles: [op] }}
    can_delegate: true
"#
    );
    let broker = Broker::start(BrokerOpts {
        policy: Some(&policy),
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    });
    Lab { base, _sshd: sshd, broker, alice, _dirs: (data, conf) }
}

impl Lab {
    fn p(&self, rel: &str) -> String {
        self.base.join(rel).display().to_string()
    }

    fn call(&self, cred: &str, tool: &str, target: &str, args: Value) -> Result<Value, String> {
        let mut a = json!({"target": target, "role": "op"});
        a.as_object_mut().unwrap().extend(args.as_object().unwrap().clone());
        tool_call(&self.broker.api, cred, tool, a)
    }

    fn read(&self, cred: &str, target: &str, rel: &str) -> Result<Value, String> {
        self.call(cred, "file_read", target, json!({"path": self.p(rel)}))
    }

    fn write(&self, target: &str, rel: &str, content: &str, extra: Value) -> Result<Value, String> {
        let mut a = json!({"path": self.p(rel), "content": content});
        a.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        self.call(&self.alice, "file_write", target, a)
    }
}

fn sha256_hex(data: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".ephyr-"))
        .collect()
}

/// Reads and listings within `files:`, and every way out of it refused: `..` as spelled, links
/// the target resolves outside, paths the rules do not name, the target's own permissions.
#[test]
fn reads_and_listings_are_confined_to_the_resolved_path() {
    let l = lab();
    let r = l.read(&l.alice, "web", "www/index.html").unwrap();
    assert_eq!(r["content"], "<h1>hello</h1>\n");
    assert_eq!(r["encoding"], "utf8");
    assert_eq!(r["size"], 15);
    assert_eq!(r["complete"], true);
    assert_eq!(r["sha256"], sha256_hex(b"<h1>hello</h1>\n"));
    assert_eq!(r["resolved_path"], l.p("www/index.html"));
    // A link inside www to a file inside www: allowed, and the resolved path is reported.
    let r = l.read(&l.alice, "web", "www/sub/up").unwrap();
    assert_eq!(
        (r["resolved_path"].as_str().unwrap(), r["content"].as_str().unwrap()),
        (l.p("www/index.html").as_str(), "<h1>hello</h1>\n")
    );
    // logs/ is readable; it is larger than file_max_size: the first 64 KiB, no hash.
    let r = l.read(&l.alice, "web", "logs/app.log").unwrap();
    assert_eq!(
        (r["size"].as_u64(), r["bytes"].as_u64(), r["complete"].as_bool()),
        (Some(150_000), Some(65_536), Some(false))
    );
    assert!(r["sha256"].is_null(), "{r}");
    let r = l.call(&l.alice, "file_read", "web", json!({"path": l.p("logs/app.log"), "offset": 149_990})).unwrap();
    assert_eq!((r["bytes"].as_u64(), r["complete"].as_bool()), (Some(10), Some(true)));

    // `..` as spelled: refused before anything is connected.
    let e = l
        .call(&l.alice, "file_read", "web", json!({"path": format!("{}/www/../secret/key", l.base.display())}))
        .unwrap_err();
    assert!(e.contains("must be normalised"), "{e}");
    // Links that the target resolves outside www: the resolved path is what is refused.
    for via in ["www/escape", "www/secretdir/key"] {
        let e = l.read(&l.alice, "web", via).unwrap_err();
        assert!(e.contains("file_denied") && e.contains(&l.p("secret/key")), "{via}: {e}");
        assert!(!e.contains("PRIVATE KEY"), "{e}");
    }
    let e = l.read(&l.alice, "web", "secret/key").unwrap_err();
    assert!(e.contains("file_denied") && e.contains("files.read allows"), "{e}");
    let e = l.call(&l.alice, "file_list", "web", json!({"path": l.p("secret")})).unwrap_err();
    assert!(e.contains("file_denied"), "{e}");
    // The target's permissions still apply to the role's user.
    let e = l.read(&l.alice, "web", "www/root-only").unwrap_err();
    assert!(e.contains("permission denied on the target"), "{e}");
    let e = l.read(&l.alice, "web", "www/nothing-here").unwrap_err();
    assert!(e.contains("no such file"), "{e}");
    let e = l.call(&l.alice, "file_read", "web", json!({"path": l.p("www")})).unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");

    let list = l.call(&l.alice, "file_list", "web", json!({"path": l.p("www")})).unwrap();
    let names: Vec<(&str, &str)> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("escape", "symlink"),
            ("index.html", "file"),
            ("root-only", "file"),
            ("secretdir", "symlink"),
            ("sub", "dir")
        ]
    );
    assert_eq!(list["entries"][1]["mode"], "0640");
    assert_eq!(list["truncated"], false);

    // A target that restricts commands and says nothing about files has no file tools.
    let e = l.read(&l.alice, "locked", "www/index.html").unwrap_err();
    assert!(e.contains("file_denied") && e.contains("no `files:` section"), "{e}");
    // One that restricts nothing: the role's user reaches what it can.
    assert_eq!(l.read(&l.alice, "open", "secret/key").unwrap()["content"], "PRIVATE KEY MATERIAL\n");

    // Every operation that ran is in the audit trail with the path the target resolved.
    let seen = audit_events(&l.broker, "ssh_file");
    assert!(
        seen.iter()
            .any(|e| e["action"]["path"] == l.p("www/sub/up") && e["action"]["resolved"] == l.p("www/index.html")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|e| e["action"]["resolved"] == l.p("secret/key") && e["action"]["target"] == "web"),
        "a refused read is not recorded as run"
    );
}

/// A task token's `arg.path prefix` holds on the resolved path too: a link inside the prefix that
/// points out of it is refused, though `files:` would allow where it points.
#[test]
fn a_task_tokens_path_prefix_applies_to_the_resolved_path() {
    let l = lab();
    let t = tool_call(&l.broker.api, &l.alice, "task_create", json!({"description": "edit sub"})).unwrap();
    let m = ephyr::macaroon::Macaroon::decode(t["token"].as_str().unwrap()).unwrap();
    let narrowed = ephyr::macaroon::attenuate(&m, &format!("arg.path prefix {}", l.p("www/sub"))).encode();
    let e = l.read(&narrowed, "web", "www/index.html").unwrap_err();
    assert!(e.contains("argument_constraint"), "{e}");
    let e = l.read(&narrowed, "web", "www/sub/up").unwrap_err();
    assert!(e.contains("argument_constraint") && e.contains("path"), "{e}");
    std::fs::write(l.base.join("www/sub/notes.txt"), "n").unwrap();
    assert_eq!(l.read(&narrowed, "web", "www/sub/notes.txt").unwrap()["content"], "n");
    // Listed only where they could work: a token narrowed to `locked` (no `files:`) does not see them.
    let tools = |cred: &str| -> Vec<String> {
        let v = mcp_request(&l.broker.api, cred, "tools/list", None, json!({}));
        v["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
    };
    assert!(tools(&l.alice).iter().any(|t| t == "file_write"));
    let locked = ephyr::macaroon::attenuate(&m, "target IN [locked]").encode();
    let seen = tools(&locked);
    assert!(seen.iter().any(|t| t == "exec") && !seen.iter().any(|t| t.starts_with("file_")), "{seen:?}");
    // The token's constraint reaches no command: exec has no path to check, so it is refused.
    let e = tool_call(&l.broker.api, &narrowed, "exec", json!({"target": "web", "role": "op", "command": "uptime"}))
        .unwrap_err();
    assert!(e.contains("argument_constraint"), "{e}");
}

/// Writes replace the file in one rename (mode kept, no temporary left), honour the expected
/// hash, stay inside `files.write`, refuse writes through links that lead out, and respect the cap.
#[test]
fn writes_are_atomic_checked_and_confined() {
    let l = lab();
    let index = l.base.join("www/index.html");
    let old = std::fs::read(&index).unwrap();
    // A stale hash: refused, the file untouched, nothing left behind.
    let e = l.write("web", "www/index.html", "new", json!({"expected_sha256": "00".repeat(32)})).unwrap_err();
    assert!(e.contains("changed: its SHA-256 is") && e.contains(&sha256_hex(&old)), "{e}");
    assert_eq!(std::fs::read(&index).unwrap(), old);
    let e = l.write("web", "www/index.html", "new", json!({"expected_sha256": "absent"})).unwrap_err();
    assert!(e.contains("exists"), "{e}");
    // The right hash: replaced, a new inode (rename), the mode kept.
    let ino = std::fs::metadata(&index).unwrap().ino();
    let w = l.write("web", "www/index.html", "<h1>new</h1>\n", json!({"expected_sha256": sha256_hex(&old)})).unwrap();
    assert_eq!(
        (w["created"].as_bool(), w["mode"].as_str(), w["bytes"].as_u64()),
        (Some(false), Some("0640"), Some(13))
    );
    assert_eq!(w["sha256"], sha256_hex(b"<h1>new</h1>\n"));
    assert_eq!(std::fs::read_to_string(&index).unwrap(), "<h1>new</h1>\n");
    let meta = std::fs::metadata(&index).unwrap();
    assert_ne!(meta.ino(), ino, "replaced by a rename, not rewritten in place");
    assert_eq!(meta.mode() & 0o777, 0o640);
    // A new file, binary content, a mode of its own.
    let w = l
        .write(
            "web",
            "www/blob.bin",
            &data_encoding::BASE64.encode(&[0, 159, 146, 150]),
            json!({"encoding": "base64", "mode": "0600", "expected_sha256": "absent"}),
        )
        .unwrap();
    assert_eq!(w["created"], true);
    assert_eq!(std::fs::read(l.base.join("www/blob.bin")).unwrap(), [0, 159, 146, 150]);
    assert_eq!(std::fs::metadata(l.base.join("www/blob.bin")).unwrap().mode() & 0o777, 0o600);
    let r = l.read(&l.alice, "web", "www/blob.bin").unwrap();
    assert_eq!((r["encoding"].as_str(), r["content"].as_str()), (Some("base64"), Some("AJ+Slg==")));
    assert!(leftovers(&l.base.join("www")).is_empty(), "{:?}", leftovers(&l.base.join("www")));

    // Out of bounds: read-only logs, a link out of www, a directory not named.
    let log = std::fs::read(l.base.join("logs/app.log")).unwrap();
    let e = l.write("web", "logs/app.log", "x", json!({})).unwrap_err();
    assert!(e.contains("file_denied") && e.contains("files.write allows"), "{e}");
    assert_eq!(std::fs::read(l.base.join("logs/app.log")).unwrap(), log);
    let e = l.write("web", "www/escape", "pwned", json!({})).unwrap_err();
    assert!(e.contains("file_denied") && e.contains(&l.p("secret/key")), "{e}");
    let e = l.write("web", "www/secretdir/new", "pwned", json!({})).unwrap_err();
    assert!(e.contains("file_denied") && e.contains(&l.p("secret/new")), "{e}");
    assert_eq!(std::fs::read_to_string(l.base.join("secret/key")).unwrap(), "PRIVATE KEY MATERIAL\n");
    assert!(!l.base.join("secret/new").exists());
    assert!(leftovers(&l.base.join("secret")).is_empty());

    // Bad input: named, nothing written.
    let big = "x".repeat(64 * 1024 + 1);
    let e = l.write("web", "www/big", &big, json!({})).unwrap_err();
    assert!(e.contains("file_max_size"), "{e}");
    for (extra, why) in [
        (json!({"encoding": "base64", "content": "not base64!"}), "not base64"),
        (json!({"expected_sha256": "abc"}), "64 hex digits"),
        (json!({"mode": "4755"}), "octal permission bits"),
    ] {
        let e = l.write("web", "www/bad", "x", extra).unwrap_err();
        assert!(e.contains(why), "{why}: {e}");
    }
    assert!(!l.base.join("www/big").exists() && !l.base.join("www/bad").exists());
    let e = l.write("web", "www/sub", "x", json!({})).unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");

    let writes = audit_events(&l.broker, "ssh_file").into_iter().filter(|e| e["action"]["op"] == "file_write").count();
    assert!(writes >= 3, "{writes}");
    assert!(metric(&l.broker, "ephyr_ssh_files_total{op=\"file_write\",outcome=\"ok\"}") >= 2.0);
}

/// `limits.output_max` caps what a command returns (and what is recorded); `limits.session_max`
/// ends a session that is still in use.
#[test]
fn the_policys_output_cap_and_session_lifetime_apply() {
    let l = lab();
    let exec = |args: Value| tool_call(&l.broker.api, &l.alice, "exec", args);
    let r = exec(json!({"target": "open", "role": "op", "command": "head -c 10000 /dev/zero | tr '\\0' x"})).unwrap();
    assert_eq!((r["stdout"].as_str().map(str::len), r["stdout_truncated"].as_bool()), (Some(4096), Some(true)), "{r}");
    assert!(r["stderr"].as_str().unwrap().contains("4096-byte cap (limits.output_max)"), "{r}");
    let s = tool_call(&l.broker.api, &l.alice, "session_create", json!({"target": "open", "role": "op"})).unwrap();
    assert_eq!(s["max_lifetime_secs"], 10, "{s}");
    let sid = s["session_id"].as_str().unwrap().to_owned();
    assert_eq!(exec(json!({"session_id": sid, "command": "echo alive"})).unwrap()["stdout"], "alive\n");
    std::thread::sleep(std::time::Duration::from_millis(10_500));
    let e = exec(json!({"session_id": sid, "command": "echo alive"})).unwrap_err();
    assert!(e.contains("limits.session_max") || e.contains("no session"), "{e}");
    let closes = audit_events(&l.broker, "session_close");
    assert!(closes.iter().any(|c| c["outcome"]["reason"] == "limits.session_max reached"), "{closes:?}");
}
