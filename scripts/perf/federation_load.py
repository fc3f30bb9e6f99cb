#!/usr/bin/env python3
"""Added latency of a federated tools/call: `@modelcontextprotocol/server-everything` over
Streamable HTTP, called directly (its own session) and through a real `ephyr serve` (the
stateless era, an API key), one request at a time.

Usage: scripts/perf/federation_load.py [--bin PATH] [--calls N] [--pin strict|off] [--conc N --duration S]

`echo` is read-only by its pinned definition, so its audit line's sync overlaps the call (it
is still durable before the answer returns); with `--pin off` the hint is not trusted and the
line is synced before the call leaves, as for any tool that may change something.

The broker is pinned to CPU 0, server-everything to CPU 1, the client is this script. Reports
p50/p99 for both paths and the difference, and the broker's VmRSS before and after it connected
to the remote (the memory one connected remote costs). Run as root after scripts/test.sh has
installed tests/peers (npm) and on the static release binary (scripts/build-static.sh).
"""
import argparse, http.client, json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import Lab, free_port, report_threads, stats_delta, thread_stats, wait_port  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--calls", type=int, default=300)
ap.add_argument("--pin", default="strict", choices=["strict", "off"])
ap.add_argument("--conc", type=int, default=0, help="also measure throughput with wrk at this many connections")
ap.add_argument("--duration", type=int, default=10)
a = ap.parse_args()
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
peers = os.path.join(repo, "tests/peers")

sport = free_port()
server = subprocess.Popen(
    ["taskset", "-c", "1", os.path.join(peers, "node_modules/node/bin/node"),
     "node_modules/@modelcontextprotocol/server-everything/dist/index.js", "streamableHttp"],
    cwd=peers, env=dict(os.environ, PORT=str(sport)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
wait_port(sport, 20)

lab = Lab(os.path.abspath(a.bin), "ephyr-fed-")
k = lab.agent_key("bench")
policy = f"""network: {{ allow: [127.0.0.1/32] }}
remotes:
  ev: {{ url: "http://127.0.0.1:{sport}/mcp", pin: {a.pin} }}
agents:
  bench:
    api_key_hash: "{k['api_key_hash']}"
    remotes: {{ ev: {{}} }}
    rate_limit: 100000000/1s
"""
broker, port, _ = lab.serve(policy, cpu=0)


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1])


def post(conn, body, headers):
    conn.request("POST", "/mcp", body=json.dumps(body), headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


def timed(conn, body, headers, n):
    out = []
    for i in range(n):
        body["id"] = i + 2
        t = time.perf_counter()
        st, _, data = post(conn, body, headers)
        out.append((time.perf_counter() - t) * 1e6)
        assert st == 200 and b"hello" in data, (st, data[:300])
    return out


try:
    wait_port(port, 10)
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"}}
    via = {"Authorization": f"Bearer {k['api_key']}", "Content-Type": "application/json",
           "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
           "Mcp-Method": "tools/call", "Mcp-Name": "ev.echo"}
    before = rss(broker.pid)
    # Direct: a session of its own.
    d = http.client.HTTPConnection("127.0.0.1", sport, timeout=10)
    hdr = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    st, h, _ = post(d, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "b", "version": "1"}}}, hdr)
    hdr = dict(hdr, **{"mcp-session-id": h["mcp-session-id"], "mcp-protocol-version": "2025-06-18"})
    post(d, {"jsonrpc": "2.0", "method": "notifications/initialized"}, hdr)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": "hello"}}}
    e = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    fcall = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "ev.echo", "arguments": {"message": "hello"}, "_meta": meta}}
    timed(e, fcall, via, 20)   # warm-up: the broker connects to the remote
    after = rss(broker.pid)
    timed(d, call, hdr, 20)
    direct, through = [], []
    threads = {}
    for _ in range(5):        # interleaved, so drift hits both alike
        direct += timed(d, call, hdr, a.calls // 5)
        t0 = thread_stats(broker.pid)
        through += timed(e, fcall, via, a.calls // 5)
        for name, v in stats_delta(t0, thread_stats(broker.pid)).items():
            threads[name] = [x + y for x, y in zip(threads.get(name, [0, 0, 0]), v)]

    def q(xs, p):
        return statistics.quantiles(xs, n=100)[p - 1]

    dp50, dp99, tp50, tp99 = q(direct, 50), q(direct, 99), q(through, 50), q(through, 99)
    print(f"direct   : p50 {dp50:.0f} µs  p99 {dp99:.0f} µs  (n={len(direct)})")
    print(f"via ephyr: p50 {tp50:.0f} µs  p99 {tp99:.0f} µs  (n={len(through)})")
    print(f"added    : p50 {tp50 - dp50:.0f} µs  p99 {tp99 - dp99:.0f} µs")
    report_threads(threads, len(through), "broker threads, through ephyr")
    print(f"broker VmRSS: {before} kB before the remote was connected, {after} kB after (+{after - before} kB)")

    if a.conc:
        # Throughput: wrk (sharing CPU 1 with the server) at --conc connections, one
        # session's tools/call directly, then the same call through ephyr.
        import tempfile
        work = tempfile.mkdtemp(prefix="ephyr-fed-wrk-")

        def wrk(port, body, headers):
            lua = os.path.join(work, "req.lua")
            with open(lua, "w") as f:
                f.write('wrk.method = "POST"\n')
                f.write(f"wrk.body = {json.dumps(json.dumps(body))}\n")
                for k, v in headers.items():
                    f.write(f'wrk.headers["{k}"] = "{v}"\n')
            out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{a.conc}", f"-d{a.duration}s", "--latency",
                                  "-s", lua, f"http://127.0.0.1:{port}/mcp"], capture_output=True, text=True).stdout
            rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
            p99 = re.search(r"99%\s+(\S+)", out).group(1)
            bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            return rate, p99, int(bad.group(1)) if bad else 0

        import re
        dr, dp, dbad = wrk(sport, call, hdr)
        tr, tp, tbad = wrk(port, fcall, via)
        print(f"c={a.conc} direct   : {dr:.0f} req/s  p99 {dp}  (non-2xx {dbad})")
        print(f"c={a.conc} via ephyr: {tr:.0f} req/s  p99 {tp}  (non-2xx {tbad})")
finally:
    server.kill()
    lab.close()
