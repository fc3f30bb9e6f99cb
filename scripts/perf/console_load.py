#!/usr/bin/env python3
"""The operator console's costs: page timings (server and in Chromium), asset sizes, the live
audit feed's effect on MCP throughput, its memory, and TLS on the listeners.

Usage: scripts/perf/console_load.py [--bin PATH] [--duration S] [--runs N] [--part all|pages|feed|tls]

The broker (all its threads and the signer) is pinned to CPU 0; clients (wrk, Chromium, the
feed readers, the TLS client) run on CPU 1. Run as root on the static release binary.

- pages: each view fetched 50 times over one signed-in session (client-observed ms, p50/p95),
  then loaded 10 times in Debian's Chromium through Playwright: `loadEventEnd` of the navigation
  entry (page ready: HTML, CSS, script, and for the SSH view its reachability fetches started);
  each asset's size raw and gzip -9.
- feed: wrk c=8 on a tools/call that writes an audit line every time (an `exec` with a role the
  agent lacks: denied by authorize, audited, no SSH) with 0 and with 5 live feeds open; lines the feeds received; the broker's VmRSS with 0 feeds and with 5 feeds
  and 20 signed-in sessions.
- tls: full handshakes (new connection, no resumption) and resumed ones (TLS 1.3 ticket) per
  second from one client, the broker's CPU per handshake, and wrk c=8 on GET /healthz over
  keep-alive HTTPS vs plain HTTP (per-request overhead).
"""
import argparse, gzip, http.client, json, os, re, socket, ssl, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import Lab, free_port, wait_port  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--duration", type=int, default=8)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--part", default="all")
a = ap.parse_args()
binary = os.path.abspath(a.bin)
PW = "console load password"
VIEWS = ["/", "/agents", "/tasks", "/ssh", "/remotes", "/audit", "/graphs", "/policy", "/inspect"]
report = {}


def operator_lines():
    out = subprocess.run([binary, "operator", "add", "ops", "--role", "admin"], input=PW, capture_output=True, text=True, check=True).stdout
    h = [l.strip() for l in out.splitlines() if "password_hash" in l][0]
    return f"operators:\n  ops:\n    role: admin\n    {h}\n"


