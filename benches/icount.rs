//! Deterministic cost probes for the instruction-count gate (`scripts/perf/icount.py`, run by
//! `scripts/test.sh`): each runs one piece of the request path N times, so that callgrind's
//! instruction count for N runs minus the count for 0 runs is the cost of N. Pure code only:
//! no sockets, no clock reads in the measured loop, no threads.
//!
//! `cargo bench --bench icount -- OP N`, OP one of: token_verify, authorize, mcp_decode,
//! tools_call_path, approval_match, command_check.

use ephyr::broker::policy::approval::{Gated, requirement};
use ephyr::broker::policy::{Action, ActionKind, Policy, Principal, authorize};
use ephyr::command::{CommandPolicy, Parsed};
use ephyr::macaroon::{LOCATION, Macaroon, RootKey, attenuate};
use ephyr::mcp::jsonrpc::{self, Message};
use ephyr::mcp::server;
use ephyr::mcp::version::Version;
use std::hint::black_box;

const ROOT: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

/// A task token 3 delegations deep, as an agent would present it.
fn token() -> String {
    let start = RootKey::from_bytes(&[42u8; 32]).start(ROOT.as_bytes());
    let mut m = start.mint(
        LOCATION,
        &[&format!("task = {ROOT}"), "expires_before = 2030-01-01T00:00:00Z", "target IN [web,db]", "role IN [read]"],
    );
    for (i, child) in
        ["01BX5ZZKBKACTAV9WEVGEMMVRZ", "01BX5ZZKBKACTAV9WEVGEMMVS0", "01BX5ZZKBKACTAV9WEVGEMMVS1"].iter().enumerate()
    {
        m = attenuate(&m, &format!("task = {child}"));
        m = attenuate(&m, &format!("expires_before = 2029-0{}-01T00:00:00Z", 9 - i));
    }
    m.encode()
}

fn policy() -> Policy {
    let mut s = String::from("roles: {read: {principal: ephyr-read}, op: {principal: ephyr-op}}\ntargets:\n");
    for t in 0..50 {
        s += &format!("  host-{t:02}: {{host: 10.0.0.{}, allowed_roles: [read, op]}}\n", t + 1);
    }
    s += "  web: {host: 10.0.1.1, allowed_roles: [read, op]}\nagents:\n";
    for a in 0..20 {
        s += &format!(
            "  agent-{a:02}:\n    uid: {}\n    ssh:\n      'host-*': {{roles: [read]}}\n      web: {{roles: [read, op]}}\n",
            3000 + a
        );
    }
    // Approval rules of a homelab: every command as op on web, restarts anywhere, writes to any
    // service, deletes on any remote.
    s += "approvals:\n  rules:\n    op-on-web: {ssh: {targets: [web], roles: [op]}}\n\
          \x20   restarts: {ssh: {targets: ['*'], commands: ['systemctl *', 'reboot*', 'rm -rf *']}}\n\
          \x20   writes: {http: {services: ['*'], methods: [POST, PUT, DELETE]}}\n\
          \x20   deletes: {remote: {remotes: ['*'], tools: ['delete_*']}}\n";
    Policy::parse(&s, "icount").expect("valid policy")
}

const CALL: &str = r#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"exec","arguments":{"target":"web","role":"read","command":"uptime","timeout":10},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/clientInfo":{"name":"icount","version":"1"}}}}"#;

/// The pipeline the command-policy probe and bench check.
const TYPICAL_PIPELINE: &str = "journalctl -u nginx --since today | grep -i error | tail -n 50";

/// A target's command policy of a realistic size (the command table's, tests/data/).
fn command_policy() -> CommandPolicy {
    let file = serde_yaml_ng::from_str(include_str!("../tests/data/commands-policy.yaml")).unwrap();
    let p = CommandPolicy::compile(Some(&file), &[], &[]).unwrap().unwrap();
    assert!(Parsed::parse(TYPICAL_PIPELINE).and_then(|parsed| p.check(&parsed, TYPICAL_PIPELINE)).is_ok());
    p
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let (op, n) = match args.as_slice() {
        [op, n] => (op.as_str(), n.parse::<u64>().expect("N is a number")),
        _ => {
            eprintln!(
                "usage: icount OP N  (OP: token_verify, authorize, mcp_decode, tools_call_path, approval_match, command_check)"
            );
            std::process::exit(2);
        }
    };
    let start = RootKey::from_bytes(&[42u8; 32]).start(ROOT.as_bytes());
    let text = token();
    let p = policy();
    let env = start.verify_and_reduce(&Macaroon::decode(&text).unwrap()).unwrap().envelope;
    let principal = Principal { agent: "agent-07", token: Some(&env), delegators: &[] };
    let ssh = ActionKind::SshCommand { target: "web", role: "read", command: "uptime" };
    let declared = ["target", "role", "command", "session_id", "timeout"];
    assert!(authorize(&p, &principal, &Action::new(Some("exec"), ssh)).is_allow());
    let commands = command_policy();
    let mut sink = 0usize;
    for _ in 0..n {
        sink += match op {
            "token_verify" => {
                let m = Macaroon::decode(black_box(&text)).unwrap();
                start.verify_and_reduce(&m).unwrap().lineage.len()
            }
            "authorize" => {
                authorize(black_box(&p), &principal, &Action::new(Some("exec"), black_box(ssh))).is_allow() as usize
            }
            "mcp_decode" => match jsonrpc::decode(black_box(CALL.as_bytes())).unwrap() {
                Message::Request(r) => server::classify(&r.method, r.params, Version::V2026_07_28).is_ok() as usize,
                _ => 0,
            },
            "tools_call_path" => {
                // Decode, verify the token, authorize with the call's arguments, encode the result.
                let Message::Request(r) = jsonrpc::decode(black_box(CALL.as_bytes())).unwrap() else { unreachable!() };
                let args = r.params.get("arguments").and_then(|a| a.as_object()).cloned().unwrap_or_default();
                let m = Macaroon::decode(black_box(&text)).unwrap();
                let env = start.verify_and_reduce(&m).unwrap().envelope;
                let principal = Principal { agent: "agent-07", token: Some(&env), delegators: &[] };
                let allowed = authorize(&p, &principal, &Action::call("exec", ssh, &args, &declared)).is_allow();
                let who = server::ServerIdentity::new("ephyr", "0", "");
                // The result as 2025-06-18+ clients get it: text and the same data structured.
                let structured = serde_json::json!({ "stdout": "up 3 days\n", "exit_code": 0 });
                let text = serde_json::to_string_pretty(&structured).unwrap_or_default();
                let result = server::tool_result(Version::V2026_07_28, &who, text, !allowed, Some(structured));
                jsonrpc::encode_result(&r.id, &result).len()
            }
            "approval_match" => {
                // What every allowed SSH command pays when approval rules exist: none matches
                // this one, so every rule and every word start of the command is tried.
                let g =
                    Gated::Ssh { target: "web", role: "read", command: Some("uptime && df -h /srv/data | tail -n 3") };
                requirement(black_box(&p), "agent-07", black_box(&g)).is_some() as usize
            }
            "command_check" => {
                // The SSH command policy: parse a typical pipeline and check every simple command.
                let cmd = black_box(TYPICAL_PIPELINE);
                Parsed::parse(cmd).and_then(|parsed| commands.check(&parsed, cmd)).is_ok() as usize
            }
            other => {
                eprintln!("unknown OP {other}");
                std::process::exit(2);
            }
        };
    }
    black_box(sink);
}
