//! `ephyr`: command-line parsing and dispatch only. The work happens in the library.
//!
//! Exit codes (docs/cli.md): 0 success; 1 failure (runtime error, or `doctor` found problems);
//! 2 usage error; 3 invalid configuration or input; 70 the signer was lost while serving.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use ephyr::broker::datadir::{DEFAULT_CONFIG_DIR, DEFAULT_DATA_DIR};
use ephyr::broker::serve::{self, ServeOptions};
use ephyr::cli;
use ephyr::signer::{SignerArgs, SignerConfig, TargetIds};
use lexopt::prelude::*;

const USAGE: &str = "\
ephyr — access broker between AI agents and infrastructure

Usage: ephyr <command> [options]

Commands:
  serve        run the broker (and its sandboxed signer)
  demo         see everything work on this machine: a throwaway sshd, the broker and an agent
  init         create the data dir, keys and an example policy
  doctor       check files, keys, the policy and the signer sandbox
  status       show a running broker's state
  whoami       your uid, operator or not, and the agent your uid maps to
  targets      targets, roles, principals, agents and host-key checks
  certs        live certificates (serials in hex and decimal)
  tasks        the live task trees
  cert sign    issue an operator SSH certificate through the running broker
  cert revoke  put a certificate on the broker's revocation list (KRL)
  exec         run a command on a target through the broker (`exec TARGET --role R -- CMD`)
  run          an agent on a target with nothing to steal (`run HOST --agent claude`, `-- CMD`)
  runs         runs: live and of the last day, with their LLM usage
  keys         disposable provider keys of runs: `list`, `cleanup [--all]`
  target       set up (`setup-script`), pin (`scan HOST`) and check (`verify NAME`) targets
  inspect      decode a task token and show what it allows
  policy       check, diff, explain or reload a policy
  keygen       generate an agent API key and its hash line
  approvals    the approval queue (`--follow` to watch); `approve ID`, `deny ID --reason TEXT`
  agent        agents' lifecycle: list, show, enroll (a join token), join, suspend, resume,
               revoke, reap (idle, orphaned and drifting agents)
  freeze       the kill switch: `freeze agent|task|target|service|remote NAME` (unfreeze, freezes)
  operator     add a console account (`operator add NAME --role admin`; password on stdin)
  secret       store upstream credentials sealed (`secret set NAME` reads stdin), list, rm
  audit        verify or query the audit trail
  recording    SSH command recordings: `list`, `show ID`, `play ID` (checked against the audit trail)
  monitor      watch what agents do, live (the audit stream, coloured, with filters)
  remote       review and approve federated tools that changed; sign in to OAuth remotes
  isolate      nftables rules: agents on this box reach only the broker (`--apply`, `--remove`)
  version      print the version

Run `ephyr <command> --help` for a command's options. Exit codes: 0 ok, 1 failure,
2 usage error, 3 invalid configuration or input, 70 signer lost.";

const SERVE_HELP: &str = "\
Usage: ephyr serve [options]

Runs the broker. The signer (which alone holds the CA key) is started as a separate,
sandboxed process. Stop with SIGTERM or Ctrl-C; SIGHUP reloads the policy.

