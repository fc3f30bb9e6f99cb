#!/usr/bin/env python3
"""Instruction counts of the request path's pure pieces, compared with a committed baseline.

Usage: scripts/perf/icount.py [--check | --update] [--n N] [--tolerance PCT]

Builds `benches/icount.rs` (bench profile) and runs each probe under
`valgrind --tool=callgrind` twice, with 0 and with N iterations; the difference divided by N is
the probe's instructions per call. Instruction counts do not depend on the machine's load, so a
change in them is a change in the code (or the compiler: the baseline names the rustc version).

--check   (the default; scripts/test.sh runs it) fails when a probe costs more than the baseline
          by more than --tolerance percent (default 10), and says which and by how much.
--update  writes the measured counts to benches/icount-baseline.json.
"""
import argparse, json, os, re, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINE = os.path.join(ROOT, "benches", "icount-baseline.json")
PROBES = ["token_verify", "authorize", "mcp_decode", "tools_call_path", "approval_match", "command_check"]

ap = argparse.ArgumentParser()
g = ap.add_mutually_exclusive_group()
g.add_argument("--check", action="store_true")
g.add_argument("--update", action="store_true")
ap.add_argument("--n", type=int, default=200)
ap.add_argument("--tolerance", type=float, default=10.0)
a = ap.parse_args()


def bench_binary():
    out = subprocess.run(
        ["cargo", "bench", "--locked", "--bench", "icount", "--no-run", "--message-format=json"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "icount" and msg.get("executable"):
            return msg["executable"]
    raise SystemExit("icount: the bench binary was not built")


def instructions(binary, probe, n):
    r = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", binary, probe, str(n)],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"icount: {probe} {n} failed:\n{r.stderr[-2000:]}")
    m = re.search(r"Collected\s*:\s*(\d+)", r.stderr)
    if not m:
        raise SystemExit(f"icount: no instruction count from callgrind:\n{r.stderr[-2000:]}")
    return int(m.group(1))


rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
binary = bench_binary()
measured = {}
for p in PROBES:
    base = instructions(binary, p, 0)
    full = instructions(binary, p, a.n)
    measured[p] = round((full - base) / a.n)

if a.update:
    with open(BASELINE, "w") as f:
        json.dump({"rustc": rustc, "n": a.n, "instructions_per_call": measured}, f, indent=2)
        f.write("\n")
    print(f"icount: baseline written ({rustc}): {measured}")
    sys.exit(0)

with open(BASELINE) as f:
    baseline = json.load(f)
print(f"| probe | baseline ({baseline['rustc']}) | now ({rustc}) | change |\n|---|---|---|---|")
worse = []
for p in PROBES:
    was, now = baseline["instructions_per_call"].get(p), measured[p]
    change = (now - was) / was * 100 if was else float("inf")
    print(f"| {p} | {was:,} | {now:,} | {change:+.1f}% |")
    if change > a.tolerance:
        worse.append(f"{p}: {was:,} -> {now:,} instructions per call ({change:+.1f}%, tolerance {a.tolerance}%)")
if worse:
    print("icount: regression beyond the tolerance:\n  " + "\n  ".join(worse), file=sys.stderr)
    print("If it is intended, say why in the commit and run scripts/perf/icount.py --update.", file=sys.stderr)
    sys.exit(1)
print("icount: within tolerance")
