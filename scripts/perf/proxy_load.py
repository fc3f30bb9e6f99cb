#!/usr/bin/env python3
"""HTTP proxy cost: added latency, throughput at c=64, and time to the first streamed byte.

Usage: scripts/perf/proxy_load.py [--bin PATH] [--seconds 10]

Installs wrk and nginx from Debian if missing (root). Starts nginx on 127.0.0.1 (one worker,
pinned to CPU 0, `return 200` with a 2-byte body) and `ephyr serve` (pinned to CPU 1) with one
service for it (`fast`: bearer credential from the environment, network.allow 127.0.0.1/32).
Then, with wrk pinned to CPU 0:
  * latency: wrk -t1 -c1 --latency, directly to nginx and through /v1/proxy/fast/ with an API
    key (a GET: audited without waiting for fsync); p50/p99 and the difference;
  * throughput: wrk -t1 -c64 through the proxy (the broker alone on its core);
  * streaming: time to the first byte of an SSE response from tests/helpers/upstream.py,
    directly and through the proxy (median of 30), and the difference.
"""
import argparse, os, shutil, socket, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import Lab, run, start_nginx, wait_port  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--seconds", type=int, default=10)
a = ap.parse_args()
binary = os.path.abspath(a.bin)
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


missing = [p for p, exe in [("wrk", "wrk"), ("nginx", "/usr/sbin/nginx")] if not shutil.which(exe)]
if missing:
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True)

lab = Lab(binary, "ephyr-proxy-bench-")
work = lab.work
nginx, nport = start_nginx(work, 0)
sse = subprocess.Popen(["python3", os.path.join(repo, "tests/helpers/upstream.py"), "serve"],
                       stdout=subprocess.PIPE, text=True)
sport = int(sse.stdout.readline().split()[1])

key = lab.agent_key("bench")
policy = f"""services:
  fast:
    url: http://127.0.0.1:{nport}
    credential: {{ type: bearer, secret: "env:BENCH_TOKEN" }}
  sse:
    url: http://127.0.0.1:{sport}
    credential: {{ type: bearer, secret: "env:BENCH_TOKEN" }}
network:
  allow: [127.0.0.1/32]
agents:
  bench:
    api_key_hash: "{key['api_key_hash']}"
    services: {{ "*": {{}} }}
    rate_limit: 100000000/1s
"""
broker, port, _ = lab.serve(policy, cpu=1, env={"BENCH_TOKEN": "sk-bench-secret"})
wait_port(nport)
auth = f"Authorization: Bearer {key['api_key']}"


def wrk(url, conns, extra=()):
    out = run("taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{a.seconds}s", "--latency", *extra, url).stdout
    lat = {}
    rps = 0.0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "99%"):
            v = parts[1]
            mult = 1.0 if v.endswith("us") else 1000.0 if v.endswith("ms") else 1e6
            lat[parts[0]] = float(v.rstrip("usm")) * mult
        if line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        if "Non-2xx" in line or "Socket errors" in line:
            print("  wrk:", line.strip())
    return lat, rps


def first_byte(port, path, headers=""):
    s = socket.create_connection(("127.0.0.1", port))
    t = time.perf_counter()
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode())
    buf = b""
    while b"data: tok0" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit(f"no SSE data from port {port}: {buf!r}")
        buf += chunk
    dt = time.perf_counter() - t
    s.close()
    return dt * 1000


try:
    wrk(f"http://127.0.0.1:{port}/v1/proxy/fast/", 8, ["-H", auth])  # warm-up (API key cache, pool)
    d_lat, _ = wrk(f"http://127.0.0.1:{nport}/", 1)
    p_lat, _ = wrk(f"http://127.0.0.1:{port}/v1/proxy/fast/", 1, ["-H", auth])
    print(f"latency c=1 direct: p50 {d_lat['50%']:.0f} µs  p99 {d_lat['99%']:.0f} µs")
    print(f"latency c=1 proxy : p50 {p_lat['50%']:.0f} µs  p99 {p_lat['99%']:.0f} µs")
    print(f"added             : p50 {p_lat['50%'] - d_lat['50%']:.0f} µs  p99 {p_lat['99%'] - d_lat['99%']:.0f} µs")
    _, d_rps = wrk(f"http://127.0.0.1:{nport}/", 64)
    t_lat, t_rps = wrk(f"http://127.0.0.1:{port}/v1/proxy/fast/", 64, ["-H", auth])
    print(f"throughput c=64 direct: {d_rps:,.0f} req/s")
    print(f"throughput c=64 proxy : {t_rps:,.0f} req/s  (p50 {t_lat['50%'] / 1000:.2f} ms, p99 {t_lat['99%'] / 1000:.2f} ms)")
    hdr = f"{auth}\r\n"
    for _ in range(3):
        first_byte(sport, "/sse?n=1&delay=0")
        first_byte(port, "/v1/proxy/sse/sse?n=1&delay=0", hdr)
    direct = [first_byte(sport, "/sse?n=1&delay=0") for _ in range(30)]
    proxied = [first_byte(port, "/v1/proxy/sse/sse?n=1&delay=0", hdr) for _ in range(30)]
    md, mp = statistics.median(direct), statistics.median(proxied)
    print(f"SSE first byte: direct {md:.2f} ms, proxy {mp:.2f} ms, added {mp - md:.2f} ms (median of 30)")
    with open(f"/proc/{broker.pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    print(f"broker peak RSS: {rss / 1024:.1f} MB")
finally:
    for p in (nginx, sse):
        p.terminate()
        p.wait(timeout=5)
    lab.close()
