"""A client that ends its connections to the broker in every way a connection can end.

Usage: conn_endings.py HOST PORT ROUNDS

Each round opens one connection per way and ends it that way:
  clean       a whole request with `Connection: close`, the answer read to the end;
  keepalive   three requests on one connection, each answer read, then a close;
  reset_head  half a request line, then a reset (SO_LINGER 0);
  reset_body  the headers of a POST announcing 1000 bytes and 10 of them, then a reset;
  half_close  a whole request, then shutdown(SHUT_WR), then read to the end: the broker takes a
              half-close for a caller that has gone (hyper's default, so that a closed
              connection cancels its request), so it may answer or not, but it must close;
  pipelined   two requests in one write, then a reset before reading anything;
  silent      connect, then close without sending a byte.
Prints one JSON line: how many answers were 200 (half-closes apart), how many half-closed
connections were answered before the broker closed them, and how many ended each way. A
connection the broker leaves open fails the run (the socket's 10 s timeout).
"""
import json
import socket
import struct
import sys

host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
REQ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
ok, half_answered, ended = 0, 0, {}


def conn():
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def reset(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def read_all(s):
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def answers(s, n):
    """Reads `n` answers to GET /healthz (small, with Content-Length) and counts the 200s."""
    global ok
    buf = b""
    for _ in range(n):
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        while len(buf) < length:
            buf += s.recv(65536)
        buf = buf[length:]
        ok += head.startswith(b"HTTP/1.1 200")


for _ in range(rounds):
    s = conn()
    s.sendall(REQ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    ok += read_all(s).startswith(b"HTTP/1.1 200")
    s.close()

    s = conn()
    for _ in range(3):
        s.sendall(REQ)
        answers(s, 1)
    s.close()

    s = conn()
    s.sendall(b"GET /heal")
    reset(s)

    s = conn()
    s.sendall(b"POST /v1/certs/revoke HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n0123456789")
    reset(s)

    s = conn()
    s.sendall(REQ)
    s.shutdown(socket.SHUT_WR)
    got = read_all(s)
    assert got == b"" or got.startswith(b"HTTP/1.1 200"), got
    half_answered += got != b""
    s.close()

    s = conn()
    s.sendall(REQ + REQ)
    reset(s)

    s = conn()
    s.close()
    for way in ("clean", "keepalive", "reset_head", "reset_body", "half_close", "pipelined", "silent"):
        ended[way] = ended.get(way, 0) + 1

print(json.dumps({"ok": ok, "half_answered": half_answered, "ended": ended}), flush=True)
