#!/usr/bin/env python3
"""SSH exec latency through the broker against a real OpenSSH sshd on loopback, and broker RSS
with many open sessions.

Usage: scripts/perf/ssh_exec.py [--bin PATH] [--runs 50] [--sessions 100] [--sealed] [--files]

Starts an sshd on 127.0.0.1 trusting a fresh broker's CA (user `ephyrt-read`, shell /bin/sh) and
`ephyr serve` on the static release binary, then over MCP (stateless era, API key, one kept-alive
HTTP connection) measures, after 3 warm-up calls each:
  * one-shot `exec` (new key, certificate from the signer, TCP + SSH handshake + auth, `true`);
  * `exec` on a kept session (new channel on the open connection, `true`);
  * `exec` on a kept session in mode "shell" (one shell kept open, the command framed into it);
reporting the median, p10 and p90 of the client-observed time over `--runs` calls, and the
broker's own split (cert_ms = key + signer + connect + auth, ssh_ms = channel + command).
Then opens `--sessions` sessions and reports the broker's VmRSS (and the signer's) before and after.
With `--files`, instead: the file tools over SFTP (each a new certificate and connection, like a
one-shot exec): `file_read` and `file_write` of 4 KiB and of 512 KiB (a write travels in the MCP request, which
mcp.max_request_size caps at 1 MiB by default), and `file_list`.
Run as root (users for sshd, the production privilege drop).
"""
import argparse, http.client, json, os, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import free_port, run, start_sshd  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--runs", type=int, default=50)
ap.add_argument("--sessions", type=int, default=100)
ap.add_argument("--command", default="true")
ap.add_argument("--files", action="store_true", help="measure file_read/file_write/file_list instead")
ap.add_argument("--sealed", action="store_true",
                help="the target verifies commands itself (verify_on_target: ephyr shim as the forced command)")
a = ap.parse_args()
binary = os.path.abspath(a.bin)
USER = "ephyrt-read"


if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
    run("useradd", "-m", "-s", "/bin/sh", USER)
    run("usermod", "-p", "*", USER)

work = tempfile.mkdtemp(prefix="ephyr-ssh-bench-")
os.chmod(work, 0o755)
data, etc = os.path.join(work, "data"), os.path.join(work, "etc")
run(binary, "init", "--data-dir", data, "--config-dir", etc)
sshd, sport, fp = start_sshd(work, f"{data}/keys/ca_key.pub", subsystem_sftp=True)
key_info = json.loads(run(binary, "keygen", "agent", "bench", "--json").stdout)
sealed = ""
if a.sealed:
    shutil.copy(binary, os.path.join(work, "ephyr"))
    shutil.copy(os.path.join(data, "keys", "ca_key.pub"), os.path.join(work, "ca.pub"))
    os.chmod(os.path.join(work, "ca.pub"), 0o644)
    home = run("sh", "-c", f"getent passwd {USER} | cut -d: -f6").stdout.strip()
    run("install", "-d", "-m", "0700", "-o", USER, os.path.join(home, ".ephyr-shim"))
    sealed = (f", verify_on_target: true, shim_path: {work}/ephyr, shim_ca: {work}/ca.pub, "
              f"commands: {{allow: ['{a.command}', 'echo ...']}}")
files_dir = os.path.join(work, "files")
if a.files:
    os.makedirs(files_dir)
    shutil.chown(files_dir, USER)
policy = f"""limits:
  file_max_size: 1MiB
  max_certs_total: 1000
  signer_rate: 100000/1m
  cert_ttl_max: 30m
roles:
  read: {{principal: {USER}}}
targets:
  local: {{host: 127.0.0.1, port: {sport}, allowed_roles: [read], host_key_fingerprint: "{fp}"{sealed}}}
agents:
  bench:
    api_key_hash: "{key_info['api_key_hash']}"
    ssh: {{local: {{roles: [read]}}}}
    max_concurrent_certs: 1000
    rate_limit: 100000000/1s
"""
policy_path = os.path.join(etc, "bench.yaml")
with open(policy_path, "w") as f:
    f.write(policy)
