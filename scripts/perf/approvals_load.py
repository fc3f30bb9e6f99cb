#!/usr/bin/env python3
"""Human approval: what a held request costs, and how fast an approved one resumes.

Usage: scripts/perf/approvals_load.py [--bin PATH] [--n 500]

Starts tests/helpers/upstream.py and `ephyr serve` (pinned to CPU 0; this client on CPU 1) with a
service `api` whose POSTs an `approvals:` rule holds (`hold: 0s`, up to N pending per agent).
Then, over one kept-alive connection:
  * opening: N POSTs with distinct bodies through /v1/proxy/api/: each opens a request (journal
    record and audit line synced before the answer); p50/p99 of the 403 `approval_pending`;
  * memory: the broker's VmRSS before and after N open requests, and the journal's size;
  * deciding: each request approved through the local API (`POST /v1/approvals/decide`, the
    journal and the audit line synced); p50/p99;
  * resuming: the held request repeated (the approval used up, durably, then the upstream
    answers 200); p50 against the same POST to a service no rule holds;
  * waking: a call held open (a progress token over MCP would do the same; here: `hold: 20s` on a
    second broker) answered after `approve`: the time from the decision's answer to the call's.
"""
import argparse, http.client, json, os, socket, statistics, subprocess, sys, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import Lab  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--n", type=int, default=500)
a = ap.parse_args()
binary = os.path.abspath(a.bin)
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.sched_setaffinity(0, {1})

up = subprocess.Popen(["taskset", "-c", "1", "python3", os.path.join(repo, "tests/helpers/upstream.py"), "serve"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
uport = int(up.stdout.readline().split()[1])


class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def ms(x):
    return f"{x * 1000:.2f} ms"


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_lab(hold):
    lab = Lab(binary, "ephyr-approvals-bench-")
    key = lab.agent_key("bench")
    policy = f"""network: {{ allow: [127.0.0.1/32] }}
limits: {{ requests_per_agent: 1000000/1m }}
services:
  api: {{ url: "http://127.0.0.1:{uport}/", credential: {{ type: bearer, secret: "env:BENCH_TOKEN" }} }}
  free: {{ url: "http://127.0.0.1:{uport}/", credential: {{ type: bearer, secret: "env:BENCH_TOKEN" }} }}
agents:
  bench: {{ api_key_hash: "{key['api_key_hash']}", rate_limit: 1000000/1m, services: {{ api: {{}}, free: {{}} }} }}
approvals:
  hold: {hold}
  max_pending_per_agent: 1000
  rules:
    writes: {{ http: {{ services: [api], methods: [POST] }} }}
"""
    proc, port, _ = lab.serve(policy, cpu=0, env={"BENCH_TOKEN": "t0ken"})
    return lab, proc, port, key["api_key"]


def post(conn, key, service, body):
    t = time.perf_counter()
    conn.request("POST", f"/v1/proxy/{service}/things", body=body, headers={"Authorization": f"Bearer {key}"})
    r = conn.getresponse()
    r.read()
    return time.perf_counter() - t, r.status, r.getheader("x-ephyr-approval")


def decide(sock, rid):
    c = Unix(sock)
    t = time.perf_counter()
    c.request("POST", "/v1/approvals/decide", body=json.dumps({"id": rid, "approve": True}))
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 200, r.status
    return time.perf_counter() - t


lab, proc, port, key = run_lab("0s")
sock = os.path.join(lab.work, "ephyr.sock")
conn = http.client.HTTPConnection("127.0.0.1", port)
for i in range(20):
    post(conn, key, "free", b"warm")
time.sleep(0.5)
before = rss(proc.pid)
opened, ids = [], []
for i in range(a.n):
    dt, status, rid = post(conn, key, "api", json.dumps({"n": i, "pad": "x" * 64}).encode())
    assert status == 403 and rid, status
    opened.append(dt)
    ids.append(rid)
time.sleep(0.5)
after = rss(proc.pid)
journal = os.path.getsize(os.path.join(lab.data, "state", "approvals.journal"))
decided = [decide(sock, rid) for rid in ids]
resumed, free = [], []
for i in range(a.n):
    body = json.dumps({"n": i, "pad": "x" * 64}).encode()
    dt, status, _ = post(conn, key, "api", body)
    assert status == 200, status
    resumed.append(dt)
    free.append(post(conn, key, "free", body)[0])
conn.close()
lab.close()
print(f"opening a request (403 approval_pending): p50 {ms(pct(opened, .5))}, p99 {ms(pct(opened, .99))}")
print(f"memory: VmRSS {before} KB -> {after} KB with {a.n} open requests "
      f"({(after - before) * 1024 / a.n:.0f} B each); journal {journal} B ({journal / a.n:.0f} B each)")
print(f"deciding (local API): p50 {ms(pct(decided, .5))}, p99 {ms(pct(decided, .99))}")
print(f"resuming an approved POST: p50 {ms(pct(resumed, .5))} vs an unguarded POST {ms(pct(free, .5))} "
      f"(+{ms(pct(resumed, .5) - pct(free, .5))})")

# A held call woken by the decision.
lab, proc, port, key = run_lab("20s")
sock = os.path.join(lab.work, "ephyr.sock")
woke = []
for i in range(30):
    done = {}

    def held():
        c = http.client.HTTPConnection("127.0.0.1", port)
        _, status, _ = post(c, key, "api", json.dumps({"held": i}).encode())
        done["at"], done["status"] = time.perf_counter(), status

    t = threading.Thread(target=held)
    t.start()
    rid = None
    while rid is None:
        c = Unix(sock)
        c.request("GET", "/v1/approvals")
        q = json.loads(c.getresponse().read())
        c.close()
        rid = next((r["id"] for r in q["approvals"] if r["state"] == "pending"), None)
        time.sleep(0.005)
    decide(sock, rid)
    answered = time.perf_counter()
    t.join()
    assert done["status"] == 200, done
    woke.append(done["at"] - answered)
lab.close()
up.terminate()
print(f"waking a held call: from the decision's answer to the call's answer p50 {ms(pct(woke, .5))}, "
      f"max {ms(max(woke))} (30 calls; includes the upstream request)")
