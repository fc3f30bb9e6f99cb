//! The first hour of a new user: what `serve --dev` tells them, where the CLI finds the broker,
//! and a CLI that forgives typos and pipes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Waits until the broker's stdout holds the whole dev banner.
fn banner(b: &Broker) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = b.log();
        if log.contains("Stop with Ctrl-C.") {
            return log;
        }
        assert!(Instant::now() < deadline, "no banner:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_dev_banner_says_how_to_get_a_first_exec_and_where_the_cli_looks() {
    if !require_root() {
        return;
    }
    let b = Broker::start(BrokerOpts { dev: true, ..Default::default() });
    let log = banner(&b);
    assert!(log.contains("ephyr demo "), "the demo is offered:\n{log}");
    assert!(log.contains("docs/target-setup.md"), "{log}");
    assert!(log.contains(&format!("export EPHYR_SOCKET={}", b.socket.display())), "{log}");
    assert!(log.contains("Policy:         built in (target localhost"), "{log}");

    // The printed MCP endpoint works as `exec --url` (with or without /mcp): the broker answers
    // with a tool result (the dev policy's host has no such users yet), not a 404.
    let url = log.lines().find_map(|l| l.trim().strip_prefix("MCP endpoint:")).unwrap().trim().to_owned();
    let key = log.lines().find_map(|l| l.trim().strip_prefix("API key:")).unwrap().split_whitespace().next().unwrap();
    for u in [url.clone(), url.trim_end_matches("/mcp").to_owned()] {
        let out = Command::new(ephyr_bin())
            .args(["exec", "localhost", "--role", "read", "--url", &u, "--", "true"])
            .env("EPHYR_TOKEN", key)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.starts_with("ephyr exec: "), "a tool result, not a transport error: {err}");
        assert!(!err.contains("404"), "{err}");
    }
}

#[test]
fn the_banner_is_printed_with_a_policy_file_too() {
    if !require_root() {
        return;
    }
    let policy = format!("version: 1\nagents: {{a: {{api_key_hash: \"{}\"}}}}\n", agent_key("a").1);
    let b = Broker::start(BrokerOpts { dev: true, policy: Some(&policy), ..Default::default() });
    let log = banner(&b);
    assert!(log.contains("Policy:         /"), "the file is named:\n{log}");
    assert!(log.contains("ephyr keygen agent NAME"), "no dev key: says where keys come from:\n{log}");
}

#[test]
fn the_shipped_unit_puts_the_socket_where_the_cli_looks() {
    let unit = std::fs::read_to_string(repo().join("image/systemd/ephyr.service")).unwrap();
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    let words: Vec<&str> = exec.split_whitespace().collect();
    let flag = |f: &str| words.iter().position(|w| *w == f).map(|i| words[i + 1]);
    let data_dir = flag("--data-dir").unwrap_or("/var/lib/ephyr");
    let socket = flag("--socket").map(std::path::PathBuf::from);
    let cli_default = ephyr::cli::client::socket_path(None, Some(std::path::Path::new(data_dir)));
    assert_eq!(socket.unwrap_or_else(|| std::path::Path::new(data_dir).join("ephyr.sock")), cli_default);
    // And the CLI's own default data dir is the unit's.
    assert_eq!(data_dir, ephyr::broker::datadir::DEFAULT_DATA_DIR);
}

#[test]
fn a_closed_pipe_ends_a_command_quietly_with_zero() {
    // The reader is gone before ephyr writes: the write fails with EPIPE.
    let out = Command::new("sh")
        .args(["-c", r#"{ sleep 0.3; "$0" --help; echo "exit=$?" >&2; } | true"#, ephyr_bin().to_str().unwrap()])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains("exit=0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_mistyped_command_gets_a_suggestion() {
    let out = ephyr(&["servee"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("did you mean `ephyr serve`?"), "{}", stderr(&out));
    let out = ephyr(&["dmeo"]);
    assert!(stderr(&out).contains("did you mean `ephyr demo`?"), "{}", stderr(&out));
    let out = ephyr(&["xyzzy-frobnicate"]);
    assert!(!stderr(&out).contains("did you mean"), "{}", stderr(&out));
}

/// The README's quick start, as written: every `cargo run --release -- ...` line in it is run
/// with the built binary. `serve --dev` is reached by a real MCP client (the Python `mcp` SDK)
/// with the key its banner prints; `demo` goes through every step.
#[test]
fn the_readme_quick_start_works_as_written() {
    if !require_root() {
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme.find("## Quick start").unwrap();
    let end = readme[start..].find("\n## Production").map_or(readme.len(), |e| start + e);
    let section = &readme[start..end];
    let commands: Vec<String> = section
        .lines()
        .filter_map(|l| l.trim().strip_prefix("cargo run --release -- "))
        .map(|l| l.split('#').next().unwrap().trim().to_owned())
        .collect();
    assert_eq!(commands, ["serve --dev", "demo", "demo --keep"], "the quick start this test follows");
    // The JSON configuration it shows parses and points at the MCP endpoint.
    let json_block = section.split("```json").nth(1).unwrap().split("```").next().unwrap();
    let cfg: serde_json::Value = serde_json::from_str(json_block).unwrap();
    assert_eq!(cfg["mcpServers"]["ephyr"]["url"], "http://127.0.0.1:8554/mcp");

    // 1. `serve --dev`, exactly (its default address is the README's).
    let mut serve = Command::new(ephyr_bin())
        .args(commands[0].split_whitespace())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(serve.stdout.take().unwrap());
    let mut banner = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !banner.contains("Stop with Ctrl-C.") {
        assert!(Instant::now() < deadline, "no banner: {banner}");
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
            panic!("serve --dev ended: {banner}");
        }
        banner.push_str(&line);
    }
    let url = banner.lines().find_map(|l| l.trim().strip_prefix("MCP endpoint:")).unwrap().trim().to_owned();
    assert_eq!(url, "http://127.0.0.1:8554/mcp");
    let key = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("API key:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let o = python("mcp_client.py").args([&url, &key]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(seen["list_targets"]["is_error"], false, "{seen}");
    assert!(seen["tools"].as_array().unwrap().iter().any(|t| t["name"] == "exec"), "{seen}");
    ephyr::os::kill(serve.id() as i32, 2).unwrap();
    assert!(serve.wait().unwrap().success(), "Ctrl-C stops it cleanly");

    // 2. `demo`, exactly: ten steps, each as expected, nothing left behind.
    let demo = Command::new(ephyr_bin()).args(commands[1].split_whitespace()).output().unwrap();
    let text = stdout(&demo);
    assert!(demo.status.success(), "{text}\n{}", stderr(&demo));
    assert_eq!(text.matches("✓ as expected").count(), 10, "{text}");
    assert!(text.contains("everything the demo started is stopped and removed"), "{text}");
}

#[test]
fn a_subcommands_help_shows_that_subcommand() {
    for (args, has, lacks) in [
        (&["policy", "check", "--help"][..], "ephyr policy check FILE", "ephyr policy explain"),
        (&["audit", "query", "--help"][..], "ephyr audit query", "ephyr audit verify"),
        (&["secret", "set", "--help"][..], "ephyr secret set NAME", "ephyr secret rm"),
    ] {
        let out = ephyr(args);
        assert!(out.status.success(), "{args:?}");
        let text = stdout(&out);
        assert!(text.contains(has) && !text.contains(lacks), "{args:?}: {text}");
    }
    assert!(stdout(&ephyr(&["init", "--help"])).contains("/var/lib/ephyr/keys/ca_key "), "init names its files");
}
