#!/usr/bin/env python3
"""Injected faults against a real `ephyr serve`; each case asserts its outcome and the reason given.

Usage: scripts/faults.py [--bin PATH] [--rounds N] [CASE ...]     (as root; default: every case)

Cases:
  kill     the broker SIGKILLed at a random moment while agents create, delegate and revoke tasks,
           N rounds (default 100) on one data dir: after each restart every acknowledged task,
           delegation and revocation is there; at the end `ephyr audit verify` passes.
  disk     the data dir on a small tmpfs filled up: a write that must be durable is refused with a
           reason naming the disk, reads still work, nothing acknowledged is lost, and writes work
           again once space returns (also after a restart: no file was corrupted).
  signer   the signer worker SIGKILLed while certificates are being signed: requests in flight fail
           with a clear error, no certificate is half-issued (each one printed parses), the worker
           is replaced and the next request succeeds without a restart. Then kills placed inside a
           signature and inside a seal (strace's fault injection kills the worker as it goes to
           send an answer it has made): the request fails naming the worker, no certificate or
           task comes of it, and the audit log holds exactly the certificates handed out.
  keeper   the signer's keeper SIGKILLed while task keys are being sealed: the broker stops with
           exit code 70 and says why (the service manager restarts it); after the restart every
           acknowledged task is there.
  hostile  an HTTP upstream and a remote MCP server that send garbage, close, stay silent, answer
           late, send 64 MiB, never end a body or a header, or are down: each proxied request and
           federated call fails within its timeout with a reason naming what happened, the broker's
           memory does not follow what the peer sends, and both work again once the peer behaves.
  reload   50 policy reloads (alternating two policies) while agents call tools: no request fails
           that either policy allows, and the last policy is the one in force.
  clock    the broker's wall clock stepped two hours forward, then back, while agents call tools
           (libfaketime, so a dynamically linked binary; the monotonic clock untouched, as in a
           real step): a 5-minute task
           expires, a client whose clock did not step is told how far behind it is, a proof whose
           nonce was forgotten while the clock was ahead is not taken again after the step back,
           a fresh proof is, no agent call fails and the audit chain verifies.

Figures and the exact runs are in docs/RELIABILITY.md. Exit 0 when every case passed.
"""
import argparse, base64, glob, http.client, json, os, random, re, shutil, signal, subprocess, sys, tempfile, threading, time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "perf"))
from lab import Lab, free_port, rss_kib, run, wait_port  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "helpers"))
import pop_client  # noqa: E402

META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


class Refused(Exception):
    """A tool call answered with an error (the text is the reason)."""


def tool_body(tool, args):
    """The bytes of a stateless `tools/call` request (what a proof of possession signs)."""
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": tool, "arguments": args, "_meta": META}}).encode()


def call(port, credential, tool, args, timeout=10, headers=None):
    """One stateless `tools/call`; the tool's structured result, or Refused(reason)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/mcp", body=tool_body(tool, args), headers={
            "Authorization": f"Bearer {credential}", "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
            "Mcp-Method": "tools/call", "Mcp-Name": tool, **(headers or {})})
        r = c.getresponse()
        raw = r.read()
    finally:
        c.close()
    try:
        msg = json.loads(raw)
    except ValueError:
        raise Refused(f"HTTP {r.status}: {raw[:200]!r}")
    if "error" in msg:
        raise Refused(msg["error"].get("message", str(msg["error"])))
    res = msg["result"]
    text = res["content"][0]["text"] if res.get("content") else ""
    if res.get("isError"):
        raise Refused(text)
    return res.get("structuredContent") or json.loads(text)


def policy_for(keys, extra=""):
    agents = "\n".join(f"""  {name}:
    api_key_hash: "{k['api_key_hash']}"
    ssh: {{"*": {{roles: [read]}}}}
    can_delegate: true
    rate_limit: 100000000/1s""" for name, k in keys.items())
    return f"""limits: {{signer_rate: 1000000/1m}}
roles:
  read: {{principal: ephyr-read}}
