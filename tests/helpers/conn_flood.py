"""An attacker that opens many idle connections to the broker from one loopback source address.

Usage: conn_flood.py HOST PORT SOURCE COUNT

Opens COUNT TCP connections from SOURCE (a 127.x.y.z address), sends a partial request line on
each (a slow client), then reports on stdout, as one JSON line, how many the broker kept open and
how many it refused (a 503 answer, or a close), with the refusal codes seen. It then holds the
open connections until its standard input closes, and exits.
"""
import json
import socket
import sys
import time

host, port, source, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
socks = []
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect((host, port))
    s.sendall(b"GET /healthz HTTP/1.1\r\n")
    socks.append(s)
time.sleep(0.5)
kept, refused, codes = [], 0, {}
for s in socks:
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        kept.append(s)
        continue
    refused += 1
    text = data.decode("latin-1")
    code = "closed"
    if " 503 " in text.split("\r\n", 1)[0]:
        body = text.split("\r\n\r\n", 1)[-1]
        try:
            code = json.loads(body)["error"]
        except ValueError:
            code = "503"
    codes[code] = codes.get(code, 0) + 1
    s.close()
print(json.dumps({"open": len(kept), "refused": refused, "codes": codes}), flush=True)
sys.stdin.read()
for s in kept:
    s.close()
