#!/usr/bin/env python3
"""MCP endpoint throughput and latency under load: wrk against a real `ephyr serve`.

Usage: scripts/perf/mcp_load.py [--bin PATH] [--duration S] [--conns 1,8,64]
                                [--call tools_call|tools_list] [--era stateless|session]
                                [--auth api_key|token]

The broker (all its threads, and the signer it forks) is pinned to CPU 0 with taskset; wrk runs
on CPU 1 with one thread. Each connection count gets a 2 s warm-up, then `--runs` runs of `--duration` s with
`wrk --latency`; the median run (by req/s) is reported with all runs' rates. The broker's VmRSS is sampled every 0.25 s during the run; the maximum is
reported, and the context switches per request of each broker thread (/proc/PID/task/*). Every request is checked to be a success (wrk counts non-2xx; a sample response is
checked to be a JSON-RPC result, not an error). Run as root (the production layout: privilege
drop, separate uids) on the static release binary (scripts/build-static.sh).
"""
import argparse, http.client, json, os, re, subprocess, sys, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import Lab, stats_delta, thread_stats  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--duration", type=int, default=10)
ap.add_argument("--conns", default="1,8,64")
ap.add_argument("--call", choices=["tools_call", "tools_list"], default="tools_call")
ap.add_argument("--era", choices=["stateless", "session"], default="stateless")
ap.add_argument("--auth", choices=["api_key", "token"], default="api_key")
ap.add_argument("--targets", type=int, default=1)
ap.add_argument("--runs", type=int, default=3, help="runs per connection count; the median run is reported")
a = ap.parse_args()
binary = os.path.abspath(a.bin)


lab = Lab(binary, "ephyr-load-")
work = lab.work
key_info = lab.agent_key("bench")
key = key_info["api_key"]
targets = "\n".join(
    f"  t{i:03}: {{host: 10.0.{i // 250}.{i % 250 + 1}, allowed_roles: [read, op]}}" for i in range(a.targets)
)
policy = f"""roles:
  read: {{principal: ephyr-read}}
  op: {{principal: ephyr-op}}
targets:
{targets}
agents:
  bench:
    api_key_hash: "{key_info['api_key_hash']}"
    ssh: {{"t0*": {{roles: [read]}}, "*": {{roles: [read, op]}}}}
    can_delegate: true
    rate_limit: 100000000/1s
"""
broker, port, dport = lab.serve(policy, cpu=0)


def request(body, headers):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/mcp", body=json.dumps(body), headers=headers)
    r = c.getresponse()
    return r.status, dict(r.getheaders()), r.read()


