#!/usr/bin/env python3
"""Soak: a real `ephyr serve` under a mixed load for a long time, with flat memory and no errors.

Usage: scripts/soak.py [--bin PATH] [--minutes 30] [--clients 64] [--feeds 2] [--png docs/soak.png]
                       [--rss-tolerance-kb 8192] [--fd-tolerance 16]

Starts, as root: an OpenSSH sshd on loopback trusting the broker's CA, nginx and the test
suite's streaming upstream (tests/helpers/upstream.py) as HTTP upstreams, and
`@modelcontextprotocol/server-everything` (tests/peers) as a federated remote; then the broker.
`--clients` threads each keep one connection and loop over a weighted mix:
  tools/call list_targets 30 %, task create → delegate → revoke 15 %, one-shot exec on sshd 10 %,
  exec on the client's own kept SSH session 10 %, proxied GET through /v1/proxy 20 %,
  proxied event stream 5 %, federated tools/call (server-everything's echo) 10 %.
Besides them, --feeds operators (viewer role, signed in to the console once) each keep the console's
live audit feed (GET /events/audit) open, reading it for 20 s at a time, then close it and open a
new one: a feed that cannot open, or brings no audit line in a 20-s turn, counts as an error.
Every answer is checked (a JSON-RPC result without isError, an HTTP 200 with the upstream's
body). Every 5 s it samples the broker's VmRSS and open descriptors.

The state the load leaves behind lives 3 minutes (tasks, revoked ones too, and certificates are
kept until they expire), so with the default 30 minutes it is in its steady state before warm-up
ends. Pass: no unexpected error, and no ERROR line in the broker's log (kept in a file; a pipe
nobody reads would fill up and block it); after warm-up (the first fifth of the run) RSS stays within
--rss-tolerance-kb of its value at the end of warm-up and the descriptors within --fd-tolerance;
`ephyr audit verify` passes on the data dir after a clean stop. Writes a CSV of 10-s windows
(p50, p99, RSS, fds) next to the PNG, which gnuplot draws. What is missing of sshd, nginx and
gnuplot is installed with apt first. Exit 0 on a pass. Figures and the runs: docs/RELIABILITY.md.
"""
import argparse, http.client, json, os, random, shutil, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "perf"))
from lab import free_port, rss_kib, run, start_nginx, start_sshd, wait_port  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
USER = "ephyrt-read"
MIX = [("list_targets", 30), ("task_tree", 15), ("exec_oneshot", 10), ("exec_session", 10),
       ("proxy_get", 20), ("proxy_stream", 5), ("federated", 10)]


def proc_sample(pid):
    return rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd"))