Options:
  --dev                      no setup: temporary data dir, built-in dev policy, prints
                             how to connect an MCP client
  --config FILE              policy file (default /etc/ephyr/policy.yaml; --dev: built in)
  --data-dir DIR             data dir (default /var/lib/ephyr; --dev: a temporary dir,
                             or DIR to keep keys and state across restarts)
  --listen ADDR              MCP/API listener (default 127.0.0.1:8554)
  --dashboard-listen ADDR    dashboard listener (default 127.0.0.1:8553)
  --socket PATH              local API socket (default <data-dir>/ephyr.sock)
  --broker-user USER         account the broker drops to when started as root
                             (default: ephyr if it exists, else uid 65533)
  --signer-user USER         account the signer drops to when started as root
                             (default: ephyr-signer if it exists, else 65534)
  --shutdown-timeout DUR     time for in-flight requests on shutdown (default 10s)
  --insecure-no-sandbox      let the signer run without a complete sandbox (emulators,
                             old kernels); logged loudly and shown by doctor and metrics
  --tls-cert FILE            PEM certificate chain for both listeners (with --tls-key);
                             re-read on SIGHUP
  --tls-key FILE             its PEM private key (readable by the broker's user)
  --tls-name NAME            another DNS name or address for the generated certificate
                             (repeatable; a non-loopback listener without --tls-cert gets a
                             certificate from a local CA in <data-dir>/tls/)
  --insecure-plain-http      serve plain HTTP on a non-loopback address (credentials and the
                             console's cookie cross the network in clear text; logged loudly)";

const DEMO_HELP: &str = "\
Usage: ephyr demo [--step] [--keep] [--json]

Shows the whole product on this machine in about ten seconds, safely: starts a throwaway
OpenSSH sshd on loopback (its own config and host key under a temp dir, trusting only the
demo's CA; the system sshd is never touched) and a broker with a generated policy, then acts
as an agent over the real MCP endpoint: lists tools, runs a command, uses a session, creates
a holder-bound task, shows proof of possession, delegates a narrower child that is refused
beyond its envelope, revokes the tree, reads the KRL and verifies the audit trail.

Run as a normal user, commands run as you; run as root, they run as a throwaway account
ephyr-demo (no password) that is removed at the end. Everything is removed on exit and on
Ctrl-C. Needs openssh-server (sshd) and ssh-keygen.

Options:
  --step    wait for Enter between steps
  --keep    afterwards, keep the lab up and print how to connect your own MCP client
            (Claude Code, Cursor, an SDK) to run a command on it; Ctrl-C removes everything
  --json    one JSON object per step ({step, name, ok, detail}) instead of the narration

Exit 0 when every step went as expected, 1 otherwise.";

const INIT_HELP: &str = "\
Usage: ephyr init [options]

Creates the data dir, its keys and an example policy, then prints the CA public key line
for TrustedUserCAKeys on your targets. Running it again keeps existing keys and files.

Writes (with the defaults):
  /var/lib/ephyr/keys/ca_key               Ed25519 CA private key (0600)
  /var/lib/ephyr/keys/ca_key.pub           its public line (what targets trust)
  /var/lib/ephyr/keys/sealing_key          seals task keys and stored secrets (0600)
  /var/lib/ephyr/keys/audit_checkpoint.pub verifies the audit trail's signed checkpoints
  /var/lib/ephyr/state/, audit/,           for the broker's account (0700): the service needs no
    recordings/, tls/                      CAP_CHOWN at start when init has handed them over
  /etc/ephyr/policy.yaml                   the example policy (0640; kept if it exists)

Options:
  --data-dir DIR         data dir (default /var/lib/ephyr)
  --config-dir DIR       config dir for policy.yaml (default /etc/ephyr)
  --force-new-ca         replace the CA key (targets must then trust the new line)
  --broker-user USER     broker account (when run as root), owns state/, audit/, recordings/, tls/
  --signer-user USER     signer account (when run as root)";

const DOCTOR_HELP: &str = "\
Usage: ephyr doctor [options]

Checks file modes and ownership, the keys, the policy (and its warnings), each target
(reachable, host key pinned), the store: secrets the policy uses, the audit chain, the
sandbox of a real signer (it tries to escape and must fail), and the running broker (not
answering is a problem unless --offline). Exit 1 if anything failed.

Options:
  --data-dir DIR      data dir (default /var/lib/ephyr)
  --config FILE       policy file (default /etc/ephyr/policy.yaml)
  --socket PATH       local API socket of a running broker (default <data-dir>/ephyr.sock)
  --broker-user USER  as for serve
  --signer-user USER  as for serve
  --offline           before the broker's first start: no running broker is fine
  --json              machine-readable output";

const INSPECT_HELP: &str = "\
Usage: ephyr inspect TOKEN|- [--json] [--root-key-file FILE]

Decodes a task token (mac_...) and shows its caveats in order, the envelope they reduce to,
the task lineage, expiry in UTC and local time, and its size. Needs no key; with
--root-key-file (the tree's raw root key) it also verifies the signature chain.
Exit 3 if the token does not decode, does not reduce, or fails verification.";

const POLICY_HELP: &str = "\
Usage: ephyr policy <check|diff|explain|reload> ...

  ephyr policy check FILE [--json]
      Validate a policy; lists every problem with file:line:column, the key and a hint.
      Exit 0 if valid, 3 if not.
  ephyr policy diff OLD NEW
      What each agent gains (+) or loses (-), and settings that change (~); approval
      rules that appear (+) or go (-).
  ephyr policy explain --agent NAME --action ACTION [--config FILE] [--tool TOOL]
                       [--token mac_...] [--command 'CMD'] [--json]
      The decision the broker would make, and the rule behind it (and whether an
      approvals: rule would hold it for an operator). Exit 0 allow, 1 deny.
      --command CMD with ACTION ssh:TARGET:ROLE checks CMD as the command policy would
      (a refusal names its reason code and the offending part of the command).
      ACTION: ssh:TARGET:ROLE[:COMMAND] | http:SERVICE:METHOD:/PATH | tool:REMOTE:TOOL[:{json args}]
              task:create:TTL | task:delegate:TTL:CHILD_DEPTH | task:read | task:revoke
              task:bind | dashboard:LEVEL | discover
  ephyr policy reload [--socket PATH | --data-dir DIR]
      Ask the running broker to re-read its policy (like SIGHUP) and show the result.
      An invalid policy is refused and the running one stays in force (exit 3).";

const KEYGEN_HELP: &str = "\
Usage: ephyr keygen agent NAME [--json]

Generates a new API key for agent NAME, prints it once, and prints the Argon2id
api_key_hash line to paste under agents.NAME in policy.yaml. The key itself is not stored.";

const AGENT_HELP: &str = "\
Usage: ephyr agent list [--json]
       ephyr agent show NAME [--json]
       ephyr agent enroll --template T --owner OPERATOR [--name NAME] [--ttl 15m] [--json]
       ephyr agent join --url http://BROKER:8554 [--token-file FILE] [--out KEYFILE | --key-out PEM]
                        [--attestation-file JWT]
       ephyr agent suspend|resume|revoke NAME [--reason TEXT] [--json]
       ephyr agent reap [--apply] [--json]

The agent directory (docs/agents.md). `enroll` makes an agent from a policy template, owned by
an operator, and prints a join token that works once and expires (lifecycle.join_ttl); on the
agent's host, `join` trades it (from --token-file or stdin) for the agent's API key, written to
--out (0600) or printed once; with --key-out it makes a P-256 key pair instead and registers
the public key: the agent then gets tokens at /oauth/token with a private_key_jwt assertion,
and no API key exists. --attestation-file gives the Kubernetes service-account token a
template's `attest:` asks for. `suspend` refuses every credential of the agent at once and ends
what it holds (tasks, certificates, SSH and MCP sessions); `resume` lets it in again; `revoke`
is for good. `reap` shows which agents are due idle, decommissioned or revoked (owner gone) and
which grants each has not used, with a narrower template; `--apply` carries the steps out.
All but `join` talk to the running broker over its local socket (root or the broker's user).
Options: --socket PATH  --data-dir DIR  --json";

const FREEZE_HELP: &str = "\
Usage: ephyr freeze KIND NAME [--reason TEXT]
       ephyr unfreeze KIND NAME
       ephyr freezes [--json]

The kill switch. KIND is agent, task, target, service or remote. Freezing refuses every new
request it covers at once, then revokes the live tasks and certificates it covers (an agent's
tasks and certificates; a task's tree; a target's certificates), closes their SSH sessions,
ends the agent's MCP sessions and streams, denies the approval requests it covers and
updates the KRL. Freezes are journaled (they
survive restarts) and audited. Unfreezing lets new requests through again; what was revoked
stays revoked. Talks to the running broker over its local socket (root or the broker's user).
Options: --socket PATH  --data-dir DIR  --json";

const APPROVALS_HELP: &str = "\
Usage: ephyr approvals [--all] [--follow] [--json]
       ephyr approve ID [--waive DURATION] [--reason TEXT]
       ephyr deny ID --reason TEXT

Actions an `approvals:` rule holds wait for an operator. `approvals` lists the waiting
requests (--all: a day of answered and expired ones too; --follow: print each one as it
appears or changes). `approve` lets the agent's next identical call run once (--waive 10m:
the same action by the same agent and task runs without asking for that long, within the
rule's `waiver`); with four_eyes a second, different approver must approve too. `deny`
needs a reason, which the agent is told. Answers from here count as the approver `local`
(root or the broker's user on the local socket). Options: --socket PATH  --data-dir DIR";

const OPERATOR_HELP: &str = "\
Usage: ephyr operator add NAME [--role viewer|admin] [--generate]

Prints the operators.NAME lines (an Argon2id password_hash and the role) to paste into
policy.yaml for the console on the dashboard listener. The password is read from stdin,
never the command line (at least 12 characters); --generate makes one and shows it once.
Roles: viewer sees every view; admin also revokes, closes, freezes, approves and reloads.";

const SECRET_HELP: &str = "\
Usage: ephyr secret <set|list|rm> ...

  ephyr secret set NAME      read the value from stdin (never the command line), seal it with
                             the signer's key and store it; the policy uses it as store:NAME
  ephyr secret list [--json] stored names (never values) and store: references not yet set
  ephyr secret rm NAME       remove a stored secret

Talks to the running broker over its local socket (root or the broker's user). Options:
  --socket PATH   --data-dir DIR

Example: read -rs KEY && printf %s \"$KEY\" | ephyr secret set openai";

const AUDIT_HELP: &str = "\
Usage: ephyr audit <verify|query> ...

  ephyr audit verify [FILE...] [--data-dir DIR] [--public-key B64|FILE] [--socket PATH] [--json]
      Checks the hash chain, every signed checkpoint, and the end of the log. Without FILEs it
      reads every file in <data-dir>/audit in order and also uses audit/HEAD and, if one answers
      on the socket, the running broker's live chain head. The trusted checkpoint key comes from
      --public-key, else keys/audit_checkpoint.pub, else the running broker.
      Exit 0 verified, 1 tampering or damage found (each with file:line), 3 no key to trust.
  ephyr audit query [--data-dir DIR] [--task ULID] [--subtree ULID] [--agent NAME]
                    [--target NAME] [--since T] [--until T] [--decision allow|deny|error]
                    [--kind K] [--event E] [--follow] [--json] [FILE...]
      Events in log order, each with what was done (tool, target, role, command; service,
      method, path; certificate serials in hex and decimal). --task selects the task's whole
      tree, --subtree the task and its descendants. T is RFC 3339 or a duration (1h = one hour
      ago). --follow keeps reading as the log grows, across rotation. --json prints the log's
      own lines, byte for byte.";

const MONITOR_HELP: &str = "\
Usage: ephyr monitor [--data-dir DIR] [filters] [--last N] [--json] [--color|--no-color]

What agents are doing, live: the last N events (default 10), then every new one as it is
written, coloured (deny red, errors yellow, allow green) when the output is a terminal and
NO_COLOR is unset. Follows the log across rotation. Reads <data-dir>/audit (root or the
broker's user). Ctrl-C to stop.

Filters (as for audit query): --agent NAME, --task ULID (the whole tree), --subtree ULID,
--target NAME, --kind K, --event E, --decision allow|deny|error, --since T.";

const STATUS_HELP: &str = "\
Usage: ephyr status [--socket PATH | --data-dir DIR] [--json]

Shows a running broker's state (needs root or the broker's user).";

const EXEC_HELP: &str = "\
Usage: ephyr exec TARGET --role ROLE [options] -- COMMAND...
       ephyr exec --session ID [options] -- COMMAND...

Runs COMMAND on TARGET as ROLE through the broker (a fresh short-lived certificate per
command). Prints the command's stdout and stderr and exits with its exit code (124: timed
out, 125: the broker refused or failed, 255: no exit code).

On the broker host the local socket is used and your uid selects the agent (`uid:` in the
policy). Against a remote broker, pass --url and a task token or API key in EPHYR_TOKEN
(or --token, which other local users can see in the process list).

Options:
  --role ROLE             role on the target
  --session ID            run on an open session instead (see the session_create tool)
  --timeout SECS          kill the command after SECS (default 30)
  --url URL               remote broker, e.g. http://broker:8554
  --token TOKEN           credential for --url (prefer EPHYR_TOKEN)
  --socket PATH / --data-dir DIR   where the local socket is
  --json                  print the tool's JSON result instead";

const RUN_HELP: &str = "\
Usage: ephyr run HOST --agent NAME [options] [PROMPT]
       ephyr run HOST [options] -- COMMAND...
       ephyr run --cleanup HOST

Starts an agent on target HOST with nothing there worth stealing (docs/runs.md): a task from
the policy's run template (`runs:`), a private directory on HOST (0700, tmpfs when there is
one) holding only the task token, the SDK base URLs of the broker's proxy routes and an MCP
client configuration; the agent runs in that environment with a terminal (interactive) or
without (a PROMPT given), streamed. When it exits, the connection drops or a signal arrives,
the run's task is revoked and the directory removed. If this process dies, the broker ends
the run when its lease runs out. On the broker host your uid selects the agent (`uid:` in
the policy); elsewhere --url with the agent's API key.

Known agents: claude, codex, aider, pi. Any program runs with -- COMMAND...
Exit code: the agent's; 130 after a signal; 125 when the run could not start or was ended.

Options:
  --agent NAME           a known agent
  --template NAME        run template (default: default)
  --ttl DUR              shorter than the template's ttl
  --envelope JSON        narrower than the template's envelope, e.g. '{\"services\":[\"anthropic\"]}'
  --cwd DIR              working directory on HOST (default: the home directory)
  --tty / --no-tty       force a terminal or none (default: a terminal when stdin is one
                         and no PROMPT is given)
  --cleanup              only remove run directories on HOST whose runs are over
  --url URL              a broker elsewhere (http://broker:8554), with the agent's API key
                         in EPHYR_TOKEN (or --token, which other local users can see)
  --socket PATH / --data-dir DIR   where the local socket is";

const RUNS_HELP: &str = "\
Usage: ephyr runs [--json] [--socket PATH | --data-dir DIR | --url URL]

Runs of the last day: host, agent, state, duration and LLM usage (yours; operators see all).";

const KEYS_HELP: &str = "\
Usage: ephyr keys list [--json]
       ephyr keys cleanup [--all]

Disposable provider keys minted for runs (never their values). cleanup revokes every key
whose run is over (the broker also does this by itself every 10 s); --all revokes every
outstanding key. Root or the broker's user.";

const TARGET_HELP: &str = "\
Usage: ephyr target setup-script [--config FILE] [--target NAME]... [options]
       ephyr target scan HOST[:PORT] [--json]
       ephyr target verify NAME [--json] [--socket PATH | --data-dir DIR]

scan prints the host key fingerprint HOST presents, as the line to pin in the policy
(compare it with the host's own `ssh-keygen -lf` before trusting it). verify asks the
running broker to log in to target NAME as each of its roles with a fresh certificate and
reports per role: the principal mapping, the host-key check, the KRL's age (exit 1 if a
role fails; root or the broker's user).

setup-script:

Prints a shell script to run as root on a target host: role accounts (no passwords),
the CA line in /etc/ssh/ephyr_ca.pub, principals files, an empty KRL and an sshd drop-in
(TrustedUserCAKeys, AuthorizedPrincipalsFile, RevokedKeys); with --broker-url, a timer that
fetches the broker's KRL every minute. See docs/target-setup.md.

Options:
  --config FILE           policy (default /etc/ephyr/policy.yaml)
  --target NAME           only the roles of this target (repeatable; default all)
  --broker-url URL        where targets fetch the KRL, e.g. http://192.168.1.5:8554
  --ca-key FILE           CA public key (default: the running broker's, else <data-dir>/keys/ca.pub)
  --ssh-dir DIR           where the CA line, principals, KRL and drop-in go (default /etc/ssh)
  --sshd-config FILE      the sshd config that includes the drop-in (default <ssh-dir>/sshd_config)
  --sshd-pid-file FILE    reload the sshd with this pid file (default: the ssh/sshd service);
                          the script never signals an sshd it did not configure
  --dry-run               a script that changes nothing and prints every file it would write
                          and command it would run (any script also takes `sh setup.sh --dry-run`)
  --socket PATH / --data-dir DIR   where the broker is";

const CERT_HELP: &str = "\
Usage: ephyr cert sign --public-key FILE --principal NAME [options]
       ephyr cert revoke SERIAL [--socket PATH | --data-dir DIR]

Issues a short-lived operator certificate through the running broker's signer (root or
the broker's user only). Prints the certificate line; save it as <key>-cert.pub.

Options:
  --public-key FILE       OpenSSH ed25519 public key (- for stdin)
  --principal NAME        remote user (repeatable; must be on the signer's allow-list)
  --ttl DUR               validity (default 5m, at most the policy's cert_ttl_max)
  --force-command CMD     force-command critical option
  --source-address CIDRS  source-address critical option
  --socket PATH / --data-dir DIR   where the broker's local socket is
  --json                  print the full JSON answer";

/// Commands, for "did you mean".
const COMMANDS: [&str; 27] = [
    "serve", "demo", "init", "doctor", "status", "whoami", "targets", "certs", "tasks", "cert", "exec", "run", "runs",
    "agent", "keys", "target", "inspect", "policy", "keygen", "secret", "audit", "monitor", "remote", "isolate",
    "version", "help", "--help",
];

/// A closed stdout (`ephyr ... | head -1`) ends a command quietly with 0: the reader took what
/// it wanted. Not for `serve`, whose output is its log.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.starts_with("failed printing to std") && m.contains("Broken pipe")) {
            std::process::exit(0);
        }
        default(info)
    }));
}

/// The closest command to a mistyped one (edit distance at most 2).
fn did_you_mean(word: &str) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    COMMANDS
        .iter()
        .copied()
        .filter(|c| !c.starts_with('-'))
        .map(|c| (distance(word, c), c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

fn main() -> ExitCode {
    ephyr::os::return_large_blocks_to_the_system();
    if std::env::args().nth(1).is_some_and(|a| a != "serve" && a != "__signer" && a != "__remote-sandbox") {
        quiet_on_closed_pipe();
    }
    let mut p = lexopt::Parser::from_env();
    match dispatch(&mut p) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(e)) => {
            eprintln!("ephyr: {e}\nTry 'ephyr --help'.");
            ExitCode::from(2)
        }
        Err(Failure::Run(code, e)) => {
            eprintln!("ephyr: {e}");
            ExitCode::from(code)
        }
    }
}

enum Failure {
    Usage(String),
    Run(u8, String),
}

impl From<lexopt::Error> for Failure {
    fn from(e: lexopt::Error) -> Self {
        Failure::Usage(e.to_string())
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

fn help(text: &str) -> Result<u8, Failure> {
    println!("{text}");
    Ok(0)
}

/// `ephyr CMD SUB --help`: the part of CMD's help about SUB (its `  ephyr CMD SUB` block).
fn sub_help(family: &str, cmd: &str, sub: &str) -> Result<u8, Failure> {
    let head = format!("  ephyr {cmd} {sub}");
    let other = format!("  ephyr {cmd} ");
    let mut out = Vec::new();
    let mut inside = false;
    for line in family.lines() {
        if line.starts_with(&head) {
            inside = true;
        } else if line.starts_with(&other) || (inside && line.trim().is_empty()) {
            inside = false;
        }
        if inside {
            out.push(line);
        }
    }
    if out.is_empty() {
        return help(family);
    }
    println!("Usage:\n{}\n\n(every `ephyr {cmd}` command: ephyr {cmd} --help)", out.join("\n"));
    Ok(0)
}

fn dispatch(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let cmd = match p.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("version") | Short('V')) => "version".into(),
        Some(Long("help") | Short('h')) => return help(USAGE),
        Some(other) => return Err(other.unexpected().into()),
        None => {
            eprintln!("{USAGE}");
            return Ok(2);
        }
    };
    match cmd.as_str() {
        "serve" => cmd_serve(p),
        "demo" => cmd_demo(p),
        "init" => cmd_init(p),
        "doctor" => cmd_doctor(p),
        "status" => cmd_status(p),
        "cert" => cmd_cert(p),
        "exec" => cmd_exec(p),
        "run" => cmd_run(p),
        "runs" => cmd_runs(p),
        "keys" => cmd_keys(p),
        "target" => cmd_target(p),
        "inspect" => cmd_inspect(p),
        "policy" => cmd_policy(p),
        "keygen" => cmd_keygen(p),
        "operator" => cmd_operator(p),
        "freeze" | "unfreeze" | "freezes" => cmd_freeze(p, &cmd),
        "agent" | "agents" => cmd_agent(p),
        "approvals" | "approve" | "deny" => cmd_approvals(p, &cmd),
        "secret" => cmd_secret(p),
        "audit" => cmd_audit(p),
        "recording" | "recordings" => cmd_recording(p),
        "shim" => cmd_shim(p),
        "isolate" => cmd_isolate(p),
        "monitor" => cmd_monitor(p),
        "remote" => cmd_remote(p),
        "whoami" | "targets" | "certs" | "tasks" => cmd_view(p, &cmd),
        "version" => {
            println!("ephyr {} ({})", env!("CARGO_PKG_VERSION"), env!("EPHYR_COMMIT"));
            Ok(0)
        }
        "help" => help(USAGE),
        "__signer" => cmd_signer(p),
        "__federation-client" => {
            let url = match p.next()? {
                Some(Value(v)) => v.string()?,
                _ => return Err(usage("__federation-client needs a server URL")),
            };
            cli::federation_client::run(&url).map_err(|e| Failure::Run(1, e))
        }
        "__remote-sandbox" => {
            let spec = match p.next()? {
                Some(Value(v)) => v.string()?,
                _ => return Err(usage("__remote-sandbox needs a confinement spec")),
            };
            Err(Failure::Run(126, cli::remote::sandbox(&spec)))
        }
        other => Err(usage(match did_you_mean(other) {
            Some(c) => format!("unknown command {other:?}; did you mean `ephyr {c}`?"),
            None => format!("unknown command {other:?}"),
        })),
    }
}

fn path(v: OsString) -> PathBuf {
    PathBuf::from(v)
}

fn addr(p: &mut lexopt::Parser, flag: &str) -> Result<SocketAddr, Failure> {
    let v = p.value()?.string()?;
    v.parse().map_err(|_| usage(format!("{flag}: {v:?} is not an address like 127.0.0.1:8554")))
}

fn cmd_demo(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = cli::demo::DemoOptions::default();
    while let Some(arg) = p.next()? {
        match arg {
            Long("step") => o.step = true,
            Long("json") => o.json = true,
            Long("keep") => o.keep = true,
            Long("help") | Short('h') => return help(DEMO_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    cli::demo::run(&o).map_err(|e| Failure::Run(1, format!("demo: {e}")))
}

fn cmd_serve(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = ServeOptions::default();
    while let Some(arg) = p.next()? {
        match arg {
            Long("dev") => o.dev = true,
            Long("config") => o.config = Some(path(p.value()?)),
            Long("data-dir") => o.data_dir = Some(path(p.value()?)),
            Long("listen") => o.listen = addr(p, "--listen")?,
            Long("dashboard-listen") => o.dashboard_listen = addr(p, "--dashboard-listen")?,
            Long("socket") => o.socket = Some(path(p.value()?)),
            Long("broker-user") => o.broker_user = Some(p.value()?.string()?),
            Long("signer-user") => o.signer_user = Some(p.value()?.string()?),
            Long("shutdown-timeout") => {
                let v = p.value()?.string()?;
                o.shutdown_timeout =
                    ephyr::time::parse_duration(&v).map_err(|e| usage(format!("--shutdown-timeout: {e}")))?;
            }
            Long("insecure-no-sandbox") => o.insecure_no_sandbox = true,
            Long("tls-cert") => o.tls_cert = Some(path(p.value()?)),
            Long("tls-key") => o.tls_key = Some(path(p.value()?)),
            Long("tls-name") => o.tls_names.push(p.value()?.string()?),
            Long("insecure-plain-http") => o.insecure_plain_http = true,
            Long("help") | Short('h') => return help(SERVE_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    match serve::run(o) {
        Ok(()) => Ok(0),
        Err(e) => Err(Failure::Run(e.exit_code() as u8, e.to_string())),
    }
}

fn cmd_init(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = cli::init::InitOptions {
        data_dir: DEFAULT_DATA_DIR.into(),
        config_dir: DEFAULT_CONFIG_DIR.into(),
        ..Default::default()
    };
    while let Some(arg) = p.next()? {
        match arg {
            Long("data-dir") => o.data_dir = path(p.value()?),
            Long("config-dir") => o.config_dir = path(p.value()?),
            Long("force-new-ca") => o.force_new_ca = true,
            Long("broker-user") => o.broker_user = Some(p.value()?.string()?),
            Long("signer-user") => o.signer_user = Some(p.value()?.string()?),
            Long("help") | Short('h') => return help(INIT_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    cli::init::run(&o).map(|()| 0).map_err(|e| Failure::Run(1, e))
}

fn cmd_doctor(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = cli::doctor::DoctorOptions {
        data_dir: DEFAULT_DATA_DIR.into(),
        config: PathBuf::from(DEFAULT_CONFIG_DIR).join("policy.yaml"),
        ..Default::default()
    };
    let mut socket = None;
    while let Some(arg) = p.next()? {
        match arg {
            Long("data-dir") => o.data_dir = path(p.value()?),
            Long("config") => o.config = path(p.value()?),
            Long("socket") => socket = Some(path(p.value()?)),
            Long("broker-user") => o.broker_user = Some(p.value()?.string()?),
            Long("signer-user") => o.signer_user = Some(p.value()?.string()?),
            Long("json") => o.json = true,
            Long("offline") => o.offline = true,
            Long("help") | Short('h') => return help(DOCTOR_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    o.socket = cli::client::socket_path(socket, Some(&o.data_dir));
    match cli::doctor::run(&o) {
        Ok(true) => Ok(0),
        Ok(false) => Ok(1),
        Err(e) => Err(Failure::Run(1, e)),
    }
}

fn cmd_status(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let (mut socket, mut data_dir, mut json) = (None, None, false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("json") => json = true,
            Long("help") | Short('h') => return help(STATUS_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    let sock = cli::client::socket_path(socket, data_dir.as_deref());
    cli::status(&sock, json).map(|()| 0).map_err(|e| Failure::Run(1, e))
}

const VIEWS_HELP: &str = "\
Usage: ephyr whoami|targets|certs|tasks [--json] [--socket PATH | --data-dir DIR]

  whoami    your uid, whether you are an operator, the agent your uid maps to and what it
            may reach (anyone may ask)
  targets   every target: address, roles and their principals, which agents may use them,
            how the host key is checked (pinned, host CA, first use)
  certs     live certificates: serial in hex and decimal, agent, target/role, principal,
            expiry, in use / idle / revoked
  tasks     the live task trees, with holder binding and revocation

targets, certs and tasks need root or the broker's user. --json prints the broker's answer.";

/// `ephyr whoami|targets|certs|tasks`.
fn cmd_view(p: &mut lexopt::Parser, which: &str) -> Result<u8, Failure> {
    let (mut socket, mut data_dir, mut json) = (None, None, false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("json") => json = true,
            Long("help") | Short('h') => return help(VIEWS_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    let sock = cli::client::socket_path(socket, data_dir.as_deref());
    let r = match which {
        "whoami" => cli::views::whoami(&sock, json),
        "targets" => cli::views::targets(&sock, json),
        "certs" => cli::views::certs(&sock, json),
        _ => cli::views::tasks(&sock, json),
    };
    r.map_err(|e| Failure::Run(1, e))
}

fn cmd_exec(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = cli::exec::ExecOptions::default();
    let (mut socket, mut data_dir, mut words) = (None, None, Vec::new());
    while let Some(arg) = p.next()? {
        match arg {
            Long("role") => o.role = Some(p.value()?.string()?),
            Long("session") => o.session = Some(p.value()?.string()?),
            Long("timeout") => {
                let v = p.value()?.string()?;
                o.timeout = Some(v.parse().map_err(|_| usage(format!("--timeout: {v:?} is not a number of seconds")))?);
            }
            Long("url") => o.url = Some(p.value()?.string()?),
            Long("token") => o.token = Some(p.value()?.string()?),
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("json") => o.json = true,
            Long("help") | Short('h') => return help(EXEC_HELP),
            Value(v) if o.target.is_none() && o.session.is_none() && words.is_empty() => o.target = Some(v.string()?),
            Value(v) => words.push(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    if words.is_empty() {
        return Err(usage("no command: `ephyr exec TARGET --role ROLE -- COMMAND...`"));
    }
    if o.session.is_none() && (o.target.is_none() || o.role.is_none()) {
        return Err(usage("TARGET and --role are required (or --session ID)"));
    }
    o.command = words.join(" ");
    o.socket = cli::client::socket_path(socket, data_dir.as_deref());
    cli::exec::run(&o).map_err(|e| Failure::Run(cli::exec::REFUSED, e))
}

fn cmd_run(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = cli::run::RunOptions::default();
    let (mut socket, mut data_dir, mut words, mut url, mut token) = (None, None, Vec::new(), None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("agent") => o.agent = Some(p.value()?.string()?),
            Long("template") => o.template = Some(p.value()?.string()?),
            Long("ttl") => o.ttl = Some(p.value()?.string()?),
            Long("envelope") => o.envelope = Some(p.value()?.string()?),
            Long("cwd") => o.cwd = Some(p.value()?.string()?),
            Long("tty") => o.tty = Some(true),
            Long("no-tty") => o.tty = Some(false),
            Long("cleanup") => o.cleanup = true,
            Long("url") => url = Some(p.value()?.string()?),
            Long("token") => token = Some(p.value()?.string()?),
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("help") | Short('h') => return help(RUN_HELP),
            Value(v) if o.host.is_empty() => o.host = v.string()?,
            Value(v) => words.push(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    if o.host.is_empty() {
        return Err(usage("no HOST: `ephyr run HOST --agent NAME` or `ephyr run HOST -- COMMAND...`"));
    }
    if o.cleanup {
        if !words.is_empty() || o.agent.is_some() {
            return Err(usage("--cleanup takes only HOST"));
        }
    } else if o.agent.is_some() {
        match words.len() {
            0 => {}
            1 => o.prompt = words.pop(),
            _ => return Err(usage("with --agent, give the PROMPT as one argument (quote it)")),
        }
    } else {
        o.command = words;
    }
    o.broker = broker_via(url, token, socket, data_dir)?;
    cli::run::run(&o).map_err(|e| Failure::Run(cli::run::FAILED, format!("run: {e}")))
}

/// The local socket, or with `--url` the broker's listener and the agent's API key
/// (`--token`, else `EPHYR_TOKEN`).
fn broker_via(
    url: Option<String>,
    token: Option<String>,
    socket: Option<std::path::PathBuf>,
    data_dir: Option<std::path::PathBuf>,
) -> Result<cli::run::Via, Failure> {
    match url {
        None => Ok(cli::run::Via::Socket(cli::client::socket_path(socket, data_dir.as_deref()))),
        Some(base) => {
            let key = token.or_else(|| std::env::var("EPHYR_TOKEN").ok()).filter(|k| !k.is_empty()).ok_or_else(|| {
                usage("--url needs the agent's API key: set EPHYR_TOKEN (or pass --token, which other local users can see)")
            })?;
            Ok(cli::run::Via::Url { base, key: zeroize::Zeroizing::new(key) })
        }
    }
}

fn cmd_runs(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let (mut socket, mut data_dir, mut json, mut url, mut token) = (None, None, false, None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("json") => json = true,
            Long("url") => url = Some(p.value()?.string()?),
            Long("token") => token = Some(p.value()?.string()?),
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("help") | Short('h') => return help(RUNS_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    let broker = broker_via(url, token, socket, data_dir)?;
    cli::run::list(&broker, json).map(|()| 0).map_err(|e| Failure::Run(1, e))
}

fn cmd_keys(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let sub = match p.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("help") | Short('h')) | None => return help(KEYS_HELP),
        Some(other) => return Err(other.unexpected().into()),
    };
    let (mut socket, mut data_dir, mut json, mut all) = (None, None, false, false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("json") if sub == "list" => json = true,
            Long("all") if sub == "cleanup" => all = true,
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("help") | Short('h') => return help(KEYS_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    let socket = cli::client::socket_path(socket, data_dir.as_deref());
    match sub.as_str() {
        "list" => cli::run::keys_list(&socket, json).map(|()| 0),
        "cleanup" => cli::run::keys_cleanup(&socket, all),
        other => return Err(usage(format!("unknown `keys {other}`; expected list or cleanup"))),
    }
    .map_err(|e| Failure::Run(1, e))
}

fn cmd_target(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    match p.next()? {
        Some(Value(v)) if v == "setup-script" => {}
        Some(Value(v)) if v == "scan" || v == "verify" => {
            let sub = v.string()?;
            let (mut arg1, mut json, mut socket, mut data_dir) = (None, false, None, None);
            while let Some(arg) = p.next()? {
                match arg {
                    Long("json") => json = true,
                    Long("socket") if sub == "verify" => socket = Some(path(p.value()?)),
                    Long("data-dir") if sub == "verify" => data_dir = Some(path(p.value()?)),
                    Long("help") | Short('h') => return help(TARGET_HELP),
                    Value(v) if arg1.is_none() => arg1 = Some(v.string()?),
                    other => return Err(other.unexpected().into()),
                }
            }
            return if sub == "scan" {
                let spec = arg1.ok_or_else(|| usage("target scan needs HOST[:PORT]"))?;
                cli::target::scan(&spec, json).map_err(|e| Failure::Run(1, e))
            } else {
                let name = arg1.ok_or_else(|| usage("target verify needs a target NAME from the policy"))?;
                let sock = cli::client::socket_path(socket, data_dir.as_deref());
                cli::target::verify(&sock, &name, json).map_err(|e| Failure::Run(1, e))
            };
        }
        Some(Long("help") | Short('h')) => return help(TARGET_HELP),
        _ => return Err(usage("expected `ephyr target setup-script|scan|verify ...`")),
    }
    let mut o = cli::target::SetupOptions::default();
    let (mut socket, mut data_dir, mut config) = (None, None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("config") => config = Some(path(p.value()?)),
            Long("target") => o.targets.push(p.value()?.string()?),
            Long("broker-url") => o.broker_url = Some(p.value()?.string()?),
            Long("ca-key") => o.ca_key = Some(path(p.value()?)),
            Long("ssh-dir") => o.layout.ssh_dir = Some(p.value()?.string()?),
            Long("sshd-config") => o.layout.sshd_config = Some(p.value()?.string()?),
            Long("sshd-pid-file") => o.layout.sshd_pid_file = Some(p.value()?.string()?),
            Long("dry-run") => o.layout.dry_run = true,
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("help") | Short('h') => return help(TARGET_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    o.policy = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR).join("policy.yaml"));
    o.socket = cli::client::socket_path(socket, data_dir.as_deref());
    o.data_dir = data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    cli::target::setup_script(&o).map(|()| 0).map_err(|e| Failure::Run(3, e))
}

fn cmd_cert(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    match p.next()? {
        Some(Value(v)) if v == "sign" => {}
        Some(Value(v)) if v == "revoke" => {
            let (mut socket, mut data_dir, mut serial) = (None, None, None);
            while let Some(arg) = p.next()? {
                match arg {
                    Long("socket") => socket = Some(path(p.value()?)),
                    Long("data-dir") => data_dir = Some(path(p.value()?)),
                    Long("help") | Short('h') => return help(CERT_HELP),
                    Value(v) if serial.is_none() => serial = Some(v.string()?),
                    other => return Err(other.unexpected().into()),
                }
            }
            let serial = serial.ok_or_else(|| usage("cert revoke needs a SERIAL (hex, as list_certs shows it)"))?;
            let socket = cli::client::socket_path(socket, data_dir.as_deref());
            return cli::cert_revoke(&socket, &serial).map(|()| 0).map_err(|e| Failure::Run(1, e));
        }
        Some(Long("help") | Short('h')) => return help(CERT_HELP),
        _ => return Err(usage("expected `ephyr cert sign ...`")),
    }
    let mut o = cli::CertSignOptions::default();
    let (mut socket, mut data_dir, mut key) = (None, None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("public-key") => key = Some(path(p.value()?)),
            Long("principal") => o.principals.push(p.value()?.string()?),
            Long("ttl") => o.ttl = Some(p.value()?.string()?),
            Long("force-command") => o.force_command = Some(p.value()?.string()?),
            Long("source-address") => o.source_address = Some(p.value()?.string()?),
            Long("json") => o.json = true,
            Long("help") | Short('h') => return help(CERT_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    o.public_key = key.ok_or_else(|| usage("--public-key is required"))?;
    if o.principals.is_empty() {
        return Err(usage("at least one --principal is required"));
    }
    o.socket = cli::client::socket_path(socket, data_dir.as_deref());
    cli::cert_sign(&o).map(|()| 0).map_err(|e| Failure::Run(1, e))
}

fn cmd_policy(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let sub = match p.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("help") | Short('h')) | None => return help(POLICY_HELP),
        Some(other) => return Err(other.unexpected().into()),
    };
    let run = |r: Result<i32, String>| r.map(|c| c as u8).map_err(|e| Failure::Run(3, e));
    match sub.as_str() {
        "check" => {
            let (mut file, mut json) = (None, false);
            while let Some(arg) = p.next()? {
                match arg {
                    Long("json") => json = true,
                    Long("help") | Short('h') => return sub_help(POLICY_HELP, "policy", &sub),
                    Value(v) if file.is_none() => file = Some(path(v)),
                    other => return Err(other.unexpected().into()),
                }
            }
            let file = file.ok_or_else(|| usage("policy check needs a FILE"))?;
            Ok(cli::policy::check(&file, json) as u8)
        }
        "diff" => {
            let mut files = Vec::new();
            while let Some(arg) = p.next()? {
                match arg {
                    Long("help") | Short('h') => return sub_help(POLICY_HELP, "policy", &sub),
                    Value(v) if files.len() < 2 => files.push(path(v)),
                    other => return Err(other.unexpected().into()),
                }
            }
            if files.len() != 2 {
                return Err(usage("policy diff needs OLD and NEW files"));
            }
            run(cli::policy::diff(&files[0], &files[1]))
        }
        "explain" => {
            let mut o = cli::policy::ExplainOptions {
                config: PathBuf::from(DEFAULT_CONFIG_DIR).join("policy.yaml"),
                ..Default::default()
            };
            while let Some(arg) = p.next()? {
                match arg {
                    Long("config") => o.config = path(p.value()?),
                    Long("agent") => o.agent = p.value()?.string()?,
                    Long("action") => o.action = p.value()?.string()?,
                    Long("tool") => o.tool = Some(p.value()?.string()?),
                    Long("token") => o.token = Some(p.value()?.string()?),
                    Long("command") => o.command = Some(p.value()?.string()?),
                    Long("json") => o.json = true,
                    Long("help") | Short('h') => return sub_help(POLICY_HELP, "policy", &sub),
                    other => return Err(other.unexpected().into()),
                }
            }
            if o.agent.is_empty() || o.action.is_empty() {
                return Err(usage("policy explain needs --agent and --action"));
            }
            run(cli::policy::explain(&o))
        }
        "reload" => {
            let (mut socket, mut data_dir) = (None, None);
            while let Some(arg) = p.next()? {
                match arg {
                    Long("socket") => socket = Some(path(p.value()?)),
                    Long("data-dir") => data_dir = Some(path(p.value()?)),
                    Long("help") | Short('h') => return sub_help(POLICY_HELP, "policy", &sub),
                    other => return Err(other.unexpected().into()),
                }
            }
            let sock = cli::client::socket_path(socket, data_dir.as_deref());
            cli::policy::reload(&sock).map(|c| c as u8).map_err(|e| Failure::Run(1, e))
        }
        other => Err(usage(format!("unknown policy command {other:?} (check, diff, explain, reload)"))),
    }
}

/// An argument that does not borrow the parser.
enum Opt {
    Long(String),
    Short(char),
    Value(OsString),
}

impl Opt {
    fn from(a: lexopt::Arg<'_>) -> Opt {
        match a {
            Long(n) => Opt::Long(n.to_owned()),
            Short(c) => Opt::Short(c),
            Value(v) => Opt::Value(v),
        }
    }

    fn unexpected(&self) -> Failure {
        match self {
            Opt::Long(n) => usage(format!("invalid option '--{n}'")),
            Opt::Short(c) => usage(format!("invalid option '-{c}'")),
            Opt::Value(v) => usage(format!("unexpected argument {v:?}")),
        }
    }
}

/// Parses one `audit query` / `monitor` filter option; `Ok(false)` when `name` is not one.
fn filter_arg(
    p: &mut lexopt::Parser,
    name: &str,
    f: &mut ephyr::broker::audit::query::Filter,
) -> Result<bool, Failure> {
    let when = |v: String| cli::audit::parse_when(&v).map_err(usage);
    match name {
        "task" => f.task = Some(p.value()?.string()?),
        "subtree" => f.subtree = Some(p.value()?.string()?),
        "agent" => f.agent = Some(p.value()?.string()?),
        "target" => f.target = Some(p.value()?.string()?),
        "since" => f.since = Some(when(p.value()?.string()?)?),
        "until" => f.until = Some(when(p.value()?.string()?)?),
        "decision" => {
            let d = p.value()?.string()?;
            if !["allow", "deny", "error"].contains(&d.as_str()) {
                return Err(usage(format!("--decision {d:?}: use allow, deny or error")));
            }
            f.decision = Some(d);
        }
        "kind" => f.kind = Some(p.value()?.string()?),
        "event" => f.event = Some(p.value()?.string()?),
        _ => return Ok(false),
    }
    Ok(true)
}

fn color_default() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

const REMOTE_HELP: &str = "\
Usage: ephyr remote <review|approve|login|logout> ...

  ephyr remote review NAME [--json]
      The tools of remote NAME that are quarantined because their definition changed since it
      was first seen or last approved: a diff against the pinned definition (- pinned, + now)
      and warnings for hidden-instruction markers and invisible characters.
  ephyr remote approve NAME [TOOL]
      Pins the new definition of TOOL (every quarantined tool of NAME without one) and serves
      it again; audited as tool_approved.
  ephyr remote login NAME [--agent AGENT] [--url ADDRESS]
      Signs the broker in to remote NAME, protected by OAuth 2.1 (its policy entry has oauth:):
      prints the authorization URL to open in a browser. When the authorization server sends
      the browser back to the broker, the sign-in is done; otherwise paste the address the
      browser ended on (or pass it with --url). --agent: that agent's own sign-in (a remote
      with oauth.per_agent). The tokens are sealed by the signer; agents never see them.
  ephyr remote logout NAME [--agent AGENT]
      Forgets the sign-in (the remote is not called again until someone signs in).

Talks to the running broker over its local socket (root or the broker's user). Options:
  --socket PATH   --data-dir DIR";

fn cmd_remote(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let sub = match p.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("help") | Short('h')) | None => return help(REMOTE_HELP),
        Some(other) => return Err(other.unexpected().into()),
    };
    let (mut socket, mut data_dir, mut json, mut words) = (None, None, false, Vec::new());
    let (mut agent, mut url) = (None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("json") if sub == "review" => json = true,
            Long("agent") if sub == "login" || sub == "logout" => agent = Some(p.value()?.string()?),
            Long("url") if sub == "login" => url = Some(p.value()?.string()?),
            Long("help") | Short('h') => return sub_help(REMOTE_HELP, "remote", &sub),
            Value(v) => words.push(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let sock = cli::client::socket_path(socket, data_dir.as_deref());
    let name = words.first().cloned().ok_or_else(|| usage(format!("remote {sub} needs a remote NAME")))?;
    let r = match sub.as_str() {
        "review" if words.len() == 1 => cli::remote::review(&sock, &name, json),
        "approve" if words.len() <= 2 => cli::remote::approve(&sock, &name, words.get(1).map(String::as_str)),
        "login" if words.len() == 1 => cli::remote::login(&sock, &name, agent.as_deref(), url.as_deref()),
        "logout" if words.len() == 1 => cli::remote::logout(&sock, &name, agent.as_deref()),
        "review" | "approve" | "login" | "logout" => {
            return Err(usage(format!("too many arguments for remote {sub}")));
        }
        other => return Err(usage(format!("unknown remote command {other:?} (review, approve, login, logout)"))),
    };
    r.map_err(|e| Failure::Run(1, e))
}

fn cmd_monitor(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut data_dir = PathBuf::from(DEFAULT_DATA_DIR);
    let mut f = ephyr::broker::audit::query::Filter::default();
    let mut o = cli::audit::QueryOptions { follow: true, last: Some(10), color: color_default(), json: false };
    while let Some(arg) = p.next()? {
        let arg = Opt::from(arg);
        if let Opt::Long(n) = &arg
            && filter_arg(p, n, &mut f)?
        {
            continue;
        }
        match &arg {
            Opt::Long(n) if n == "data-dir" => data_dir = path(p.value()?),
            Opt::Long(n) if n == "last" => {
                let v = p.value()?.string()?;
                o.last = Some(v.parse().map_err(|_| usage(format!("--last {v:?}: a number of events")))?);
            }
            Opt::Long(n) if n == "json" => o.json = true,
            Opt::Long(n) if n == "color" => o.color = true,
            Opt::Long(n) if n == "no-color" => o.color = false,
            Opt::Long(n) if n == "help" => return help(MONITOR_HELP),
            Opt::Short('h') => return help(MONITOR_HELP),
            other => return Err(other.unexpected()),
        }
    }
    cli::audit::query_cmd(&data_dir, &[], &f, &o).map(|c| c as u8).map_err(|e| Failure::Run(1, e))
}

fn cmd_audit(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let sub = match p.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("help") | Short('h')) | None => return help(AUDIT_HELP),
        Some(other) => return Err(other.unexpected().into()),
    };
    let mut data_dir = PathBuf::from(DEFAULT_DATA_DIR);
    let mut files = Vec::new();
    let (mut socket, mut key) = (None, None);
    let mut o = cli::audit::QueryOptions::default();
    let mut f = ephyr::broker::audit::query::Filter::default();
    while let Some(arg) = p.next()? {
        let arg = Opt::from(arg);
        if let Opt::Long(n) = &arg
            && sub == "query"
            && filter_arg(p, n, &mut f)?
        {
            continue;
        }
        match arg {
            Opt::Long(n) if n == "data-dir" => data_dir = path(p.value()?),
            Opt::Long(n) if n == "json" => o.json = true,
            Opt::Long(n) if n == "socket" => socket = Some(path(p.value()?)),
            Opt::Long(n) if n == "public-key" && sub == "verify" => key = Some(p.value()?.string()?),
            Opt::Long(n) if n == "follow" && sub == "query" => o.follow = true,
            Opt::Short('f') if sub == "query" => o.follow = true,
            Opt::Long(n) if n == "help" => return sub_help(AUDIT_HELP, "audit", &sub),
            Opt::Short('h') => return sub_help(AUDIT_HELP, "audit", &sub),
            Opt::Value(v) => files.push(path(v)),
            other => return Err(other.unexpected()),
        }
    }
    let r = match sub.as_str() {
        "verify" => cli::audit::verify_cmd(&cli::audit::VerifyOptions {
            files,
            socket: cli::client::socket_path(socket, Some(&data_dir)),
            data_dir,
            public_key: key,
            json: o.json,
        }),
        "query" => cli::audit::query_cmd(&data_dir, &files, &f, &o),
        other => return Err(usage(format!("unknown audit command {other:?} (verify, query)"))),
    };
    r.map(|c| c as u8).map_err(|e| Failure::Run(1, e))
}

const RECORDING_HELP: &str = "\
Usage: ephyr recording <list|show|play> ...

  ephyr recording list [--data-dir DIR] [--json]
      Every recording of an SSH command (one-shot or on a session), oldest first, with the
      agent, target, role, command and exit code from its audit line, and whether its SHA-256
      matches that line (ok, TAMPERED, unaudited). Exit 1 if any does not match.
  ephyr recording show ID [--data-dir DIR] [--json]
      The recording's output, after checking it against its audit line (exit 1 if it was
      changed or has none).
  ephyr recording play ID [--data-dir DIR] [--speed N] [--max-pause SECS]
      The same, with the recorded timing (pauses capped at --max-pause, default 2).";

fn cmd_recording(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let sub = match p.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("help") | Short('h')) | None => return help(RECORDING_HELP),
        Some(other) => return Err(other.unexpected().into()),
    };
    let mut data_dir = PathBuf::from(DEFAULT_DATA_DIR);
    let mut o = cli::recording::Options { sub: sub.clone(), speed: 1.0, max_pause: 2.0, ..Default::default() };
    let number = |v: String, what: &str| -> Result<f64, Failure> {
        v.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n > 0.0)
            .ok_or_else(|| usage(format!("{what} must be a positive number, not {v:?}")))
    };
    while let Some(arg) = p.next()? {
        match arg {
            Long("data-dir") => data_dir = path(p.value()?),
            Long("json") => o.json = true,
            Long("speed") if sub == "play" => o.speed = number(p.value()?.string()?, "--speed")?,
            Long("max-pause") if sub == "play" => o.max_pause = number(p.value()?.string()?, "--max-pause")?,
            Long("help") | Short('h') => return sub_help(RECORDING_HELP, "recording", &sub),
            Value(v) if o.id.is_none() && sub != "list" => o.id = Some(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    if !matches!(sub.as_str(), "list" | "show" | "play") {
        return Err(usage(format!("unknown recording command {sub:?} (list, show, play)")));
    }
    cli::recording::run(&data_dir, &o).map(|c| c as u8).map_err(|e| Failure::Run(3, e))
}

const SHIM_HELP: &str = "\
Usage: ephyr shim --target NAME --ca FILE [--state DIR]

Runs on a target that verifies commands itself (`verify_on_target: true`), as sshd's forced
command for the role users (the target setup script installs it). Runs the command in
SSH_ORIGINAL_COMMAND only if it comes with an exec envelope the broker's signer signed for
this target and user, not expired and not used before here (nonces in DIR, default
~/.ephyr-shim). Otherwise nothing runs: exit 126 and the reason on stderr.";

const ISOLATE_HELP: &str = "\
Usage: ephyr isolate [--config POLICY] [--uid UID]... [--gid GID]... [--port PORT]... [--apply | --remove]

Agents that run on this machine as local users must reach targets and services only through
the broker. Prints nftables rules (table inet ephyr_isolate) under which the traffic of the
agent uids and gids may leave only to the broker's ports on loopback (default 8554); anything
else is refused at once (TCP reset, ICMP administratively prohibited). The broker's own user,
root and everyone else are not affected; the broker's Unix socket is not network traffic.

Options:
  --config FILE   add every agents.NAME.uid of this policy
  --uid UID       an agent's uid (repeatable)
  --gid GID       every member of this group (repeatable)
  --port PORT     a broker port agents may reach on loopback (repeatable; default 8554)
  --apply         load the rules now (nft -f -; replaces an earlier copy in one transaction)
  --remove        delete the rules";

fn cmd_isolate(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = cli::isolate::IsolateOptions::default();
    let number = |p: &mut lexopt::Parser, what: &str| -> Result<u32, Failure> {
        let v = p.value()?.string()?;
        v.parse().map_err(|_| usage(format!("{what} must be a number, not {v:?}")))
    };
    while let Some(arg) = p.next()? {
        match arg {
            Long("config") => o.config = Some(path(p.value()?)),
            Long("uid") => o.uids.push(number(p, "--uid")?),
            Long("gid") => o.gids.push(number(p, "--gid")?),
            Long("port") => {
                let n = number(p, "--port")?;
                o.ports.push(u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| usage("--port is 1 to 65535"))?);
            }
            Long("apply") => o.apply = true,
            Long("remove") => o.remove = true,
            Long("help") | Short('h') => return help(ISOLATE_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    cli::isolate::run(&o).map_err(|e| Failure::Run(1, e))
}

fn cmd_shim(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = ephyr::shim::Options::default();
    while let Some(arg) = p.next()? {
        match arg {
            Long("target") => o.target = p.value()?.string()?,
            Long("ca") => o.ca = path(p.value()?),
            Long("state") => o.state = Some(path(p.value()?)),
            Long("help") | Short('h') => return help(SHIM_HELP),
            other => return Err(other.unexpected().into()),
        }
    }
    if o.target.is_empty() || o.ca.as_os_str().is_empty() {
        return Err(usage("ephyr shim needs --target and --ca"));
    }
    let why = ephyr::shim::run(&o);
    eprintln!("ephyr shim: {why}");
    Ok(ephyr::shim::REFUSED as u8)
}

fn cmd_keygen(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    match p.next()? {
        Some(Value(v)) if v == "agent" => {}
        Some(Long("help") | Short('h')) => return help(KEYGEN_HELP),
        _ => return Err(usage("expected `ephyr keygen agent NAME`")),
    }
    let (mut name, mut json) = (None, false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("json") => json = true,
            Long("help") | Short('h') => return help(KEYGEN_HELP),
            Value(v) if name.is_none() => name = Some(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let name = name.ok_or_else(|| usage("keygen agent needs a NAME"))?;
    cli::policy::keygen_agent(&name, json).map(|c| c as u8).map_err(|e| Failure::Run(3, e))
}

fn cmd_approvals(p: &mut lexopt::Parser, cmd: &str) -> Result<u8, Failure> {
    let (mut socket, mut data_dir, mut json, mut words) = (None, None, false, Vec::new());
    let (mut all, mut follow, mut reason, mut waive) = (false, false, String::new(), None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("json") => json = true,
            Long("all") if cmd == "approvals" => all = true,
            Long("follow") | Short('f') if cmd == "approvals" => follow = true,
            Long("reason") if cmd != "approvals" => reason = p.value()?.string()?,
            Long("waive") if cmd == "approve" => waive = Some(p.value()?.string()?),
            Long("help") | Short('h') => return help(APPROVALS_HELP),
            Value(v) => words.push(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let sock = cli::client::socket_path(socket, data_dir.as_deref());
    let r = match (cmd, words.as_slice()) {
        ("approvals", []) => cli::approvals::list(&sock, all, json, follow),
        ("approvals", _) => return Err(usage("approvals takes no arguments")),
        ("deny", [_]) if reason.trim().is_empty() => {
            return Err(usage("deny needs --reason TEXT (the agent is told it)"));
        }
        (_, [id]) => cli::approvals::decide(&sock, id, cmd == "approve", &reason, waive.as_deref(), json),
        _ => return Err(usage(format!("expected `ephyr {cmd} ID`"))),
    };
    r.map(|()| 0).map_err(|e| Failure::Run(1, e))
}

fn cmd_agent(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let (mut socket, mut data_dir, mut json, mut reason, mut words) = (None, None, false, String::new(), Vec::new());
    let (mut template, mut owner, mut name, mut ttl, mut apply) = (None, None, None, None, false);
    let (mut url, mut token_file, mut out, mut key_out, mut attestation) = (None, None, None, None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("json") => json = true,
            Long("reason") => reason = p.value()?.string()?,
            Long("template") => template = Some(p.value()?.string()?),
            Long("owner") => owner = Some(p.value()?.string()?),
            Long("name") => name = Some(p.value()?.string()?),
            Long("ttl") => ttl = Some(p.value()?.string()?),
            Long("apply") => apply = true,
            Long("url") => url = Some(p.value()?.string()?),
            Long("token-file") => token_file = Some(path(p.value()?)),
            Long("out") => out = Some(path(p.value()?)),
            Long("key-out") => key_out = Some(path(p.value()?)),
            Long("attestation-file") => attestation = Some(path(p.value()?)),
            Long("help") | Short('h') => return help(AGENT_HELP),
            Value(v) => words.push(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let sock = cli::client::socket_path(socket, data_dir.as_deref());
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let r = match words.as_slice() {
        [] | ["list"] => cli::agent::list(&sock, json),
        ["show", n] => cli::agent::show(&sock, n, json),
        ["enroll"] => match (&template, &owner) {
            (Some(t), Some(o)) => cli::agent::enroll(&sock, t, o, name.as_deref(), ttl.as_deref(), json),
            _ => return Err(usage("enroll needs --template T and --owner OPERATOR")),
        },
        ["join"] => match &url {
            Some(_) if out.is_some() && key_out.is_some() => {
                return Err(usage("join takes --out (an API key) or --key-out (a key pair), not both"));
            }
            Some(u) => {
                cli::agent::join(u, token_file.as_deref(), out.as_deref(), key_out.as_deref(), attestation.as_deref())
            }
            None => return Err(usage("join needs --url http://BROKER:8554")),
        },
        [verb @ ("suspend" | "resume" | "revoke"), n] => cli::agent::transition(&sock, verb, n, &reason, json),
        ["reap"] => cli::agent::reap(&sock, apply, json),
        _ => {
            return Err(usage(
                "expected `ephyr agent list|show NAME|enroll|join|suspend NAME|resume NAME|revoke NAME|reap`",
            ));
        }
    };
    r.map(|()| 0).map_err(|e| Failure::Run(1, e))
}

fn cmd_freeze(p: &mut lexopt::Parser, cmd: &str) -> Result<u8, Failure> {
    let (mut socket, mut data_dir, mut json, mut reason, mut words) = (None, None, false, String::new(), Vec::new());
    while let Some(arg) = p.next()? {
        match arg {
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("json") => json = true,
            Long("reason") if cmd == "freeze" => reason = p.value()?.string()?,
            Long("help") | Short('h') => return help(FREEZE_HELP),
            Value(v) => words.push(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let sock = cli::client::socket_path(socket, data_dir.as_deref());
    let r = match (cmd, words.as_slice()) {
        ("freezes", []) => cli::freeze::list(&sock, json),
        ("freezes", _) => return Err(usage("freezes takes no arguments")),
        (_, [kind, name]) => cli::freeze::set(&sock, kind, name, &reason, cmd == "freeze", json),
        _ => {
            return Err(usage(format!(
                "expected `ephyr {cmd} KIND NAME` (KIND: agent, task, target, service, remote)"
            )));
        }
    };
    r.map(|()| 0).map_err(|e| Failure::Run(1, e))
}

fn cmd_operator(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    match p.next()? {
        Some(Value(v)) if v == "add" => {}
        Some(Long("help") | Short('h')) | None => return help(OPERATOR_HELP),
        _ => return Err(usage("expected `ephyr operator add NAME`")),
    }
    let (mut name, mut role, mut generate) = (None, "viewer".to_owned(), false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("role") => role = p.value()?.string()?,
            Long("generate") => generate = true,
            Long("help") | Short('h') => return help(OPERATOR_HELP),
            Value(v) if name.is_none() => name = Some(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let name = name.ok_or_else(|| usage("operator add needs a NAME"))?;
    cli::policy::operator_add(&name, &role, generate).map(|c| c as u8).map_err(|e| Failure::Run(3, e))
}

fn cmd_secret(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let sub = match p.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("help") | Short('h')) | None => return help(SECRET_HELP),
        Some(other) => return Err(other.unexpected().into()),
    };
    let (mut socket, mut data_dir, mut name, mut json) = (None, None, None, false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("socket") => socket = Some(path(p.value()?)),
            Long("data-dir") => data_dir = Some(path(p.value()?)),
            Long("json") if sub == "list" => json = true,
            Long("help") | Short('h') => return sub_help(SECRET_HELP, "secret", &sub),
            Value(v) if name.is_none() && sub != "list" => name = Some(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let socket = cli::client::socket_path(socket, data_dir.as_deref());
    let need = |n: Option<String>| n.ok_or_else(|| usage(format!("secret {sub} needs a NAME")));
    let r = match sub.as_str() {
        "set" => cli::secret::set(&socket, &need(name)?),
        "rm" => cli::secret::remove(&socket, &need(name)?),
        "list" => cli::secret::list(&socket, json),
        other => return Err(usage(format!("unknown `secret {other}`; expected set, list or rm"))),
    };
    r.map(|()| 0).map_err(|e| Failure::Run(1, e))
}

fn cmd_inspect(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut o = cli::inspect::InspectOptions::default();
    let mut token = None;
    while let Some(arg) = p.next()? {
        match arg {
            Long("json") => o.json = true,
            Long("root-key-file") => o.root_key_file = Some(path(p.value()?)),
            Long("help") | Short('h') => return help(INSPECT_HELP),
            Value(v) if token.is_none() => token = Some(v.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    o.token = token.ok_or_else(|| usage("inspect needs a token (or - to read it from stdin)"))?;
    cli::inspect::run(&o).map(|c| c as u8).map_err(|e| Failure::Run(1, e))
}

/// The signer keeper, started by the broker (not for interactive use).
fn cmd_signer(p: &mut lexopt::Parser) -> Result<u8, Failure> {
    let mut a = SignerArgs {
        data_dir: None,
        generate_missing_keys: false,
        target: None,
        config: SignerConfig {
            max_cert_ttl_secs: 3600,
            principals: Default::default(),
            rate_limit: 600,
            rate_window_secs: 60,
            sealed: Default::default(),
        },
        insecure_no_sandbox: false,
        self_check: false,
    };
    let (mut uid, mut gid): (Option<u32>, Option<u32>) = (None, None);
    let mut ephemeral = false;
    while let Some(arg) = p.next()? {
        match arg {
            Long("data-dir") => a.data_dir = Some(path(p.value()?)),
            Long("ephemeral-keys") => ephemeral = true,
            Long("generate-missing-keys") => a.generate_missing_keys = true,
            Long("uid") => uid = Some(p.value()?.parse()?),
            Long("gid") => gid = Some(p.value()?.parse()?),
            Long("max-cert-ttl") => a.config.max_cert_ttl_secs = p.value()?.parse()?,
            Long("rate-limit") => a.config.rate_limit = p.value()?.parse()?,
            Long("rate-window") => a.config.rate_window_secs = p.value()?.parse()?,
            Long("principal") => {
                a.config.principals.insert(p.value()?.string()?);
            }
            Long("sealed") => {
                let v = p.value()?.string()?;
                let parsed = v.split_once('=').and_then(|(name, b64)| {
                    let json = data_encoding::BASE64URL_NOPAD.decode(b64.as_bytes()).ok()?;
                    Some((name.to_owned(), serde_json::from_slice(&json).ok()?))
                });
                let (name, t) = parsed.ok_or_else(|| usage("--sealed takes NAME=BASE64URL(JSON)"))?;
                a.config.sealed.insert(name, t);
            }
            Long("insecure-no-sandbox") => a.insecure_no_sandbox = true,
            Long("self-check") => a.self_check = true,
            other => return Err(other.unexpected().into()),
        }
    }
    if ephemeral == a.data_dir.is_some() {
        return Err(usage("__signer needs exactly one of --data-dir or --ephemeral-keys"));
    }
    a.target = match (uid, gid) {
        (Some(uid), Some(gid)) => Some(TargetIds { uid, gid }),
        (None, None) => None,
        _ => return Err(usage("--uid and --gid go together")),
    };
    Ok(ephyr::signer::run(a).clamp(0, 255) as u8)
}
