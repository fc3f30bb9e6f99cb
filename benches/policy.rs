//! Policy costs: `authorize` per action kind, loading a large policy (50 agents, 200 targets), and
//! the SSH command policy (parse + check).
//! Run: `cargo bench --bench policy`.

use divan::Bencher;
use ephyr::broker::policy::{Action, ActionKind, DashboardLevel, Policy, Principal, TaskOp, authorize};
use ephyr::macaroon::reduce;

fn main() {
    divan::main();
}

/// 50 agents, 200 targets, 20 services, 10 remotes, 5 templates. Each agent has a few exact SSH
/// grants, a pattern grant, inherits a template, and grants on services and remotes.
fn big_policy_text() -> String {
    let mut s = String::from("version: 1\nroles:\n");
    for r in ["read", "op", "admin"] {
        s += &format!("  {r}: {{principal: agent-{r}}}\n");
    }
    s += "targets:\n";
    for t in 0..200 {
        s += &format!("  host-{t:03}: {{host: 10.0.{}.{}, allowed_roles: [read, op, admin]}}\n", t / 250, t % 250 + 1);
    }
    s += "services:\n";
    for i in 0..20 {
        s += &format!(
            "  svc-{i}: {{url: 'https://api{i}.example.com/v1', methods: [GET, POST], paths: ['/chat/*', '/models']}}\n"
        );
    }
    s += "remotes:\n";
    for i in 0..10 {
        s += &format!(
            "  rem-{i}: {{url: 'http://10.1.0.{}:3001/mcp', tools: [read_file, write_file, list_directory]}}\n",
            i + 1
        );
    }
    s += "templates:\n";
    for i in 0..5 {
        s += &format!(
            "  t{i}: {{ssh: {{'host-1*': {{roles: [read]}}}}, services: {{'svc-*': {{methods: [GET]}}}}, dashboard: viewer}}\n"
        );
    }
    s += "agents:\n";
    for a in 0..50 {
        s += &format!(
            "  agent-{a:02}:\n    uid: {}\n    inherits: [t{}]\n    can_delegate: true\n    ssh:\n",
            2000 + a,
            a % 5
        );
        for k in 0..4 {
            s += &format!("      host-{:03}: {{roles: [read, op]}}\n", (a * 4 + k) % 200);
        }
        s += "      'host-0*': {roles: [read]}\n";
        s += &format!("    services:\n      svc-{}: {{methods: [POST], paths: ['/chat/*']}}\n", a % 20);
        s +=
            &format!("    remotes:\n      rem-{}: {{tools: [read_file], args: {{path: {{prefix: /data}}}}}}\n", a % 10);
    }
    s
}

fn big() -> Policy {
    Policy::parse(&big_policy_text(), "bench").unwrap()
}

#[divan::bench]
fn load_50_agents_200_targets(b: Bencher) {
    let text = big_policy_text();
    b.bench_local(|| Policy::parse(divan::black_box(&text), "bench").unwrap());
}

fn bench_action(b: Bencher, agent: &str, token: Option<&ephyr::macaroon::Envelope>, action: Action<'_>) {
    let p = big();
    assert!(
        authorize(&p, &Principal { agent, token, delegators: &[] }, &action).is_allow(),
        "bench action must be allowed"
    );
    b.bench_local(|| {
        authorize(divan::black_box(&p), &Principal { agent, token, delegators: &[] }, divan::black_box(&action))
    });
}

#[divan::bench]
fn authorize_ssh_exact_grant(b: Bencher) {
    bench_action(b, "agent-37", None, Action::new(Some("exec"), ActionKind::Ssh { target: "host-149", role: "op" }));
}

#[divan::bench]
fn authorize_ssh_via_template_pattern(b: Bencher) {
    bench_action(b, "agent-37", None, Action::new(Some("exec"), ActionKind::Ssh { target: "host-177", role: "read" }));
}

#[divan::bench]
fn authorize_ssh_with_token(b: Bencher) {
    let env = reduce(["target IN [host-149,host-150]", "role IN [op]", "tool IN [exec]"].iter().map(|c| c.as_bytes()))
        .unwrap()
        .envelope;
    bench_action(
        b,
        "agent-37",
        Some(&env),
        Action::new(Some("exec"), ActionKind::Ssh { target: "host-149", role: "op" }),
    );
}

#[divan::bench]
fn authorize_http(b: Bencher) {
    bench_action(
        b,
        "agent-13",
        None,
        Action::new(
            Some("http_request"),
            ActionKind::Http { service: "svc-13", method: "POST", path: "/chat/completions" },
        ),
    );
}

#[divan::bench]
fn authorize_remote_tool_with_argument_constraint(b: Bencher) {
    let mut args = serde_json::Map::new();
    args.insert("path".into(), serde_json::json!("/data/reports/q3.csv"));
    let declared = ["path"];
    bench_action(
        b,
        "agent-13",
        None,
        Action::call(
            "rem-3.read_file",
            ActionKind::RemoteTool { remote: "rem-3", tool: "read_file" },
            &args,
            &declared,
        ),
    );
}

#[divan::bench]
fn authorize_task_delegate(b: Bencher) {
    bench_action(
        b,
        "agent-13",
        None,
        Action::new(
            Some("task_delegate"),
            ActionKind::Task(TaskOp::Delegate {
                ttl: std::time::Duration::from_secs(600),
                child_depth: 1,
                parent_depth: 0,
            }),
        ),
    );
}

#[divan::bench]
fn authorize_dashboard(b: Bencher) {
    bench_action(b, "agent-13", None, Action::new(None, ActionKind::Dashboard(DashboardLevel::Viewer)));
}

#[divan::bench]
fn authorize_deny_unknown_target(b: Bencher) {
    let p = big();
    let action = Action::new(Some("exec"), ActionKind::Ssh { target: "host-999", role: "op" });
    b.bench_local(|| {
        authorize(
            divan::black_box(&p),
            &Principal { agent: "agent-37", token: None, delegators: &[] },
            divan::black_box(&action),
        )
    });
}

/// The SSH command policy: parse a command and check every simple command against the command
/// table's policy (tests/data/commands-policy.yaml). Budget: 50 µs for a typical pipeline.
#[divan::bench(args = [
    "id",
    "journalctl -u nginx --since today | grep -i error | tail -n 50",
    "ls -la /etc && cat /etc/nginx/nginx.conf; echo 'done' 2>&1",
    "ls /etc && sh -c 'rm -rf /'",
])]
fn command_parse_and_check(b: Bencher, cmd: &str) {
    use ephyr::command::{CommandPolicy, Parsed};
    let file = serde_yaml_ng::from_str(include_str!("../tests/data/commands-policy.yaml")).unwrap();
    let p = CommandPolicy::compile(Some(&file), &[], &[]).unwrap().unwrap();
    b.bench_local(|| Parsed::parse(divan::black_box(cmd)).and_then(|parsed| p.check(&parsed, cmd)).is_ok());
}
