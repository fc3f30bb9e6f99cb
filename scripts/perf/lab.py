"""Shared set-up for the load scripts: a work dir with an initialised data dir, agent keys, and
`ephyr serve` on free loopback ports (optionally pinned to a CPU)."""
import json, os, shutil, socket, subprocess, tempfile, time


def run(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Lab:
    """A broker's files under a fresh temp dir (removed by `close`)."""

    def __init__(self, binary, prefix):
        self.binary = binary
        self.work = tempfile.mkdtemp(prefix=prefix)
        os.chmod(self.work, 0o755)
        self.data, self.etc = os.path.join(self.work, "data"), os.path.join(self.work, "etc")
        run(binary, "init", "--data-dir", self.data, "--config-dir", self.etc)
        self.broker = None

    def agent_key(self, name):
        """{api_key, api_key_hash} for a new agent key."""
        return json.loads(run(self.binary, "keygen", "agent", name, "--json").stdout)

    def serve(self, policy, cpu=None, env=None):
        """Starts `ephyr serve` with `policy` (text); returns (process, api port, dashboard port)
        once the API port accepts connections."""
        path = os.path.join(self.etc, "bench.yaml")
        with open(path, "w") as f:
            f.write(policy)
        os.chmod(path, 0o644)
        port, dport = free_port(), free_port()
        cmd = [self.binary, "serve", "--config", path, "--data-dir", self.data, "--listen", f"127.0.0.1:{port}",
               "--dashboard-listen", f"127.0.0.1:{dport}", "--socket", os.path.join(self.work, "ephyr.sock")]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self.broker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       env={**os.environ, "EPHYR_LOG": "warn", **(env or {})})
        wait_port(port)
        return self.broker, port, dport

    def close(self):
        if self.broker:
            self.broker.terminate()
            try:
                self.broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.broker.kill()
        shutil.rmtree(self.work, ignore_errors=True)


def start_sshd(work, ca_pub, subsystem_sftp=False):
    """An OpenSSH sshd on a free loopback port trusting the CA at `ca_pub` (certificates only; its
    files in `work`); returns (process, port, host key fingerprint SHA256:...)."""
    os.makedirs("/run/sshd", exist_ok=True)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(work, "host"))
    port = free_port()
    sftp = "Subsystem sftp /usr/lib/openssh/sftp-server\n" if subsystem_sftp else ""
    with open(os.path.join(work, "sshd_config"), "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work}/host\nPidFile {work}/sshd.pid\n"
                f"TrustedUserCAKeys {ca_pub}\nAuthorizedKeysFile none\nUsePAM no\nStrictModes no\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nMaxStartups 500\nMaxSessions 500\n" + sftp)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(work, "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fp = run("ssh-keygen", "-l", "-E", "sha256", "-f", os.path.join(work, "host.pub")).stdout.split()[1]
    return proc, port, fp


def start_nginx(work, cpu):
    """nginx on a free loopback port, one worker pinned to `cpu`, answering `return 200 "ok"` (the
    proxy's upstream in the load scripts); returns (process, port). Its files live in `work`."""
    port = free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx.err;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok"; }} }}
}}
""")
    proc = subprocess.Popen(["taskset", "-c", str(cpu), "/usr/sbin/nginx", "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def rss_kib(pid):
    """VmRSS of process `pid`, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1])


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def thread_stats(pid):
    """Per thread name of process `pid`: [voluntary context switches, involuntary ones, CPU
    ticks (utime + stime)], summed over the threads of that name (/proc/PID/task/*)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                st = dict(l.split(":", 1) for l in f if ":" in l)
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        name = st["Name"].strip()
        row = out.setdefault(name, [0, 0, 0])
        row[0] += int(st["voluntary_ctxt_switches"])
        row[1] += int(st["nonvoluntary_ctxt_switches"])
        row[2] += int(fields[11]) + int(fields[12])
    return out


def stats_delta(before, after):
    """`after - before` of two `thread_stats`, per thread name."""
    return {k: [a - before.get(k, [0, 0, 0])[i] for i, a in enumerate(v)] for k, v in after.items()}


def report_threads(delta, n, label):
    """Prints context switches and CPU per request, per thread name, for `n` requests."""
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    total = [sum(v[i] for v in delta.values()) for i in range(3)]
    print(f"{label}: per request {total[0] / n:.2f} voluntary + {total[1] / n:.2f} involuntary context "
          f"switches, {total[2] * tick_us / n:.0f} µs CPU (all threads)")
    for name, v in sorted(delta.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        if v[0] + v[1] + v[2]:
            print(f"    {name:<16} {v[0] / n:6.2f} vol  {v[1] / n:6.2f} invol  {v[2] * tick_us / n:6.0f} µs CPU")

