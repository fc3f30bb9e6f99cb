#!/usr/bin/env python3
"""The broker's memory for authentication: peak (VmHWM) and current (VmRSS) resident memory after
start-up, after the first request with each of N agent keys, and after a burst of wrong keys.

Usage: scripts/perf/auth_rss.py [--bin PATH] [--keygen PATH] [--agents N] [--wrong M]

The keys come from `--keygen`'s `keygen agent` (default: `--bin`): a binary from before the fast
stored form writes Argon2id hashes (m=19456, t=2), so `--keygen OLD --bin NEW` measures how the new
broker handles hashes from an earlier version. Half of the wrong keys are in ephyr's format with a
known key id, half in a foreign format. Run as root (production layout).
"""
import argparse, http.client, json, os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import Lab  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/x86_64-unknown-linux-gnu/release/ephyr")
ap.add_argument("--agents", type=int, default=8)
ap.add_argument("--wrong", type=int, default=64)
ap.add_argument("--keygen", help="binary whose `keygen agent` makes the keys (default: --bin)")
a = ap.parse_args()

lab = Lab(os.path.abspath(a.bin), "ephyr-authrss-")
keygen = Lab.__new__(Lab)
keygen.binary = os.path.abspath(a.keygen or a.bin)
keys = [keygen.agent_key(f"a{i}") for i in range(a.agents)]
form = "Argon2id" if keys[0]["api_key_hash"].startswith("$argon2") else "ephyr-sha256"
policy = "agents:\n" + "".join(f"  a{i}:\n    api_key_hash: \"{k['api_key_hash']}\"\n" for i, k in enumerate(keys))
proc, port, _ = lab.serve(policy)


def mem():
    with open(f"/proc/{proc.pid}/status") as f:
        v = dict(l.split(":", 1) for l in f if ":" in l)
    return int(v["VmHWM"].split()[0]), int(v["VmRSS"].split()[0])


def call(key):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "rss", "version": "1"}}}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/mcp", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                     "Accept": "application/json, text/event-stream",
                                     "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"})
    return c.getresponse().status


rows = [("started", *mem())]
for k in keys:
    assert call(k["api_key"]) == 200
rows.append((f"first use of {a.agents} keys", *mem()))
for i in range(a.wrong):
    call(keys[0]["api_key"][:-4] + "AAAA" if i % 2 else f"wrong-format-key-{i}")
rows.append((f"+{a.wrong} wrong keys", *mem()))
print(f"stored form: {form}\n| stage | peak RSS (VmHWM) | RSS |\n|---|---|---|")
for stage, hwm, rss in rows:
    print(f"| {stage} | {hwm:,} KB | {rss:,} KB |")
lab.close()
