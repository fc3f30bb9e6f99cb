#!/usr/bin/env python3
"""One run, four request paths: `tools/call`, `tools/list`, the HTTP proxy and a federated
`tools/call`, each at every connection count, against one real `ephyr serve`.

Usage: scripts/perf/load.py [--bin PATH] [--duration S] [--conns 1,64] [--only NAME,...]

Per path and connection count it reports req/s, p50/p99 (wrk --latency), and per request: the
broker's CPU time, its context switches and its syscalls (all threads, counted by
`perf stat -e raw_syscalls:sys_enter,context-switches,task-clock -p PID` over the measured
window), and the context switches per broker thread (/proc/PID/task/*/status).

Layout: the broker (all its threads and the signer it forks) pinned to CPU 0; wrk (one thread),
nginx (one worker, `return 200`, the proxy's upstream) and
`@modelcontextprotocol/server-everything` over Streamable HTTP (the federated remote) on CPU 1.
The federated figure therefore includes a Node server sharing the load generator's core: read it
as the broker's cost per call (CPU, switches, syscalls), not as the remote's speed. Every path is
checked to answer with a success before it is measured, and wrk's non-2xx count is reported.

Run as root on the static release binary (scripts/build-static.sh) after scripts/test.sh has
installed tests/peers; installs wrk, nginx and perf (linux-perf) from Debian if missing.
"""
import argparse, http.client, json, os, re, shutil, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import Lab, free_port, start_nginx, stats_delta, thread_stats, wait_port  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--duration", type=int, default=8)
ap.add_argument("--conns", default="1,64")
ap.add_argument("--only", default="tools_call,tools_list,proxy,federated")
a = ap.parse_args()
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
peers = os.path.join(repo, "tests/peers")

missing = [p for p, exe in [("wrk", "wrk"), ("nginx", "/usr/sbin/nginx"), ("linux-perf", "perf")] if not shutil.which(exe)]
if missing:
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True)

lab = Lab(os.path.abspath(a.bin), "ephyr-load-all-")
work = lab.work
procs = []
try:
    nginx, nport = start_nginx(work, 1)
    procs.append(nginx)
    sport = free_port()
    procs.append(subprocess.Popen(
        ["taskset", "-c", "1", os.path.join(peers, "node_modules/node/bin/node"),
         "node_modules/@modelcontextprotocol/server-everything/dist/index.js", "streamableHttp"],
        cwd=peers, env=dict(os.environ, PORT=str(sport)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_port(nport)
    wait_port(sport, 20)

    k = lab.agent_key("bench")
    policy = f"""roles:
  read: {{principal: ephyr-read}}
targets:
  t000: {{host: 10.0.0.1, allowed_roles: [read]}}
services:
  fast:
    url: http://127.0.0.1:{nport}
    credential: {{ type: bearer, secret: "env:BENCH_TOKEN" }}
network: {{ allow: [127.0.0.1/32] }}
remotes:
  ev: {{ url: "http://127.0.0.1:{sport}/mcp" }}
agents:
  bench:
    api_key_hash: "{k['api_key_hash']}"
    ssh: {{"*": {{roles: [read]}}}}
    services: {{ "*": {{}} }}
    remotes: {{ ev: {{}} }}
    rate_limit: 100000000/1s
"""
    broker, port, _ = lab.serve(policy, cpu=0, env={"BENCH_TOKEN": "sk-bench-secret"})

    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}
    base = {"Authorization": f"Bearer {k['api_key']}", "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"}

    def mcp(method, name=None, args=None):
        params = {"_meta": meta}
        headers = dict(base, **{"Mcp-Method": method})
        if name:
            params.update(name=name, arguments=args or {})
            headers["Mcp-Name"] = name
        return ("POST", "/mcp", {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, headers)

    paths = {
        "tools_call": mcp("tools/call", "list_targets"),
        "tools_list": mcp("tools/list"),
        "proxy": ("GET", "/v1/proxy/fast/", None, {"Authorization": base["Authorization"]}),
        "federated": mcp("tools/call", "ev.echo", {"message": "hello"}),
    }

    def check(name, method, path, body, headers):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        c.request(method, path, body=json.dumps(body) if body else None, headers=headers)
        r = c.getresponse()
        data = r.read()
        ok = r.status == 200 and (body is None or ("result" in json.loads(data)
                                                   and not json.loads(data)["result"].get("isError")))
        if not ok:
            raise SystemExit(f"{name}: not a success: {r.status} {data[:300]!r}")

    def lua_for(method, body, headers):
        lua = os.path.join(work, "req.lua")
        with open(lua, "w") as f:
            f.write(f'wrk.method = "{method}"\n')
            if body:
                f.write(f"wrk.body = {json.dumps(json.dumps(body))}\n")
            for h, v in headers.items():
                f.write(f'wrk.headers["{h}"] = "{v}"\n')
        return lua

    def ms(v, unit):
        return float(v) / 1000 if unit == "us" else float(v) * 1000 if unit == "s" else float(v)

    rows = []
    for name in a.only.split(","):
        method, path, body, headers = paths[name]
        check(name, method, path, body, headers)
        lua = lua_for(method, body, headers)
        url = f"http://127.0.0.1:{port}{path}"
        for conns in [int(c) for c in a.conns.split(",")]:
            wrk = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", "--latency", "-s", lua]
            subprocess.run(wrk + ["-d2s", url], capture_output=True)  # warm-up
            th0 = thread_stats(broker.pid)
            perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter,context-switches,task-clock",
                                     "-p", str(broker.pid), "--", "sleep", str(a.duration)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            out = subprocess.run(wrk + [f"-d{a.duration}s", url], capture_output=True, text=True).stdout
            counters = {}
            for line in perf.communicate()[1].splitlines():
                f = line.split(",")
                if len(f) > 2 and f[0].replace(".", "").isdigit():
                    counters[f[2]] = float(f[0])
            threads = stats_delta(th0, thread_stats(broker.pid))
            total = int(re.search(r"(\d+) requests in", out).group(1))
            lat = {p: ms(*re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()) for p in ("50", "99")}
            bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            rows.append({
                "path": name, "conns": conns, "req_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))),
                "p50_ms": lat["50"], "p99_ms": lat["99"], "non_2xx": int(bad.group(1)) if bad else 0,
                "cpu_us_per_req": round(counters.get("task-clock", 0) * 1000 / max(total, 1), 1),
                "switches_per_req": round(counters.get("context-switches", 0) / max(total, 1), 3),
                "syscalls_per_req": round(counters.get("raw_syscalls:sys_enter", 0) / max(total, 1), 2),
                "switches_by_thread": {t: round((v[0] + v[1]) / max(total, 1), 3) for t, v in threads.items() if v[0] + v[1]},
            })
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| path | conns | req/s | p50 ms | p99 ms | non-2xx | broker CPU µs/req | context switches/req | syscalls/req |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        by = ", ".join(f"{t} {v}" for t, v in r["switches_by_thread"].items())
        print(f"| {r['path']} | {r['conns']} | {r['req_per_s']:,} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['non_2xx']} "
              f"| {r['cpu_us_per_req']} | {r['switches_per_req']} ({by}) | {r['syscalls_per_req']} |")
finally:
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    lab.close()
