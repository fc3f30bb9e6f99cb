#!/usr/bin/env python3
"""Runs a command with Landlock hidden: landlock_create_ruleset fails with ENOSYS, as on a kernel
without Landlock. Installs a tiny seccomp filter (x86_64/aarch64: syscall 444) and execs argv[1:]."""
import ctypes, ctypes.util, os, platform, struct, sys

assert platform.machine() in ("x86_64", "aarch64"), "syscall number 444 is for x86_64/aarch64"
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
NR_LANDLOCK_CREATE_RULESET = 444
ENOSYS = 38
prog = b"".join(struct.pack("HBBI", *ins) for ins in [
    (0x20, 0, 0, 0),                              # ld [nr]
    (0x15, 0, 1, NR_LANDLOCK_CREATE_RULESET),     # jeq landlock_create_ruleset
    (0x06, 0, 0, 0x00050000 | ENOSYS),            # ret ERRNO(ENOSYS)
    (0x06, 0, 0, 0x7FFF0000),                     # ret ALLOW
])
buf = ctypes.create_string_buffer(prog, len(prog))


class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


fprog = Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
os.execv(sys.argv[1], sys.argv[1:])