os.chmod(policy_path, 0o644)
port, dport = free_port(), free_port()
broker = subprocess.Popen(
    [binary, "serve", "--config", policy_path, "--data-dir", data, "--listen", f"127.0.0.1:{port}",
     "--dashboard-listen", f"127.0.0.1:{dport}", "--socket", os.path.join(work, "ephyr.sock")],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "EPHYR_LOG": "warn"},
)
conn = None


def call(tool, args):
    global conn
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": tool, "arguments": args,
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}}
    headers = {"Authorization": f"Bearer {key_info['api_key']}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
               "Mcp-Method": "tools/call", "Mcp-Name": tool}
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/mcp", body=json.dumps(body), headers=headers)
    r = conn.getresponse()
    v = json.loads(r.read())
    res = v["result"]
    if res.get("isError"):
        raise SystemExit(f"{tool} failed: {res['content'][0]['text']}")
    return json.loads(res["content"][0]["text"])


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid):
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def summary(name, samples, splits):
    samples.sort()
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))]
    print(f"{name}: median {statistics.median(samples):.2f} ms  p10 {q(0.1):.2f}  p90 {q(0.9):.2f}  "
          f"(n={len(samples)}; broker split median: " +
          ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in splits.items()) + ")")


try:
    deadline = time.time() + 20
    while True:
        try:
            call("list_targets", {})
            break
        except (ConnectionError, OSError, KeyError):
            conn = None
            if time.time() > deadline:
                raise SystemExit("broker did not start: " + broker.stderr.read1().decode())
            time.sleep(0.05)
    if a.files:
        base = {"target": "local", "role": "read"}
        for size in (4096, 512 << 10):
            path = os.path.join(files_dir, f"f{size}")
            content = "x" * size
            for label, tool, args in [
                (f"file_write {size} B", "file_write", {**base, "path": path, "content": content}),
                (f"file_read {size} B", "file_read", {**base, "path": path}),
            ]:
                for _ in range(3):
                    call(tool, args)
                samples = []
                for _ in range(a.runs):
                    t = time.perf_counter()
                    r = call(tool, args)
                    samples.append((time.perf_counter() - t) * 1000)
                    assert r.get("bytes") == size, r
                summary(label, samples, {})
        samples = []
        for _ in range(a.runs):
            t = time.perf_counter()
            call("file_list", {**base, "path": files_dir})
            samples.append((time.perf_counter() - t) * 1000)
        summary("file_list (2 entries)", samples, {})
        raise SystemExit(0)
    for label, mk, mode in [("one-shot exec (new certificate)", lambda: {"target": "local", "role": "read"}, None),
                            ("exec on a kept session", None, "exec"),
                            ("exec on a kept session, mode shell", None, "shell")]:
        args = mk() if mk else {"session_id": call("session_create", {"target": "local", "role": "read",
                                                                      "mode": mode})["session_id"]}
        args["command"] = a.command
        for _ in range(3):
            call("exec", args)
        samples, splits = [], {"cert_ms": [], "ssh_ms": []}
        for _ in range(a.runs):
            t = time.perf_counter()
            r = call("exec", args)
            samples.append((time.perf_counter() - t) * 1000)
            assert r["exit_code"] == 0, r
            for k in splits:
                splits[k].append(r["timings"][k])
        summary(label, samples, splits)
        if not mk:
            call("session_close", {"session_id": args["session_id"]})
    time.sleep(0.5)
    signer = children(broker.pid)
    before = rss(broker.pid)
    opened = [call("session_create", {"target": "local", "role": "read"})["session_id"] for _ in range(a.sessions)]
    time.sleep(0.5)
    after = rss(broker.pid)
    signer_rss = sum(rss(p) for p in signer)
    print(f"broker VmRSS: {before:.2f} MB before, {after:.2f} MB with {len(opened)} open sessions; "
          f"signer processes {signer_rss:.2f} MB")
    r = call("exec", {"session_id": opened[-1], "command": "echo still-alive"})
    assert r["stdout"] == "still-alive\n", r
finally:
    broker.terminate()
    broker.wait(timeout=20)
    sshd.terminate()
    sshd.wait()
    shutil.rmtree(work, ignore_errors=True)