class Client:
    """One agent connection (kept alive), reconnecting after the server closes it."""

    def __init__(self, port, key):
        self.port, self.key, self.conn = port, key, None

    def request(self, method, path, body=None, headers=None):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server closed while idle: one retry on a new one.
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def call(self, tool, args, credential=None):
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": tool, "arguments": args, "_meta": META}})
        st, data = self.request("POST", "/mcp", body, {
            "Authorization": f"Bearer {credential or self.key}", "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
            "Mcp-Method": "tools/call", "Mcp-Name": tool})
        if st != 200:
            raise AssertionError(f"{tool}: HTTP {st} {data[:200]!r}")
        msg = json.loads(data)
        if "error" in msg:
            raise AssertionError(f"{tool}: {msg['error']}")
        res = msg["result"]
        if res.get("isError"):
            raise AssertionError(f"{tool}: {res['content'][0]['text'][:300]}")
        if res.get("structuredContent"):
            return res["structuredContent"]
        text = res["content"][0]["text"] if res.get("content") else ""
        try:
            return json.loads(text)
        except ValueError:
            return {"text": text}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--feeds", type=int, default=2, help="console live audit feeds held open")
    ap.add_argument("--png", default="docs/soak.png")
    ap.add_argument("--rss-tolerance-kb", type=int, default=8192)
    ap.add_argument("--fd-tolerance", type=int, default=16)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak.py: run as root (sshd, the broker's privilege drop)")
    binary = os.path.abspath(a.bin)
    # What the load needs from Debian (a fresh machine has none of it).
    missing = [pkg for exe, pkg in [("/usr/sbin/sshd", "openssh-server"), ("/usr/sbin/nginx", "nginx-light"),
                                    ("/usr/bin/gnuplot", "gnuplot-nox")] if not os.path.exists(exe)]
    if missing:
        print(f"soak.py: installing {' '.join(missing)}", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
        run("useradd", "-m", "-s", "/bin/sh", USER)
        run("usermod", "-p", "*", USER)
    work = tempfile.mkdtemp(prefix="ephyr-soak-")
    os.chmod(work, 0o755)
    procs = []
    try:
        data, etc = os.path.join(work, "data"), os.path.join(work, "etc")
        run(binary, "init", "--data-dir", data, "--config-dir", etc)
        # sshd trusting the broker's CA.
        sshd, sport, fp = start_sshd(work, f"{data}/keys/ca_key.pub")
        procs.append(sshd)
        # HTTP upstreams and the remote MCP server.
        nginx, nport = start_nginx(work, 1)
        procs.append(nginx)
        up = subprocess.Popen(["python3", os.path.join(REPO, "tests/helpers/upstream.py"), "serve"],
                              stdout=subprocess.PIPE, text=True)
        procs.append(up)
        uport = int(up.stdout.readline().split()[1])
        peers = os.path.join(REPO, "tests/peers")
        eport = free_port()
        procs.append(subprocess.Popen(
            [os.path.join(peers, "node_modules/node/bin/node"),
             "node_modules/@modelcontextprotocol/server-everything/dist/index.js", "streamableHttp"],
            cwd=peers, env=dict(os.environ, PORT=str(eport)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(eport, 30)
        k = json.loads(run(binary, "keygen", "agent", "soak", "--json").stdout)
        op_pw = "soak viewer passphrase"
        op_hash = next(ln.split(": ", 1)[1] for ln in subprocess.run(
            [binary, "operator", "add", "watcher", "--role", "viewer"], input=op_pw, capture_output=True,
            text=True, check=True).stdout.splitlines() if ln.strip().startswith("password_hash: "))
        policy = f"""limits: {{max_certs_total: 100000, signer_rate: 1000000/1m, cert_ttl_max: 30m, cert_ttl_default: 3m}}
network: {{ allow: [127.0.0.1/32] }}
roles:
  read: {{principal: {USER}}}
targets:
  local: {{host: 127.0.0.1, port: {sport}, allowed_roles: [read], host_key_fingerprint: "{fp}"}}
services:
  fast: {{ url: "http://127.0.0.1:{nport}", credential: {{ type: bearer, secret: "env:SOAK_TOKEN" }} }}
  sse: {{ url: "http://127.0.0.1:{uport}", credential: {{ type: bearer, secret: "env:SOAK_TOKEN" }} }}
remotes:
  ev: {{ url: "http://127.0.0.1:{eport}/mcp" }}
operators:
  watcher: {{ role: viewer, password_hash: {op_hash} }}
agents:
  soak:
    api_key_hash: "{k['api_key_hash']}"
    ssh: {{local: {{roles: [read]}}}}
    services: {{ "*": {{}} }}
    remotes: {{ ev: {{}} }}
    can_delegate: true
    max_concurrent_certs: 100000
    rate_limit: 100000000/1s
"""
        path = os.path.join(etc, "soak.yaml")
        with open(path, "w") as f:
            f.write(policy)
        os.chmod(path, 0o644)
        port, dport = free_port(), free_port()
        # The broker's log goes to a file: a pipe nobody reads until the end fills up and blocks it.
        log_path = os.path.join(work, "broker.log")
        log_file = open(log_path, "wb")
        broker = subprocess.Popen(
            [binary, "serve", "--config", path, "--data-dir", data, "--listen", f"127.0.0.1:{port}",
             "--dashboard-listen", f"127.0.0.1:{dport}", "--socket", os.path.join(work, "ephyr.sock")],
            stdout=subprocess.DEVNULL, stderr=log_file,
            env={**os.environ, "EPHYR_LOG": "warn", "SOAK_TOKEN": "sk-soak-secret"})
        procs.append(broker)
        wait_port(port, 30)
        wait_port(nport, 30)
        key = k["api_key"]
        # The broker reads the remote's tools on first use; the load starts once they are served.
        probe, last = Client(port, key), None
        for _ in range(60):
            try:
                probe.call("ev.echo", {"message": "ready"})
                break
            except Exception as e:  # noqa: BLE001 - reported below when it never works
                last = e
                time.sleep(0.5)
        else:
            st = run(binary, "status", "--socket", os.path.join(work, "ephyr.sock")).stdout
            sys.exit(f"soak.py: the remote never served ev.echo ({last}):\n{st}")

        samples, errors, lock = [], [], threading.Lock()
        t0 = time.time()
        end = t0 + a.minutes * 60
        kinds = [k for k, w in MIX for _ in range(w)]

        def client(i):
            c, rng = Client(port, key), random.Random(i)
            session = None
            while time.time() < end:
                kind = rng.choice(kinds)
                start = time.perf_counter()
                try:
                    if kind == "list_targets":
                        c.call("list_targets", {})
                    elif kind == "task_tree":
                        t = c.call("task_create", {"description": "soak", "ttl": "3m", "can_delegate": True})
                        c.call("task_delegate", {"description": "child", "ttl": "2m"}, credential=t["token"])
                        r = c.call("task_revoke", {"task_id": t["task_id"]})
                        assert r["cascade_count"] >= 1, r
                    elif kind == "exec_oneshot":
                        r = c.call("exec", {"target": "local", "role": "read", "command": "echo one"})
                        assert r.get("exit_code", 0) == 0 and "one" in json.dumps(r), r
                    elif kind == "exec_session":
                        if session is None:
                            session = c.call("session_create", {"target": "local", "role": "read"})["session_id"]
                        r = c.call("exec", {"session_id": session, "command": "echo kept"})
                        assert "kept" in json.dumps(r), r
                    elif kind == "proxy_get":
                        st, body = c.request("GET", "/v1/proxy/fast/", headers={"Authorization": f"Bearer {key}"})
                        assert st == 200 and body == b"ok", (st, body[:200])
                    elif kind == "proxy_stream":
                        st, body = c.request("GET", "/v1/proxy/sse/sse?n=3&delay=0",
                                             headers={"Authorization": f"Bearer {key}"})
                        assert st == 200 and body.count(b"data: tok") == 3 and b"[DONE]" in body, (st, body[:200])
                    else:
                        r = c.call("ev.echo", {"message": f"soak {i}"})
                        assert f"soak {i}" in json.dumps(r), r
                    ok = True
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    ok = False
                    with lock:
                        errors.append((time.time() - t0, kind, repr(e)[:300]))
                    if c.conn:
                        c.conn.close()
                        c.conn = None
                with lock:
                    samples.append((time.time() - t0, kind, (time.perf_counter() - start) * 1000, ok))

        feed_lines, feed_skipped, signins = [0] * a.feeds, [0] * a.feeds, [0] * a.feeds

        def feed(i):
            # One operator at the console: sign in, hold the live audit feed for 20 s, start over.
            origin, cookie = f"http://127.0.0.1:{dport}", None
            while time.time() < end:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", dport, timeout=30)
                    if cookie is None:
                        c.request("POST", "/login", body=f"name=watcher&password={op_pw.replace(' ', '+')}",
                                  headers={"Origin": origin, "Content-Type": "application/x-www-form-urlencoded"})
                        r = c.getresponse()
                        r.read()
                        cookie = (r.getheader("set-cookie") or "").split(";")[0]
                        assert r.status == 303 and cookie, f"sign-in: HTTP {r.status}"
                        signins[i] += 1
                    c.request("GET", "/events/audit", headers={"Cookie": cookie})
                    r = c.getresponse()
                    assert r.status == 200, f"feed: HTTP {r.status} {r.read(200)!r}"
                    opened, got = time.time(), 0
                    turn_end = min(end, opened + 20)
                    while time.time() < turn_end:
                        line = r.readline()
                        assert line, "the feed ended while the broker was running"
                        if line.startswith(b"data: {"):
                            json.loads(line[6:])
                            got += 1
                        if line.startswith(b"event: skipped"):
                            feed_skipped[i] += 1  # a reader that fell behind: documented, counted
                    c.close()
                    assert got > 0 or turn_end - opened < 5, "a 20-s turn of the feed brought no audit line"
                    feed_lines[i] += got
                except Exception as e:  # noqa: BLE001 - counted and reported like the clients' failures
                    cookie = None  # sign in again
                    with lock:
                        errors.append((time.time() - t0, "console_feed", repr(e)[:300]))
                    time.sleep(1)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
        threads += [threading.Thread(target=feed, args=(i,), daemon=True) for i in range(a.feeds)]
        for t in threads:
            t.start()
        res = []
        while time.time() < end:
            rss, fds = proc_sample(broker.pid)
            res.append((time.time() - t0, rss, fds))
            time.sleep(5)
        for t in threads:
            t.join(120)
        broker.terminate()
        stopping = time.time()
        try:
            code = broker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            broker.kill()
            code = f"no exit within 60 s of SIGTERM (killed; {broker.wait()})"
        stop_s = time.time() - stopping
        log_file.close()
        with open(log_path, "rb") as f:
            err_text = f.read().decode(errors="replace")
        log_lines = err_text.splitlines()
        verify = subprocess.run([binary, "audit", "verify", "--json", "--data-dir", data], capture_output=True, text=True)

        # Windows of 10 s: p50/p99 over all calls, per-kind p99, RSS and fds.
        dur = a.minutes * 60
        rows = []
        for w in range(int(dur // 10)):
            lo, hi = w * 10, w * 10 + 10
            lat = sorted(s[2] for s in samples if lo <= s[0] < hi and s[3])
            r = [x for x in res if lo <= x[0] < hi]
            if not lat:
                continue
            p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
            rows.append((hi, len(lat) / 10, p(0.5), p(0.99), r[-1][1] / 1024 if r else "", r[-1][2] if r else ""))
        csv = os.path.splitext(a.png)[0] + ".csv"
        os.makedirs(os.path.dirname(os.path.abspath(a.png)), exist_ok=True)
        with open(csv, "w") as f:
            f.write("t_s,calls_per_s,p50_ms,p99_ms,rss_mib,fds\n")
            for row in rows:
                f.write(",".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in row) + "\n")
        plot(csv, a.png, a.minutes, a.clients)

        warm = [x for x in res if x[0] >= dur / 5]
        base_rss, base_fd = warm[0][1], warm[0][2]
        rss_span = max(x[1] for x in warm) - base_rss
        fd_span = max(x[2] for x in warm) - base_fd
        total = len(samples)
        per_kind = {k: [s[2] for s in samples if s[1] == k and s[3]] for k, _ in MIX}
        print(f"soak: {a.minutes:g} min, {a.clients} clients, {total} calls ({total / dur:.0f}/s), {len(errors)} errors")
        for kname, lat in per_kind.items():
            if lat:
                lat.sort()
                print(f"  {kname:13} {len(lat):8} calls  p50 {statistics.median(lat):7.1f} ms  "
                      f"p99 {lat[int(0.99 * (len(lat) - 1))]:7.1f} ms")
        if a.feeds:
            print(f"  console live feed: {a.feeds} operators ({sum(signins)} sign-ins), {sum(feed_lines)} audit "
                  f"lines read, {sum(feed_skipped)} skipped notices")
        print(f"  broker RSS: {res[0][1]} KiB at start, {base_rss} KiB after warm-up, max {base_rss + rss_span} KiB "
              f"(+{rss_span} KiB; tolerance {a.rss_tolerance_kb}), {res[-1][1]} KiB at the end")
        print(f"  open descriptors: {base_fd} after warm-up, max {base_fd + fd_span} (+{fd_span}; tolerance "
              f"{a.fd_tolerance}), {res[-1][2]} at the end")
        print(f"  audit verify: exit {verify.returncode}; broker exit {code} {stop_s:.1f} s after SIGTERM; "
              f"{len(log_lines)} lines logged at warn and above; plot {a.png}, data {csv}")
        for ln in log_lines[-5:]:
            print(f"    log: {ln[:200]}")
        failed = []
        if errors:
            by_kind = {}
            for _, kind, text in errors:
                by_kind.setdefault(kind, (0, text))
                by_kind[kind] = (by_kind[kind][0] + 1, by_kind[kind][1])
            failed.append(f"{len(errors)} errors: " + "; ".join(f"{k} ×{n} (first: {t})" for k, (n, t) in by_kind.items()))
        if rss_span > a.rss_tolerance_kb:
            failed.append(f"RSS grew {rss_span} KiB after warm-up")
        if fd_span > a.fd_tolerance:
            failed.append(f"descriptors grew by {fd_span} after warm-up")
        errors_logged = [ln for ln in log_lines if " ERROR " in ln]
        if errors_logged:
            failed.append(f"{len(errors_logged)} ERROR lines in the broker's log (first: {errors_logged[0][:300]})")
        if verify.returncode != 0:
            failed.append(f"audit verify: {verify.stdout[-1000:]}")
        if code != 0:
            failed.append(f"the broker stopped with {code}: {err_text[-1000:]}")
        if failed:
            print("FAIL: " + "; ".join(failed))
            sys.exit(1)
        print("PASS")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def plot(csv, png, minutes, clients):
    script = f"""set terminal pngcairo size 1200,800 font "sans,10"
set output "{png}"
set datafile separator ","
set multiplot layout 2,1 title "ephyr soak: {minutes:g} min, {clients} clients, mixed load (scripts/soak.py)"
set key top left
set xlabel "minutes"
set ylabel "latency (ms)"
set logscale y
plot "{csv}" using ($1/60):3 skip 1 with lines title "p50", "" using ($1/60):4 skip 1 with lines title "p99"
unset logscale y
set ylabel "broker RSS (MiB)"
set y2label "open descriptors"
set y2tics
set yrange [0:*]
set y2range [0:*]
plot "{csv}" using ($1/60):5 skip 1 with lines title "RSS" axes x1y1, "" using ($1/60):6 skip 1 with lines title "fds" axes x1y2
unset multiplot
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


if __name__ == "__main__":
    main()
