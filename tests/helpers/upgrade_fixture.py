#!/usr/bin/env python3
"""Writes an upgrade fixture: the data dir a given ephyr binary leaves after a scripted life.

    python3 tests/helpers/upgrade_fixture.py --bin OLD_EPHYR --out tests/data/upgrade/NAME

The binary (a build of a previous release) runs `init`, then a broker with a fixed policy; the
script stores a sealed secret, creates tasks (one live for ten years, a delegated child, one
revoked), makes calls that write the audit log, and stops the broker cleanly. What the upgrade
test needs to know (the agent's key, the task tokens and ids, the secret's value) goes to
manifest.json beside data.tar.gz. Everything here is test material: the keys guard nothing.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

SECRET = "fixture-upstream-token-7d1f"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(api, cred, tool, args):
    body = json.dumps({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "upgrade-fixture", "version": "1"},
        }},
    }).encode()
    req = urllib.request.Request(api + "/mcp", data=body, method="POST", headers={
        "Authorization": "Bearer " + cred, "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call", "Mcp-Name": tool,
    })
    with urllib.request.urlopen(req, timeout=10) as r:
        res = json.loads(r.read())["result"]
    text = res["content"][0]["text"]
    if res.get("isError"):
        raise SystemExit(f"{tool}: {text}")
    try:
        return json.loads(text)
    except ValueError:
        return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the previous release's ephyr binary")
    ap.add_argument("--out", required=True, help="the fixture directory to (re)write")
    ap.add_argument("--release", required=True, help="what the binary is, e.g. a commit")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ephyr-upgrade-fixture-")
    os.chmod(work, 0o711)  # the broker drops to its own user and must reach the data dir
    data, conf = os.path.join(work, "data"), os.path.join(work, "conf")
    try:
        subprocess.run([a.bin, "init", "--data-dir", data, "--config-dir", conf], check=True,
                       stdout=subprocess.DEVNULL)
        keygen = json.loads(subprocess.run([a.bin, "keygen", "agent", "alice", "--json"], check=True,
                                           capture_output=True).stdout)
        api_port = free_port()
        policy = f"""version: 1
limits:
  task_ttl_max: 87600h
network:
  allow: [127.0.0.1/32]
targets:
  web: {{ host: 127.0.0.1, port: 1, allowed_roles: [read] }}
roles:
  read: {{ principal: nobody }}
services:
  api:
    url: "http://127.0.0.1:{api_port}/"
    credential: {{ type: bearer, secret: "store:api_token" }}
agents:
  alice:
    api_key_hash: "{keygen['api_key_hash']}"
    max_task_ttl: 87600h
    can_delegate: true
    ssh:
      web: {{ roles: [read] }}
    services:
      api: {{ methods: [GET], paths: ["/*"] }}
"""
        pol = os.path.join(conf, "policy.yaml")
        with open(pol, "w") as f:
            f.write(policy)
        port, dash = free_port(), free_port()
        sock = os.path.join(data, "ephyr.sock")
        log = open(os.path.join(work, "broker.log"), "w")
        broker = subprocess.Popen(
            [a.bin, "serve", "--data-dir", data, "--config", pol, "--listen", f"127.0.0.1:{port}",
             "--dashboard-listen", f"127.0.0.1:{dash}", "--socket", sock],
            stdout=log, stderr=log)
        api = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(api + "/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("the broker did not start:\n" + open(log.name).read())
        subprocess.run([a.bin, "secret", "set", "api_token", "--socket", sock], input=SECRET.encode(),
                       check=True)
        key = keygen["api_key"]
        call(api, key, "list_targets", {})
        live = call(api, key, "task_create", {"description": "live for ten years", "ttl": "87600h", "can_delegate": True})
        child = call(api, live["token"], "task_delegate", {
            "parent_task_id": live["task_id"], "description": "the child", "ttl": "87000h"})
        gone = call(api, key, "task_create", {"description": "revoked before the upgrade", "ttl": "87600h"})
        call(api, key, "task_revoke", {"task_id": gone["task_id"]})
        call(api, live["token"], "list_services", {})
        broker.send_signal(signal.SIGTERM)
        if broker.wait(timeout=20) != 0:
            raise SystemExit("the broker did not stop cleanly:\n" + open(log.name).read())
        if os.path.exists(sock):
            os.unlink(sock)
        os.makedirs(a.out, exist_ok=True)
        with tarfile.open(os.path.join(a.out, "data.tar.gz"), "w:gz") as t:
            t.add(data, arcname="data")
            t.add(pol, arcname="policy.yaml")
        with open(os.path.join(a.out, "manifest.json"), "w") as f:
            json.dump({
                "release": a.release,
                "version": subprocess.run([a.bin, "--version"], capture_output=True, text=True).stdout.strip(),
                "api_key": key,
                "service_port": api_port,
                "secret": SECRET,
                "live": {"task_id": live["task_id"], "token": live["token"]},
                "child": {"task_id": child["task_id"], "token": child["token"]},
                "revoked": {"task_id": gone["task_id"], "token": gone["token"]},
            }, f, indent=2)
            f.write("\n")
        print(f"fixture written to {a.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