def rss_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def login(port, scheme="http", ctx=None):
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx) if scheme == "https" else http.client.HTTPConnection("127.0.0.1", port)
    body = f"name=ops&password={PW.replace(' ', '+')}"
    c.request("POST", "/login", body=body, headers={"Origin": f"{scheme}://127.0.0.1:{port}", "Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    assert r.status == 303, r.status
    return r.getheader("Set-Cookie").split(";")[0]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def wrk(url, lua, conns=8, duration=None, pid=None):
    """(req/s, non-2xx, broker CPU µs per request when `pid` is given)."""
    c0 = cpu_ticks(pid) if pid else 0
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration or a.duration}s", "--latency"]
    if lua:
        cmd += ["-s", lua]
    out = subprocess.run(cmd + [url], capture_output=True, text=True).stdout
    if "Requests/sec" not in out or " 0 requests in" in out:
        sys.exit(f"wrk got nothing from {url}: {out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    cpu = (cpu_ticks(pid) - c0) / os.sysconf("SC_CLK_TCK") * 1e6 / max(total, 1) if pid else None
    return rps, int(non2xx.group(1)) if non2xx else 0, cpu


os.sched_setaffinity(0, {1})
lab = Lab(binary, "ephyr-console-load-")
try:
    key = lab.agent_key("bench")
    policy = f"""{operator_lines()}roles:
  read: {{principal: nobody}}
  op: {{principal: nobody}}
targets:
  closed: {{host: 127.0.0.1, port: 1, allowed_roles: [read, op]}}
agents:
  bench:
    api_key_hash: "{key['api_key_hash']}"
    ssh: {{"*": {{roles: [read]}}}}
    can_delegate: true
    rate_limit: 100000000/1s
"""
    broker, port, dport = lab.serve(policy, cpu=0)
    wait_port(dport)
    time.sleep(0.5)
    cookie = login(dport)

    if a.part in ("all", "pages"):
        pages = {}
        for v in VIEWS:
            times = []
            c = http.client.HTTPConnection("127.0.0.1", dport)
            for _ in range(50):
                t = time.perf_counter()
                c.request("GET", v, headers={"Cookie": cookie})
                r = c.getresponse()
                body = r.read()
                times.append((time.perf_counter() - t) * 1000)
                assert r.status == 200, (v, r.status)
            pages[v] = {"html_bytes": len(body), "p50_ms": round(pct(times, 50), 3), "p95_ms": round(pct(times, 95), 3)}
        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            ctx = b.new_context()
            name, value = cookie.split("=", 1)
            ctx.add_cookies([{"name": name, "value": value, "domain": "127.0.0.1", "path": "/"}])
            page = ctx.new_page()
            for v in VIEWS:
                ready = []
                for i in range(11):
                    page.goto(f"http://127.0.0.1:{dport}{v}")
                    page.wait_for_load_state("load")
                    nav = page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
                    if i:  # the first load also fetches the assets into the cache
                        ready.append(json.loads(nav)["loadEventEnd"])
                pages[v]["chromium_ready_p50_ms"] = round(statistics.median(ready), 1)
                pages[v]["chromium_ready_max_ms"] = round(max(ready), 1)
            b.close()
        assets = {}
        for path in ["/assets/console.css", "/assets/console.js", "/assets/icon.svg"]:
            c = http.client.HTTPConnection("127.0.0.1", dport)
            c.request("GET", path)
            raw = c.getresponse().read()
            assets[path] = {"bytes": len(raw), "gzip": len(gzip.compress(raw, 9))}
        biggest = max(pages, key=lambda v: pages[v]["html_bytes"])
        report["pages"] = pages
        report["assets"] = assets
        report["assets_gzip_total"] = sum(x["gzip"] for x in assets.values())

    if a.part in ("all", "feed"):
        mcp_headers = {"Authorization": f"Bearer {key['api_key']}", "Content-Type": "application/json",
                       "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
                       "Mcp-Method": "tools/call", "Mcp-Name": "exec"}
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "exec", "arguments": {"target": "closed", "role": "op", "command": "true"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}}
        lua = os.path.join(lab.work, "req.lua")
        with open(lua, "w") as f:
            f.write('wrk.method = "POST"\n' + f"wrk.body = {json.dumps(json.dumps(body))}\n")
            for k, v in mcp_headers.items():
                f.write(f'wrk.headers["{k}"] = "{v}"\n')
        url = f"http://127.0.0.1:{port}/mcp"
        wrk(url, lua, duration=2)
        closed = sorted(wrk(url, lua, pid=broker.pid) for _ in range(a.runs))
        rss0 = rss_of(broker.pid)
        received, skipped = [0] * 5, [0] * 5
        stop = threading.Event()
        socks = []

        def feed(i):
            s = socket.create_connection(("127.0.0.1", dport))
            socks.append(s)
            s.sendall(f"GET /events/audit HTTP/1.1\r\nHost: 127.0.0.1:{dport}\r\nCookie: {cookie}\r\n\r\n".encode())
            s.settimeout(0.5)
            while not stop.is_set():
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                received[i] += chunk.count(b"data: ")
                for m in re.finditer(rb"event: skipped\ndata: (\d+)", chunk):
                    skipped[i] += int(m.group(1))

        threads = [threading.Thread(target=feed, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        sessions = [login(dport) for _ in range(20)]
        time.sleep(1)
        rss5 = rss_of(broker.pid)
        opened = sorted(wrk(url, lua, pid=broker.pid) for _ in range(a.runs))
        stop.set()
        for t in threads:
            t.join()
        report["feed"] = {
            "call": "tools/call exec with a role the agent lacks (denied by authorize, audited)",
            "req_per_s_no_feed_median": round(closed[len(closed) // 2][0]), "runs_no_feed": [round(x[0]) for x in closed],
            "broker_cpu_us_per_req_no_feed": round(closed[len(closed) // 2][2], 1),
            "req_per_s_5_feeds_median": round(opened[len(opened) // 2][0]), "runs_5_feeds": [round(x[0]) for x in opened],
            "broker_cpu_us_per_req_5_feeds": round(opened[len(opened) // 2][2], 1),
            "lines_received_per_feed": received, "lines_skipped_per_feed": skipped,
            "rss_kb_no_feed": rss0, "rss_kb_5_feeds_20_sessions": rss5,
        }
    lab.close()

    if a.part in ("all", "tls"):
        lab = Lab(binary, "ephyr-tls-load-")
        key = lab.agent_key("bench")
        path = os.path.join(lab.etc, "tls.yaml")
        with open(path, "w") as f:
            f.write(f"agents:\n  bench:\n    api_key_hash: \"{key['api_key_hash']}\"\n")
        os.chmod(path, 0o644)
        def start(listen):
            tp, dp = free_port(), free_port()
            cmd = ["taskset", "-c", "0", binary, "serve", "--config", path, "--data-dir", lab.data, "--listen", f"{listen}:{tp}",
                   "--dashboard-listen", f"127.0.0.1:{dp}", "--socket", os.path.join(lab.work, "ephyr.sock")]
            lab.broker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "EPHYR_LOG": "warn"})
            wait_port(tp)
            time.sleep(0.5)
            return tp

        # Plain first (loopback listeners), then TLS (a 0.0.0.0 listener: the local CA).
        pport = start("127.0.0.1")
        plain = sorted(wrk(f"http://127.0.0.1:{pport}/healthz", None, pid=lab.broker.pid) for _ in range(a.runs))
        lab.broker.terminate()
        lab.broker.wait(timeout=10)
        tport = start("0.0.0.0")
        ca = os.path.join(lab.data, "tls", "ca.pem")
        ctx = ssl.create_default_context(cafile=ca)
        pid = lab.broker.pid

        def handshakes(resume):
            n, sess, t_end = 0, None, time.monotonic() + a.duration
            c0 = cpu_ticks(pid)
            t0 = time.perf_counter()
            lat = []
            while time.monotonic() < t_end:
                t = time.perf_counter()
                with socket.create_connection(("127.0.0.1", tport)) as s:
                    with ctx.wrap_socket(s, server_hostname="localhost", session=sess if resume else None) as tls:
                        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        while tls.recv(65536):
                            pass
                        if resume:
                            sess = tls.session
                            if n > 0:
                                assert tls.session_reused, "not resumed"
                lat.append((time.perf_counter() - t) * 1000)
                n += 1
            secs = time.perf_counter() - t0
            hz = os.sysconf("SC_CLK_TCK")
            return {"per_s": round(n / secs), "p50_ms": round(pct(lat, 50), 3),
                    "broker_cpu_us_each": round((cpu_ticks(pid) - c0) / hz * 1e6 / n, 1)}

        full = handshakes(False)
        resumed = handshakes(True)
        # Keep-alive requests: HTTPS vs plain (the same broker's dashboard is plain, loopback).
        https = sorted(wrk(f"https://127.0.0.1:{tport}/healthz", None, pid=pid) for _ in range(a.runs))
        report["tls"] = {
            "full_handshake_plus_request": full, "resumed_handshake_plus_request": resumed,
            "keepalive_https_req_per_s": [round(x[0]) for x in https], "keepalive_plain_req_per_s": [round(x[0]) for x in plain],
            "broker_cpu_us_per_req_https": round(https[len(https) // 2][2], 2),
            "broker_cpu_us_per_req_plain": round(plain[len(plain) // 2][2], 2),
        }
    print(json.dumps(report, indent=1))
finally:
    lab.close()
