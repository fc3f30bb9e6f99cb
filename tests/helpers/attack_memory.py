#!/usr/bin/env python3
"""Tries to read another process's memory the three usual ways; prints JSON results.

Usage: attack_memory.py PID ADDRESS_HEX
Run as the broker's uid (the test uses setpriv). First a control experiment on a child of our
own proves the attack code works; then the same attacks against PID must all fail.
"""
import ctypes, ctypes.util, errno, json, os, sys, time

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
PTRACE_ATTACH, PTRACE_DETACH = 16, 17


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong,
                                  ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.c_ulong]
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def err_name():
    e = ctypes.get_errno()
    return errno.errorcode.get(e, str(e))


def attempt(pid, addr):
    out = {}
    rc = libc.ptrace(PTRACE_ATTACH, pid, None, None)
    if rc == 0:
        out["ptrace_attach"] = "ok"
        time.sleep(0.05)
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    else:
        out["ptrace_attach"] = err_name()
    buf = ctypes.create_string_buffer(16)
    local = IoVec(ctypes.cast(buf, ctypes.c_void_p), 16)
    remote = IoVec(ctypes.c_void_p(addr), 16)
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    out["process_vm_readv"] = "ok" if n > 0 else err_name()
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(addr)
            out["proc_mem"] = "ok" if f.read(16) else "empty"
    except OSError as e:
        out["proc_mem"] = errno.errorcode.get(e.errno, str(e.errno))
    return out


def first_readable(pid):
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            rng, perms = line.split()[:2]
            if perms.startswith("r"):
                return int(rng.split("-")[0], 16)
    raise SystemExit("no readable mapping")


target, address = int(sys.argv[1]), int(sys.argv[2], 16)
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
try:
    control = attempt(child, first_readable(child))
finally:
    os.kill(child, 9)
    os.waitpid(child, 0)
print(json.dumps({"uid": os.getuid(), "control": control, "target": attempt(target, address)}))
