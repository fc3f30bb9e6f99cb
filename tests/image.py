#!/usr/bin/env python3
"""Boots the appliance image (image/build.sh) under qemu and checks what a user gets at first boot.

Usage: tests/image.py DIR [--arch x86_64|aarch64] [--timeout 300]

DIR holds disk.img. The machine gets 512 MB and one CPU, TCG (KVM with EPHYR_IMAGE_KVM=1), the UEFI
firmware from Debian's ovmf (x86_64) or qemu-efi-aarch64 package, which starts the disk's boot
loader as it would on a PC or a UEFI board, user-mode networking with the broker's two ports
forwarded to loopback, and the disk in snapshot mode (the image file is not changed). Checks,
each failing with what was seen:
  * first boot prints the operator's password and the agent's API key on the serial console;
  * `ephyr doctor` (run by first boot) reports the signer sandbox enforced;
  * GET /healthz answers 200 over TLS on the forwarded API port;
  * MCP tools/list with the agent's key lists the task tools (the agent has no other grant);
  * the console's login page answers on the forwarded console port.
Prints boot-to-serving time (qemu start to the first healthy /healthz) and the whole appliance's
memory in use once idle (the guest's MemTotal - MemAvailable, reported by its virtio-balloon
driver over QMP: nothing runs in the guest to measure it), and exits 0, else 1.
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


def check_layout(disk):
    """The partition table and both file systems, read from the image file."""
    out = subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"{disk}: no partition table ({out.stderr.strip()})")
    table = json.loads(out.stdout)["partitiontable"]
    parts = table["partitions"]
    if table["label"] != "dos" or len(parts) != 2:
        fail(f"{disk}: expected an MBR with two partitions: {table}")
    boot, root = parts
    if boot["type"] != "c" or not boot.get("bootable") or root["type"] != "83":
        fail(f"{disk}: expected a bootable FAT32 partition then a Linux one: {parts}")
    at = f"{disk}@@{boot['start'] * 512}"
    listing = subprocess.run(["mdir", "-b", "-/", "-i", at, "::/"], capture_output=True, text=True).stdout
    files = {l.strip().lower() for l in listing.splitlines()}
    want = ["::/efi/boot/bootx64.efi" if a.arch == "x86_64" else "::/efi/boot/bootaa64.efi",
            "::/loader/loader.conf", "::/loader/entries/ephyr.conf", "::/vmlinuz", "::/initrd.img"]
    if a.arch == "aarch64":
        want += ["::/config.txt", "::/cmdline.txt", "::/start4.elf", "::/fixup4.dat", "::/bootcode.bin",
                 "::/bcm2711-rpi-4-b.dtb"]
    missing = [w for w in want if w not in files]
    if missing:
        fail(f"{disk}: the boot partition lacks {missing}")
    entry = subprocess.run(["mtype", "-i", at, "::/loader/entries/ephyr.conf"], capture_output=True,
                           text=True).stdout
    if "root=LABEL=ephyr-root" not in entry:
        fail(f"the boot entry does not name the root by label: {entry!r}")
    with open(disk, "rb") as f:
        f.seek(root["start"] * 512 + 1024)
        sb = f.read(256)
    if sb[0x38:0x3A] != b"\x53\xef" or sb[0x78:0x88].rstrip(b"\0") != b"ephyr-root":
        fail(f"{disk}: partition 2 is not an ext4 file system labelled ephyr-root")


try:
    check_layout(os.path.join(a.dir, "disk.img"))
except SystemExit:
    shutil.rmtree(work, ignore_errors=True)
    raise
api, console = free_port(), free_port()
qmp_path = os.path.join(work, "qmp.sock")
# KVM only when asked (EPHYR_IMAGE_KVM=1): a /dev/kvm that exists is not always usable (in a
# container without nested virtualisation the guest hangs before its first line).
kvm = os.environ.get("EPHYR_IMAGE_KVM") == "1" and a.arch == os.uname().machine
if a.arch == "x86_64":
    qemu = ["qemu-system-x86_64", "-machine", "q35" + (",accel=kvm" if kvm else ",accel=tcg"),
            "-cpu", "host" if kvm else "max"]
    code, varstore = "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"
else:
    qemu = ["qemu-system-aarch64", "-machine", "virt" + (",accel=kvm" if kvm else ""),
            "-cpu", "host" if kvm else "max"]
    code, varstore = "/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"
# The firmware's variable store is the machine's own, written at boot: a copy per run.
shutil.copy(varstore, os.path.join(work, "vars.fd"))
qemu += [
    "-m", "512", "-smp", "1", "-no-reboot", "-display", "none", "-monitor", "none",
    "-serial", f"file:{serial}", "-qmp", f"unix:{qmp_path},server=on,wait=off",
    "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
    "-drive", f"if=pflash,format=raw,unit=1,file={os.path.join(work, 'vars.fd')}",
    "-drive", f"file={os.path.join(a.dir, 'disk.img')},format=raw,if=virtio,snapshot=on",
    "-device", "virtio-balloon-pci,id=balloon0",
    "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{api}-:8554,hostfwd=tcp:127.0.0.1:{console}-:8553",
]
started = time.monotonic()
vm = subprocess.Popen(qemu, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
tls = ssl.create_default_context()
tls.check_hostname = False
tls.verify_mode = ssl.CERT_NONE  # the appliance's own local CA; its fingerprint is in its log


def qmp(*commands):
    """Runs QMP commands in order on a fresh connection; the last one's answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(qmp_path)
        f = s.makefile("rw")
        f.readline()  # the greeting
        answer = None
        for c in ({"execute": "qmp_capabilities"},) + commands:
            f.write(json.dumps(c) + "\n")
            f.flush()
            while True:
                m = json.loads(f.readline())
                if "return" in m or "error" in m:
                    answer = m
                    break
        return answer


def idle_memory(settle):
    """The guest's memory in use (MemTotal - MemAvailable) after `settle` seconds of idling."""
    balloon = "/machine/peripheral/balloon0"
    qmp({"execute": "qom-set", "arguments": {"path": balloon, "property": "guest-stats-polling-interval",
                                             "value": 2}})
    time.sleep(settle)
    stats = qmp({"execute": "qom-get", "arguments": {"path": balloon, "property": "guest-stats"}})
    st = stats.get("return", {}).get("stats", {})
    total, avail = st.get("stat-total-memory", -1), st.get("stat-available-memory", -1)
    if total <= 0 or avail < 0:
        return None
    return total, total - avail


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
    mem = idle_memory(15)
    if mem is None:
        fail("the guest's balloon driver reported no memory statistics")
    print(f"image boot ({a.arch}, {'KVM' if kvm else 'TCG'}): serving after {healthy:.1f} s; "
          f"doctor: signer sandbox enforced; tools/list: {len(names)} tools for the first-boot agent; "
          f"idle: {mem[1] / 2**20:.1f} MiB in use of {mem[0] / 2**20:.0f} MiB (MemTotal - MemAvailable)")
finally:
    vm.terminate()
    try:
        vm.wait(timeout=10)
    except subprocess.TimeoutExpired:
        vm.kill()
    shutil.rmtree(work, ignore_errors=True)