targets:
  web: {{host: 10.0.0.1, allowed_roles: [read]}}
{extra}agents:
{agents}
"""


def check(cond, what):
    if not cond:
        raise AssertionError(what)


class Broker:
    """A lab with agents alice and bob, restartable on the same data dir."""

    def __init__(self, binary, prefix, data=None):
        self.lab = Lab(binary, prefix)
        if data:
            shutil.rmtree(self.lab.data)
            os.makedirs(data, exist_ok=True)
            run(binary, "init", "--data-dir", data, "--config-dir", self.lab.etc + "2")
            self.lab.data = data
        self.keys = {n: self.lab.agent_key(n) for n in ("alice", "bob")}
        self.policy = policy_for(self.keys)
        self.proc, self.port = None, None

    def start(self, policy=None, env=None):
        self.proc, self.port, _ = self.lab.serve(policy or self.policy, env=env)
        self.lab.broker = self.proc
        return self

    def key(self, name):
        return self.keys[name]["api_key"]

    def status(self):
        out = run(self.lab.binary, "status", "--json", "--socket", os.path.join(self.lab.work, "ephyr.sock"))
        return json.loads(out.stdout)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def close(self):
        self.stop()
        self.lab.close()


def case_kill(binary, rounds):
    """SIGKILL during writes; every acknowledged write survives."""
    b = Broker(binary, "ephyr-faults-kill-")
    acked = {"tasks": {}, "children": {}, "revoked": set()}
    errors = []
    lock = threading.Lock()
    try:
        for rnd in range(rounds):
            b.start()
            alice = b.key("alice")
            # What earlier rounds acknowledged is all there.
            with lock:
                sample = list(acked["tasks"].items())
            random.shuffle(sample)
            for tid, _ in sample[:20]:
                info = call(b.port, alice, "task_info", {"task_id": tid})
                check(info["task"]["id"] == tid, f"round {rnd}: acknowledged task {tid} lost")
            for tid in list(acked["revoked"])[-20:]:
                info = call(b.port, alice, "task_info", {"task_id": tid})
                check(info["is_revoked"], f"round {rnd}: acknowledged revocation of {tid} lost")
            stop = threading.Event()

            def agent(seed):
                rng = random.Random(seed)
                while not stop.is_set():
                    try:
                        t = call(b.port, alice, "task_create", {"description": "fault", "ttl": "1h", "can_delegate": True}, timeout=5)
                        with lock:
                            acked["tasks"][t["task_id"]] = t["token"]
                        if rng.random() < 0.6:
                            c = call(b.port, t["token"], "task_delegate",
                                     {"description": "child", "ttl": "30m", "agent": "bob"}, timeout=5)
                            with lock:
                                acked["tasks"][c["task_id"]] = c["token"]
                                acked["children"][c["task_id"]] = t["task_id"]
                        if rng.random() < 0.4:
                            call(b.port, alice, "task_revoke", {"task_id": t["task_id"]}, timeout=5)
                            with lock:
                                acked["revoked"].add(t["task_id"])
                    except (Refused, OSError, http.client.HTTPException, KeyError, ValueError) as e:
                        if stop.is_set():
                            return
                        # A refusal while the broker runs is a failure, not the fault.
                        if b.proc.poll() is None:
                            errors.append(f"round {rnd}: {e!r}")
                            return

            threads = [threading.Thread(target=agent, args=(rnd * 10 + i,), daemon=True) for i in range(4)]
            for t in threads:
                t.start()
            time.sleep(random.uniform(0.05, 0.5))
            stop.set()
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait()
            for t in threads:
                t.join(10)
            check(not errors, f"calls failed while the broker ran: {errors[:3]}")
        b.start()
        alice = b.key("alice")
        for tid in acked["tasks"]:
            info = call(b.port, alice, "task_info", {"task_id": tid})
            check(info["task"]["id"] == tid, f"acknowledged task {tid} lost")
        for tid in acked["revoked"]:
            check(call(b.port, alice, "task_info", {"task_id": tid})["is_revoked"], f"revocation of {tid} lost")
        for child, parent in acked["children"].items():
            info = call(b.port, alice, "task_info", {"task_id": child})
            check(info["task"]["parent_id"] == parent, f"delegation {parent} → {child} lost")
            if parent in acked["revoked"]:
                check(info["is_revoked"], f"child {child} of revoked {parent} not revoked (cascade)")
        b.stop()
        audit_verified(binary, b.lab.data, f"after {rounds} kills")
        return (f"{rounds} SIGKILLs; {len(acked['tasks'])} acknowledged tasks ({len(acked['children'])} delegations), "
                f"{len(acked['revoked'])} revocations: all there after restart; audit verify ok")
    finally:
        b.close()


def case_disk(binary, _rounds):
    """A full data dir: durable writes refused with the reason, nothing lost, recovery."""
    if os.geteuid() != 0:
        return "SKIPPED (needs root for the tmpfs)"
    mnt = tempfile.mkdtemp(prefix="ephyr-faults-disk-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", mnt], check=True)
    b = None
    try:
        b = Broker(binary, "ephyr-faults-disk-", data=os.path.join(mnt, "data"))
        b.start()
        alice = b.key("alice")
        before = [call(b.port, alice, "task_create", {"description": "before", "ttl": "1h"})["task_id"] for _ in range(5)]
        filler = os.path.join(mnt, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (65536, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        refused = None
        for _ in range(20):
            try:
                call(b.port, alice, "task_create", {"description": "full", "ttl": "1h"})
            except Refused as e:
                refused = str(e)
                break
        check(refused is not None, "a task was acknowledged on a full disk twenty times")
        check("space" in refused.lower() or "disk" in refused.lower() or "unavailable" in refused.lower(),
              f"the refusal does not say why: {refused!r}")
        # Reads still work.
        for tid in before:
            check(call(b.port, alice, "task_info", {"task_id": tid})["task"]["id"] == tid, "a read failed on a full disk")
        os.remove(filler)
        ok = None
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                ok = call(b.port, alice, "task_create", {"description": "after", "ttl": "1h"})["task_id"]
                break
            except Refused as e:
                last = str(e)
                time.sleep(0.5)
        check(ok is not None, f"writes did not come back after space returned: {last!r}")
        b.stop()
        b.start()
        alice = b.key("alice")
        for tid in before + [ok]:
            check(call(b.port, alice, "task_info", {"task_id": tid})["task"]["id"] == tid, f"{tid} lost after the restart")
        b.stop()
        audit_verified(binary, b.lab.data, "after a full disk")
        return f"refused with {refused!r}; reads served; writes back after space returned; restart and audit verify ok"
    finally:
        if b:
            b.close()
        subprocess.run(["umount", "-l", mnt])
        shutil.rmtree(mnt, ignore_errors=True)


def keygen(dirname):
    path = os.path.join(dirname, "id")
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path)
    return path + ".pub"


def cert_sign(binary, sock, pub, timeout=60):
    """One `ephyr cert sign` on the local socket (the completed process)."""
    return subprocess.run([binary, "cert", "sign", "--socket", sock, "--public-key", pub, "--principal", "ephyr-read"],
                          capture_output=True, text=True, timeout=timeout)


def audit_verified(binary, data, when):
    """`ephyr audit verify` on `data` passes, or the case fails naming `when`."""
    v = subprocess.run([binary, "audit", "verify", "--json", "--data-dir", data], capture_output=True, text=True)
    check(v.returncode == 0, f"audit verify {when}: {v.stdout[-2000:]} {v.stderr[-2000:]}")


def case_signer(binary, rounds):
    """The signer worker killed mid-signature, several times."""
    b = Broker(binary, "ephyr-faults-signer-").start()
    sock = os.path.join(b.lab.work, "ephyr.sock")
    pub = keygen(b.lab.work)
    results = []
    try:
        kills = max(3, rounds // 20)
        for k in range(kills):
            worker = b.status()["signer"]["worker_pid"]
            stop = threading.Event()

            def signer_load():
                while not stop.is_set():
                    p = cert_sign(binary, sock, pub)
                    results.append((p.returncode, p.stdout, p.stderr))

            threads = [threading.Thread(target=signer_load, daemon=True) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(random.uniform(0.1, 0.4))
            os.kill(worker, signal.SIGKILL)
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(30)
            check(b.proc.poll() is None, f"the broker stopped after a worker kill: {b.proc.returncode}")
            st = b.status()
            check(st["signer"]["worker_pid"] != worker, "the worker was not replaced")
            check(st["signer"]["restarts"] == k + 1, f"restarts {st['signer']['restarts']} after {k + 1} kills")
        failed = [r for r in results if r[0] != 0]
        for code, out, err in results:
            if code == 0:
                cert = os.path.join(b.lab.work, "c-cert.pub")
                with open(cert, "w") as f:
                    f.write(out)
                check(subprocess.run(["ssh-keygen", "-L", "-f", cert], capture_output=True).returncode == 0,
                      "a certificate printed during a kill does not parse")
            else:
                check("signer" in err.lower(), f"a failure does not name the signer: {err!r}")
        after = cert_sign(binary, sock, pub)
        check(after.returncode == 0, f"signing after the kills: {after.stderr}")
        signed = sum(1 for r in results if r[0] == 0) + 1
        reasons = sorted({r[2].strip().splitlines()[-1] for r in failed}) if failed else []
        inside = kills_inside(b, binary, sock, pub)
        signed += inside["signed"]
        # Nothing half-issued: the log holds one issuance per certificate handed out, no serial twice.
        q = run(binary, "audit", "query", "--kind", "cert", "--json", "--data-dir", b.lab.data).stdout
        issued = [json.loads(ln) for ln in q.splitlines() if '"cert_issued"' in ln]
        serials = [e["outcome"]["serial"] for e in issued]
        check(len(issued) == signed, f"{len(issued)} certificates in the audit log, {signed} handed out")
        check(len(set(serials)) == len(serials), "a serial was issued twice")
        audit_verified(binary, b.lab.data, "after the kills")
        return (f"{kills} worker kills during {len(results)} signatures: {len(failed)} failed closed "
                f"({'; '.join(reasons)[:300]}), every issued certificate parses; "
                f"{inside['cert']} kills inside a signature and {inside['seal']} inside a seal (the answer made, "
                f"not sent): refused with {inside['reasons']['cert']!r} and {inside['reasons']['seal']!r}, nothing "
                f"issued or stored; "
                f"{len(issued)} issuances logged for {signed} certificates handed out, serials unique, audit "
                f"verify ok; service resumed without a restart")
    finally:
        b.close()


def kill_on_answer(pid):
    """Kills signer worker `pid` (SIGKILL, by strace's fault injection) as it enters its next
    `sendto`: it has read a request and made the answer, and dies before sending it (the call is
    also failed, so the answer cannot leave even before the signal lands). Returns the tracer once
    the worker is traced."""
    tracer = subprocess.Popen(["strace", "-qq", "-o", "/dev/null", "-p", str(pid), "-e", "trace=sendto",
                               "-e", "inject=sendto:error=EPIPE:signal=KILL"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 10
    while time.time() < deadline:
        with open(f"/proc/{pid}/status") as f:
            if re.search(r"^TracerPid:\s*[1-9]", f.read(), re.M):
                return tracer
        time.sleep(0.01)
    tracer.kill()
    raise AssertionError(f"strace did not attach to the signer worker {pid}: {tracer.stderr.read()[-500:]!r}")


def replaced(b, old_pid, seconds=15):
    """The signer's status once a worker other than `old_pid` is up (a new one starts after a
    short back-off when several died in a row)."""
    deadline = time.time() + seconds
    while True:
        st = b.status()["signer"]
        if st.get("worker_pid") and st["worker_pid"] != old_pid:
            return st
        check(time.time() < deadline, f"no new signer worker {seconds} s after {old_pid} died: {st}")
        time.sleep(0.05)


def kills_inside(b, binary, sock, pub, want=2):
    """`want` kills inside a certificate signature and `want` inside a task key's seal, each landing
    between the worker reading the request and sending its answer (kill_on_answer). The request
    fails closed naming the worker; no certificate reaches the caller, no task is stored; the next
    worker serves the next request. A kill that lands on another request first (an audit
    checkpoint's signature) is not counted and the round is done again."""
    alice = b.key("alice")
    replaced(b, None)
    tasks_before = {t["id"] for t in call(b.port, alice, "task_list", {})["tasks"]}
    done, reasons, signed, rounds = {"cert": 0, "seal": 0}, {}, 0, 0
    while min(done.values()) < want:
        rounds += 1
        check(rounds <= 6 * want, f"{rounds} rounds for {want} kills inside each request kind: {done}")
        what = "cert" if done["cert"] <= done["seal"] else "seal"
        before = b.status()["signer"]
        tracer = kill_on_answer(before["worker_pid"])
        try:
            if what == "cert":
                p = cert_sign(binary, sock, pub)
                failure = None if p.returncode == 0 else p.stderr
                signed += p.returncode == 0
                check(p.returncode == 0 or not p.stdout.strip(), f"a failed signature printed {p.stdout[:200]!r}")
            else:
                try:
                    created = call(b.port, alice, "task_create", {"description": "seal", "ttl": "1h"}, timeout=30)
                    failure, tasks_before = None, tasks_before | {created["task_id"]}
                except Refused as e:
                    failure = str(e)
        finally:
            tracer.wait(timeout=30)
        after = replaced(b, before["worker_pid"])
        check(after["restarts"] == before["restarts"] + 1, f"restarts {before['restarts']} -> {after['restarts']}")
        if failure is None:
            continue  # the kill landed on another request (a checkpoint) before ours
        check("died while handling this request; nothing was issued" in failure,
              f"a {what} whose worker died before answering: {failure!r}")
        reasons[what] = failure.strip().splitlines()[-1]
        done[what] += 1
        tasks_now = {t["id"] for t in call(b.port, alice, "task_list", {})["tasks"]}
        check(tasks_now == tasks_before, f"a task was stored for a failed seal: {tasks_now - tasks_before}")
    # The replacement serves both kinds at once.
    p = cert_sign(binary, sock, pub)
    check(p.returncode == 0, f"signing after the kills inside: {p.stderr}")
    call(b.port, alice, "task_create", {"description": "after", "ttl": "1h"})
    return {**done, "reasons": reasons, "signed": signed + 1}


def case_keeper(binary, _rounds):
    """The keeper killed mid-seal: exit 70 with the reason; nothing acknowledged lost."""
    b = Broker(binary, "ephyr-faults-keeper-").start()
    try:
        alice = b.key("alice")
        keeper = b.status()["signer"]["keeper_pid"]
        acked, stop = [], threading.Event()

        def creator():
            while not stop.is_set():
                try:
                    acked.append(call(b.port, alice, "task_create", {"description": "seal", "ttl": "1h"}, timeout=5)["task_id"])
                except (Refused, OSError, http.client.HTTPException):
                    if b.proc.poll() is None and not stop.is_set():
                        time.sleep(0.01)

        threads = [threading.Thread(target=creator, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        os.kill(keeper, signal.SIGKILL)
        code = b.proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join(10)
        err = b.proc.stderr.read().decode(errors="replace")
        check(code == 70, f"exit code {code} after the keeper was killed: {err[-1500:]}")
        check("restart the ephyr service" in err, f"the broker did not say why it stopped: {err[-1500:]}")
        b.start()
        for tid in acked:
            check(call(b.port, b.key("alice"), "task_info", {"task_id": tid})["task"]["id"] == tid, f"{tid} lost")
        return f"exit 70 with the reason; {len(acked)} tasks acknowledged before the kill, all there after the restart"
    finally:
        b.close()


def case_reload(binary, _rounds):
    """Policy reloads in a burst under load."""
    b = Broker(binary, "ephyr-faults-reload-").start()
    sock = os.path.join(b.lab.work, "ephyr.sock")
    try:
        path = os.path.join(b.lab.etc, "bench.yaml")
        other = b.policy.replace("web: {host: 10.0.0.1", "web: {host: 10.0.0.2")
        errors, calls, stop = [], [0], threading.Event()

        def agent():
            while not stop.is_set():
                try:
                    targets = call(b.port, b.key("alice"), "list_targets", {})
                    calls[0] += 1
                    check("web" in json.dumps(targets), f"list_targets lost the target: {targets}")
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    errors.append(repr(e))

        threads = [threading.Thread(target=agent, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        for i in range(50):
            with open(path, "w") as f:
                f.write(other if i % 2 == 0 else b.policy)
            r = subprocess.run([binary, "policy", "reload", "--socket", sock], capture_output=True, text=True)
            check(r.returncode == 0, f"reload {i}: {r.stderr}")
        stop.set()
        for t in threads:
            t.join(10)
        check(not errors, f"{len(errors)} calls failed during reloads: {errors[:3]}")
        targets = call(b.port, b.key("alice"), "list_targets", {})
        check("10.0.0.1" in json.dumps(targets), f"the last policy is not in force: {targets}")
        return f"50 reloads under 8 agents: {calls[0]} calls, 0 failed; the last policy in force"
    finally:
        b.close()


def faketime_lib():
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    check(found, "libfaketime is not installed (Debian: apt install faketime)")
    return found[0]


def proof(key, port, token, tool, args, client_now):
    """An Ephyr-PoP header made by tests/helpers/pop_client.py on a client whose clock reads
    `client_now` (Unix seconds)."""
    pop_client.time = types.SimpleNamespace(time=lambda: client_now)
    return {"Ephyr-PoP": pop_client.pop_header(key, "POST", f"http://127.0.0.1:{port}/mcp", "tools/call", tool,
                                               tool_body(tool, args), token)}


def refusal(fn):
    """The reason `fn` (a call) is refused, or None if it is served."""
    try:
        fn()
        return None
    except Refused as e:
        return str(e)


def case_clock(binary, _rounds):
    """The broker's wall clock stepped two hours forward and back under load (libfaketime, the
    monotonic clock left alone as a real step leaves it)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    lib = faketime_lib()
    # libfaketime is an LD_PRELOAD library: a statically linked binary never loads it, and its
    # clock would not step at all.
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True)
    check(ldd.returncode == 0 and "libc.so" in ldd.stdout,
          f"{binary} is statically linked: libfaketime cannot step its clock (use a dynamically linked "
          f"build, e.g. target/debug/ephyr)")
    b = Broker(binary, "ephyr-faults-clock-")
    offset_file = os.path.join(b.lab.work, "clock-offset")

    def step(secs):
        with open(offset_file + ".new", "w") as f:
            f.write(f"{secs:+d}\n")
        os.replace(offset_file + ".new", offset_file)

    step(0)
    policy = b.policy.replace("limits: {", "limits: {task_ttl_max: 4h, ")
    b.start(policy, env={"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": offset_file, "FAKETIME_NO_CACHE": "1",
                         "DONT_FAKE_MONOTONIC": "1"})
    alice = b.key("alice")
    errors, calls, stop = [], [0], threading.Event()

    def agent():
        while not stop.is_set():
            try:
                call(b.port, alice, "list_targets", {})
                calls[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                errors.append(repr(e))

    threads = [threading.Thread(target=agent, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        keys = {n: Ed25519PrivateKey.generate() for n in "ABC"}
        pub = {n: base64.urlsafe_b64encode(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).rstrip(b"=").decode()
               for n, k in keys.items()}

        def task(n, ttl):
            t = call(b.port, alice, "task_create", {"description": f"clock {n}", "ttl": ttl, "holder_pub_key": pub[n]})
            return t["token"]

        def signed(n, token, client_now, headers=None):
            h = headers or proof(keys[n], b.port, token, "list_targets", {}, client_now)
            return lambda: call(b.port, token, "list_targets", {}, headers=h)

        tok_a, tok_c = task("A", "5m"), task("C", "3h")
        t0 = time.time()
        # A client 25 s ahead is inside the ±30 s window; its proof is taken once.
        p1 = proof(keys["C"], b.port, tok_c, "list_targets", {}, t0 + 25)
        check(refusal(signed("C", tok_c, 0, p1)) is None, "a proof 25 s ahead was refused")
        again = refusal(signed("C", tok_c, 0, p1))
        check(again and "replay" in again, f"the replayed proof: {again}")

        # Two hours forward. The 5-minute task has expired; a client whose clock did not step is
        # told by how much it is behind; one whose clock stepped too is served.
        step(7200)
        deadline = time.time() + 10
        while True:  # seen once the 5-minute task is refused for something else than the time
            why_a = refusal(signed("A", tok_a, time.time() + 7200))
            if why_a and "ahead of the broker's clock" not in why_a or time.time() > deadline:
                break
            time.sleep(0.2)
        check(why_a and "expired" in why_a, f"the 5-minute task two hours on: {why_a}")
        expired = why_a
        tok_b = task("B", "5m")
        behind = refusal(signed("B", tok_b, time.time()))
        check(behind and re.search(r"\b(719\d|720\d)s behind the broker's clock", behind), f"an unstepped client: {behind}")
        check(refusal(signed("B", tok_b, time.time() + 7200)) is None, "a client with the stepped clock was refused")
        check(refusal(signed("C", tok_c, time.time() + 7200)) is None, "the 3-hour task was refused two hours on")

        # The nonce of the first proof is forgotten at the next collection (every 30 s), which
        # now sees its window long gone. Then the clock goes back: that proof is inside the
        # window again (its ts is t0 + 25), and must still not be taken a second time.
        time.sleep(max(0.0, t0 + 34 - time.time()))
        step(0)
        # Seen once a client with the corrected clock is served (the task made while the clock
        # was ahead keeps its expiry, two hours on).
        deadline = time.time() + 10
        while True:
            why_b = refusal(signed("B", tok_b, time.time()))
            if why_b is None or "behind the broker's clock" not in why_b or time.time() > deadline:
                break
            time.sleep(0.2)
        check(why_b is None, f"the task made while the clock was ahead, after the step back: {why_b}")
        replayed = refusal(signed("C", tok_c, 0, p1))
        check(replayed and "clock went back" in replayed, f"the proof replayed after the clock went back: {replayed}")
        # A fresh proof at the corrected time is served: the time the clock skipped over holds
        # no forgotten window.
        check(refusal(signed("C", tok_c, time.time())) is None, "a fresh proof after the step back was refused")
        # The task that expired while the clock was ahead stays dead.
        gone = refusal(signed("A", tok_a, time.time()))
        check(gone is not None, "the task that expired while the clock was ahead came back")
        stop.set()
        for t in threads:
            t.join(10)
        check(not errors, f"{len(errors)} agent calls failed across the steps: {errors[:3]}")
        b.stop()
        audit_verified(binary, b.lab.data, "after the steps")
        return (f"+2 h then back under 4 agents ({calls[0]} calls, 0 failed): 5-minute task {expired!r}, gone after the step back ({gone!r}), "
                f"unstepped client {behind!r}; replay after the step back refused ({replayed!r}); fresh proof served; "
                "audit verify ok")
    finally:
        stop.set()
        b.close()


def start_hostile(port=0):
    helper = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests/helpers/hostile_peer.py")
    p = subprocess.Popen(["python3", helper, str(port)], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline().split()[1])


def proxied(port, key, path, timeout=15):
    """(status, body bytes read, whether the body ended cleanly) of a proxied GET."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        r = c.getresponse()
        body, clean = b"", True
        try:
            while True:
                d = r.read1(65536)
                if not d:
                    break
                body += d
        except (http.client.IncompleteRead, OSError):
            clean = False
        return r.status, body, clean
    finally:
        c.close()


def until_ok(what, fn, seconds=20):
    """fn() until it returns without Refused (a remote's tools are read in the background)."""
    deadline = time.time() + seconds
    while True:
        try:
            return fn()
        except Refused as e:
            if time.time() > deadline:
                raise AssertionError(f"{what}: {e}")
            time.sleep(0.5)


def case_hostile(binary, _rounds):
    """Hostile, slow and down upstreams and remotes."""
    peer, pport = start_hostile()
    b = Broker(binary, "ephyr-faults-hostile-")
    alice = b.keys["alice"]
    policy = f"""services:
  hostile:
    url: http://127.0.0.1:{pport}
    credential: {{ type: bearer, secret: "env:HOSTILE_TOKEN" }}
    read_timeout: 2s
    max_response: 1MiB
remotes:
  bad: {{ url: "http://127.0.0.1:{pport}/mcp", timeout: 3s, max_response: 1MiB }}
network:
  allow: [127.0.0.1/32]
agents:
  alice:
    api_key_hash: "{alice['api_key_hash']}"
    services: {{ "*": {{}} }}
    remotes: {{ bad: {{}} }}
    rate_limit: 100000000/1s
"""
    b.start(policy, env={"HOSTILE_TOKEN": "sk-hostile-secret"})
    key = b.key("alice")
    seen = []
    try:
        check(proxied(b.port, key, "/v1/proxy/hostile/p/ok")[0] == 200, "the upstream does not work to begin with")
        ok = until_ok("the remote's tool never worked", lambda: call(b.port, key, "bad.act", {"mode": "ok"}))
        check(ok == {"done": True}, f"ok call: {ok}")
        rss0 = rss_kib(b.proc.pid)
        expect = {  # mode: (proxy status, words in the proxy's reason, words in the tool's reason)
            "garbage": (502, "upstream", "bad"), "close": (502, "upstream", "bad"),
            "silent": (504, "read_timeout", "bad"), "slow": (504, "read_timeout", "bad"),
            "oversized": (502, "max_response", "bad"), "headers": (502, "upstream", "bad"),
        }
        for mode, (status, pwords, twords) in expect.items():
            t = time.time()
            st, body, _ = proxied(b.port, key, f"/v1/proxy/hostile/p/{mode}")
            took = time.time() - t
            check(st == status and pwords in body.decode(errors="replace"),
                  f"proxy {mode}: {st} {body[:300]!r}")
            check(took < 6, f"proxy {mode} took {took:.1f} s")
            t = time.time()
            try:
                call(b.port, key, "bad.act", {"mode": mode}, timeout=20)
                raise AssertionError(f"remote {mode}: the call succeeded")
            except Refused as e:
                reason = str(e)
            took2 = time.time() - t
            check(twords in reason, f"remote {mode}: {reason}")
            check(took2 < 8, f"remote {mode} took {took2:.1f} s")
            seen.append(f"{mode}: proxy {st} in {took:.1f} s, tool refused in {took2:.1f} s ({reason[:90]})")
        # A body that never ends: cut at max_response, no clean end.
        st, body, clean = proxied(b.port, key, "/v1/proxy/hostile/p/endless")
        check(len(body) <= (1 << 20) + 65536 and not clean, f"endless: {len(body)} bytes came through, clean end {clean}")
        seen.append(f"endless: proxy {st}, cut after {len(body)} bytes")
        t = time.time()
        try:
            call(b.port, key, "bad.act", {"mode": "endless"}, timeout=20)
            raise AssertionError("remote endless: the call succeeded")
        except Refused as e:
            seen.append(f"endless: tool refused in {time.time() - t:.1f} s ({str(e)[:90]})")
        rss1 = rss_kib(b.proc.pid)
        check(rss1 - rss0 < 16 * 1024, f"RSS grew from {rss0} to {rss1} KiB with what the peer sent")
        # Down: refused with a reason, then back once the peer is.
        peer.kill()
        peer.wait()
        st, body, _ = proxied(b.port, key, "/v1/proxy/hostile/p/ok")
        check(st == 502, f"proxy to a down upstream: {st} {body[:200]!r}")
        try:
            call(b.port, key, "bad.act", {"mode": "ok"})
            raise AssertionError("remote down: the call succeeded")
        except Refused as e:
            check("is down" in str(e), f"remote down: {e}")
            seen.append(f"down: proxy {st}, tool refused ({str(e)[:90]})")
        peer, _ = start_hostile(pport)
        check(proxied(b.port, key, "/v1/proxy/hostile/p/ok")[0] == 200, "the upstream did not come back")
        until_ok("the remote did not come back", lambda: call(b.port, key, "bad.act", {"mode": "ok"}))
        check(b.proc.poll() is None, "the broker stopped")
        return f"RSS {rss0} -> {rss1} KiB; " + "; ".join(seen)
    finally:
        peer.kill()
        b.close()


CASES = {"kill": case_kill, "disk": case_disk, "signer": case_signer, "keeper": case_keeper, "hostile": case_hostile,
         "reload": case_reload, "clock": case_clock}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/debug/ephyr")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("cases", nargs="*", metavar="CASE", help=" | ".join(CASES))
    a = ap.parse_args()
    unknown = [c for c in a.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r} (cases: {', '.join(CASES)})")
    binary = os.path.abspath(a.bin)
    failed = 0
    for name in a.cases or list(CASES):
        t0 = time.time()
        try:
            what = CASES[name](binary, a.rounds)
            print(f"PASS {name} ({time.time() - t0:.0f} s): {what}", flush=True)
        except Exception as e:  # noqa: BLE001 - a case's failure is reported, the others still run
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.0f} s): {e}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
