"""A hostile HTTP upstream and MCP remote in one, for scripts/faults.py: a plain-socket server
(no HTTP library, so it can break the protocol) that answers a proxied `GET /p/<mode>` or an MCP
`tools/call` of its tool `act` with `{"mode": <mode>}` in one of these ways:

  ok        a well-formed answer
  garbage   4 KiB of random bytes instead of an HTTP response, then close
  close     close the connection without a byte
  silent    accept the request and never answer (the connection stays open)
  slow      answer after 20 s
  oversized a 64 MiB body announced by Content-Length (sent until the reader goes away)
  endless   a chunked body that never ends (an event stream of comments for MCP)
  headers   a header line that never ends

`initialize` and `tools/list` are answered properly (session era, no session id), so the broker
exposes the tool; every other method gets "method not found".

Usage: hostile_peer.py [PORT]   (prints "port N" on the first line, then serves until killed)
"""

import json
import os
import socket
import sys
import threading
import time

TOOL = {"name": "act", "description": "Does what it is told.",
        "inputSchema": {"type": "object", "properties": {"mode": {"type": "string"}}, "required": ["mode"]}}


def read_request(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d:
            return None, None, None
        buf += d
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    while len(body) < length:
        d = c.recv(65536)
        if not d:
            break
        body += d
    return path, body, lines


def answer(c, status, body, ctype="application/json"):
    c.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
              f"Connection: close\r\n\r\n".encode() + body)


def misbehave(c, mode, ok_body, mcp):
    if mode == "ok":
        answer(c, "200 OK", ok_body)
    elif mode == "garbage":
        c.sendall(os.urandom(4096))
    elif mode == "close":
        pass
    elif mode == "silent":
        time.sleep(600)
    elif mode == "slow":
        time.sleep(20)
        answer(c, "200 OK", ok_body)
    elif mode == "oversized":
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 67108864\r\n\r\n")
        chunk = b"[" + b"0," * 32767 + b"0"
        for _ in range(1024):
            c.sendall(chunk)
    elif mode == "endless":
        ctype = "text/event-stream" if mcp else "text/plain"
        c.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        piece = b": keep reading\n\n" if mcp else b"y" * 1024
        while True:
            c.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    elif mode == "headers":
        c.sendall(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        while True:
            c.sendall(b"a" * 65536)
    else:
        answer(c, "400 Bad Request", b"unknown mode")


def mcp(c, body):
    msg = json.loads(body)
    method, mid = msg.get("method"), msg.get("id")
    if mid is None:
        c.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return
    if method == "initialize":
        result = {"protocolVersion": msg["params"].get("protocolVersion", "2025-06-18"),
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "hostile", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [TOOL]}
    elif method == "tools/call":
        mode = msg["params"].get("arguments", {}).get("mode", "ok")
        ok = {"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": '{"done": true}'}]}}
        misbehave(c, mode, json.dumps(ok).encode(), True)
        return
    else:
        answer(c, "200 OK", json.dumps({"jsonrpc": "2.0", "id": mid,
                                        "error": {"code": -32601, "message": "method not found"}}).encode())
        return
    answer(c, "200 OK", json.dumps({"jsonrpc": "2.0", "id": mid, "result": result}).encode())


def handle(c):
    try:
        path, body, _ = read_request(c)
        if path is None:
            return
        if path.startswith("/mcp"):
            mcp(c, body)
        elif path.startswith("/p/"):
            misbehave(c, path[3:].split("?")[0], b'{"ok": true}', False)
        else:
            answer(c, "404 Not Found", b"")
    except OSError:
        pass  # the broker went away: what it should do with a hostile peer
    finally:
        c.close()


def main():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    s.listen(64)
    print(f"port {s.getsockname()[1]}", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
