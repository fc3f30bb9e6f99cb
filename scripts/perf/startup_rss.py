#!/usr/bin/env python3
"""Start-to-serving time and idle memory of `ephyr serve`.

Usage: scripts/perf/startup_rss.py [--bin PATH] [--runs N] [--mode dev|prod]

Start-to-serving = from Popen until GET /healthz answers 200 (the signer is ready and a worker is
up; polled every 0.2 ms). Memory = VmRSS and PSS (/proc/PID/smaps_rollup) of the broker, the signer
keeper and the signer worker after 3 s idle. PSS splits shared pages between the processes, so the
PSS sum is the honest total; the RSS sum double-counts the signer's forked pages.
Run as root for the production layout (privilege drop, separate uids).
"""
import argparse, http.client, json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import free_port  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--runs", type=int, default=15)
ap.add_argument("--mode", choices=["dev", "prod"], default="prod")
a = ap.parse_args()


def healthy(port):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
        c.request("GET", "/healthz")
        return c.getresponse().status == 200
    except OSError:
        return False


def mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                out["pss_kb"] = int(line.split()[1])
    return out


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


work = tempfile.mkdtemp(prefix="ephyr-perf-")
os.chmod(work, 0o755)
data, etc = os.path.join(work, "data"), os.path.join(work, "etc")
if a.mode == "prod":
    subprocess.run([a.bin, "init", "--data-dir", data, "--config-dir", etc], check=True, capture_output=True)

times, mems = [], []
for i in range(a.runs):
    port, dport = free_port(), free_port()
    args = [a.bin, "serve", "--listen", f"127.0.0.1:{port}", "--dashboard-listen", f"127.0.0.1:{dport}",
            "--socket", os.path.join(work, "ephyr.sock")]
    args += ["--dev"] if a.mode == "dev" else ["--data-dir", data, "--config", os.path.join(etc, "policy.yaml")]
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not healthy(port):
        if p.poll() is not None:
            sys.exit(f"broker exited with {p.returncode}")
        time.sleep(0.0002)
    times.append((time.perf_counter() - t0) * 1000)
    if i == a.runs - 1:
        time.sleep(3)
        keeper = children(p.pid)[0]
        worker = children(keeper)[0]
        mems = {"broker": mem(p.pid), "signer_keeper": mem(keeper), "signer_worker": mem(worker)}
        threads = len(os.listdir(f"/proc/{p.pid}/task"))
    p.terminate()
    p.wait()

print(json.dumps({
    "mode": a.mode, "runs": a.runs,
    "start_to_serving_ms": {"median": round(statistics.median(times), 2), "min": round(min(times), 2),
                            "max": round(max(times), 2)},
    "idle_memory_kb": mems,
    "rss_sum_kb": sum(m["rss_kb"] for m in mems.values()),
    "pss_sum_kb": sum(m["pss_kb"] for m in mems.values()),
    "broker_threads": threads,
}, indent=1))
