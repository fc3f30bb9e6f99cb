#!/usr/bin/env python3
"""Boots the appliance image (image/build.sh) under qemu and checks what a user gets at first boot.

Usage: tests/image.py DIR [--arch x86_64|aarch64] [--timeout 300]

DIR holds rootfs.ext4, vmlinuz, initrd.img and cmdline. The machine gets 512 MB and one CPU, TCG (KVM
with EPHYR_IMAGE_KVM=1), user-mode networking with the broker's two ports forwarded to
loopback, and the root file system in snapshot mode (the image file is not changed). Checks, each
failing with what was seen:
  * first boot prints the operator's password and the agent's API key on the serial console;
  * `ephyr doctor` (run by first boot) reports the signer sandbox enforced;
  * GET /healthz answers 200 over TLS on the forwarded API port;
  * MCP tools/list with the agent's key lists the task tools (the agent has no other grant);
  * the console's login page answers on the forwarded console port.
Prints boot-to-serving time (qemu start to the first healthy /healthz) and exits 0, else 1.
"""
import argparse, json, os, re, shutil, socket, ssl, subprocess, sys, tempfile, time, http.client

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--arch", default="x86_64")
ap.add_argument("--timeout", type=int, default=300)
a = ap.parse_args()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fail(msg):
    print(f"image test FAILED: {msg}", file=sys.stderr)
    print("---- serial console (last 60 lines) ----", file=sys.stderr)
    print("\n".join(serial_text().splitlines()[-60:]), file=sys.stderr)
    sys.exit(1)


work = tempfile.mkdtemp(prefix="ephyr-image-test-")
serial = os.path.join(work, "serial.log")


def serial_text():
    try:
        with open(serial, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


api, console = free_port(), free_port()
# The journal also goes to the serial line, so a failure shows the broker's own log.
cmdline = open(os.path.join(a.dir, "cmdline")).read().strip() + " systemd.journald.forward_to_console=1"
# KVM only when asked (EPHYR_IMAGE_KVM=1): a /dev/kvm that exists is not always usable (in a
# container without nested virtualisation the guest hangs before its first line).
kvm = os.environ.get("EPHYR_IMAGE_KVM") == "1" and a.arch == os.uname().machine
if a.arch == "x86_64":
    qemu = ["qemu-system-x86_64", "-machine", "q35" + (",accel=kvm" if kvm else ",accel=tcg"),
            "-cpu", "host" if kvm else "max"]
else:
    qemu = ["qemu-system-aarch64", "-machine", "virt" + (",accel=kvm" if kvm else ""),
            "-cpu", "host" if kvm else "max"]
qemu += [
    "-m", "512", "-smp", "1", "-no-reboot", "-display", "none", "-monitor", "none",
    "-serial", f"file:{serial}",
    "-kernel", os.path.join(a.dir, "vmlinuz"), "-initrd", os.path.join(a.dir, "initrd.img"),
    "-append", cmdline,
    "-drive", f"file={os.path.join(a.dir, 'rootfs.ext4')},format=raw,if=virtio,snapshot=on",
    "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{api}-:8554,hostfwd=tcp:127.0.0.1:{console}-:8553",
]
started = time.monotonic()
vm = subprocess.Popen(qemu, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
tls = ssl.create_default_context()
tls.check_hostname = False
tls.verify_mode = ssl.CERT_NONE  # the appliance's own local CA; its fingerprint is in its log


def request(port, method, path, body=None, headers=None):
    c = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, r.read()


try:
    deadline = started + a.timeout
    key = None
    while time.monotonic() < deadline and vm.poll() is None:
        m = re.search(r'MCP agent "agent" API key: (ephyr_ak_\S+)', serial_text())
        if m:
            key = m.group(1)
            break
        time.sleep(0.5)
    if key is None:
        fail(f"no API key on the serial console within {a.timeout}s (qemu exit {vm.poll()}: "
             f"{vm.stderr.read().decode(errors='replace') if vm.poll() is not None else ''})")
    text = serial_text()
    if not re.search(r"console operator: admin  password: \S{12,}", text):
        fail("no operator password on the serial console")
    healthy = None
    while time.monotonic() < deadline:
        try:
            status, _ = request(api, "GET", "/healthz")
            if status == 200:
                healthy = time.monotonic() - started
                break
        except (OSError, ssl.SSLError, http.client.HTTPException):
            pass
        time.sleep(0.25)
    if healthy is None:
        fail("GET /healthz never answered 200 on the forwarded API port")
    sandbox = [l for l in serial_text().splitlines() if "signer sandbox" in l]
    if not any(re.search(r"signer sandbox\s+ok\s+.*landlock ABI \d+ Enforced, seccomp Enforced", l) for l in sandbox):
        fail(f"ephyr doctor did not report the signer sandbox enforced: {sandbox}")
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}})
    status, out = request(api, "POST", "/mcp", body, {
        "Authorization": f"Bearer {key}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/list"})
    if status != 200:
        fail(f"tools/list: HTTP {status}: {out[:300]!r}")
    names = [t["name"] for t in json.loads(out)["result"]["tools"]]
    if "task_create" not in names or "exec" in names:
        fail(f"tools/list of an agent with no grants: {names}")
    status, page = request(console, "GET", "/login")
    if status != 200 or b"password" not in page.lower():
        fail(f"console /login: HTTP {status}")
    print(f"image boot ({a.arch}, {'KVM' if kvm else 'TCG'}): serving after {healthy:.1f} s; "
          f"doctor: signer sandbox enforced; tools/list: {len(names)} tools for the first-boot agent")
finally:
    vm.terminate()
    try:
        vm.wait(timeout=10)
    except subprocess.TimeoutExpired:
        vm.kill()
    shutil.rmtree(work, ignore_errors=True)