try:
    for _ in range(500):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.01)
    else:
        sys.exit("broker did not start: " + broker.stderr.read().decode())

    credential = key
    if a.auth == "token":
        # A root task token minted through the MCP task_create tool (the tasks issue).
        st, _, body = request(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                "name": "task_create", "arguments": {"description": "load test", "ttl": "1h"},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                          "io.modelcontextprotocol/clientCapabilities": {}}}},
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
             "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "task_create"})
        text = json.loads(body)["result"]["content"][0]["text"]
        credential = json.loads(text)["token"]

    headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    method = "tools/call" if a.call == "tools_call" else "tools/list"
    params = {"name": "list_targets", "arguments": {}} if a.call == "tools_call" else {}
    if a.era == "stateless":
        params["_meta"] = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                           "io.modelcontextprotocol/clientCapabilities": {}}
        headers.update({"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method})
        if a.call == "tools_call":
            headers["Mcp-Name"] = "list_targets"
    else:
        st, h, body = request({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "wrk", "version": "1"}}},
            headers)
        headers["Mcp-Session-Id"] = {k.lower(): v for k, v in h.items()}["mcp-session-id"]
        headers["MCP-Protocol-Version"] = "2025-11-25"
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    st, _, sample = request(body, headers)
    sample_json = json.loads(sample)
    assert st == 200 and "result" in sample_json and not sample_json["result"].get("isError"), sample
    response_bytes = len(sample)

    lua = os.path.join(work, "req.lua")
    with open(lua, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write(f"wrk.body = {json.dumps(json.dumps(body))}\n")
        for k, v in headers.items():
            f.write(f'wrk.headers["{k}"] = "{v}"\n')

    def rss_of(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return 0
        return 0

    def cpu_ticks(pid):
        # utime + stime of the broker (all threads), in clock ticks.
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def steal():
        with open("/proc/stat") as f:
            cpu = f.readline().split()[1:]
        vals = [int(x) for x in cpu]
        return vals[7], sum(vals)

    hz = os.sysconf("SC_CLK_TCK")
    results = []

    def one_run(conns):
        url = f"http://127.0.0.1:{port}/mcp"
        wrk = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", "--latency", "-s", lua]
        subprocess.run(wrk[:-2] + ["-d2s", "-s", lua, url], capture_output=True)  # warm-up
        peak = [0]
        stop = threading.Event()

        def sample_rss():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_of(broker.pid))
                time.sleep(0.25)

        t = threading.Thread(target=sample_rss)
        t.start()
        cpu0, (st0, tot0), th0 = cpu_ticks(broker.pid), steal(), thread_stats(broker.pid)
        out = subprocess.run(wrk + [f"-d{a.duration}s", url], capture_output=True, text=True).stdout
        cpu1, (st1, tot1), th1 = cpu_ticks(broker.pid), steal(), thread_stats(broker.pid)
        threads = stats_delta(th0, th1)
        stop.set()
        t.join()
        total = int(re.search(r"(\d+) requests in", out).group(1))
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        lat = {}
        for p in ("50", "75", "90", "99"):
            m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            val, unit = float(m.group(1)), m.group(2)
            lat[p] = val / 1000 if unit == "us" else val * 1000 if unit == "s" else val
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = re.search(r"Socket errors: (.*)", out)
        return {
            "conns": conns, "req_per_s": round(rps), "p50_ms": lat["50"], "p90_ms": lat["90"],
            "p99_ms": lat["99"], "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else None, "broker_peak_rss_kb": peak[0],
            "broker_cpu_us_per_req": round((cpu1 - cpu0) / hz * 1e6 / max(total, 1), 1),
            "steal_pct": round(100 * (st1 - st0) / max(tot1 - tot0, 1), 1),
            # Context switches per request, voluntary + involuntary, per broker thread name.
            "switches_per_req": {k: round((v[0] + v[1]) / max(total, 1), 3) for k, v in threads.items() if v[0] + v[1]},
        }

    for conns in [int(c) for c in a.conns.split(",")]:
        runs = sorted((one_run(conns) for _ in range(a.runs)), key=lambda r: r["req_per_s"])
        best = runs[len(runs) // 2]
        best["runs_req_per_s"] = [r["req_per_s"] for r in runs]
        best["runs_p99_ms"] = [r["p99_ms"] for r in runs]
        results.append(best)
    print(json.dumps({"call": a.call, "era": a.era, "auth": a.auth, "targets": a.targets,
                      "response_bytes": response_bytes, "duration_s": a.duration, "results": results}, indent=1))
    print()
    print("| conns | req/s (median run) | all runs | p50 ms | p90 ms | p99 ms | non-2xx | broker CPU µs/req | broker peak RSS | steal | context switches/req |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        allr = "/".join(f"{x / 1000:.1f}k" for x in r["runs_req_per_s"])
        print(f"| {r['conns']} | {r['req_per_s']:,} | {allr} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} "
              f"| {r['non_2xx']} | {r['broker_cpu_us_per_req']} | {r['broker_peak_rss_kb']:,} KB | {r['steal_pct']}% "
              f"| {sum(r['switches_per_req'].values()):.2f} ({', '.join(f'{k} {v}' for k, v in r['switches_per_req'].items())}) |")
finally:
    lab.close()
