"""The Python `mcp` SDK over HTTPS, and what a TLS peer sees.

Usage:
    tls_client.py mcp URL CREDENTIAL [CA_FILE]   list tools with the SDK; CA_FILE is the only
                                                 trust anchor (none: the system's)
    tls_client.py peer HOST PORT                 the server certificate's SHA-256 (no checks)
    tls_client.py login HOST PORT CA NAME PASSWORD   the console's Set-Cookie after sign-in
Prints one JSON object.
"""

import asyncio
import hashlib
import json
import socket
import ssl
import sys
import urllib.parse

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def mcp(url, cred, ca):
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {cred}"}, verify=ctx)
    try:
        async with Client(streamable_http_client(url, http_client=http)) as c:
            tools = await c.list_tools()
            return {"ok": True, "protocol_version": c.protocol_version, "tools": len(tools.tools)}
    except BaseException as e:  # noqa: BLE001 - the test reads what failed
        text = repr(e)
        while getattr(e, "exceptions", None):
            e = e.exceptions[0]
            text += " | " + repr(e)
        return {"ok": False, "error": text}


def peer(host, port):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=10) as s, ctx.wrap_socket(s, server_hostname="localhost") as t:
        der = t.getpeercert(binary_form=True)
        return {"sha256": hashlib.sha256(der).hexdigest(), "version": t.version()}


def login(host, port, ca, name, password):
    ctx = ssl.create_default_context(cafile=ca)
    body = urllib.parse.urlencode({"name": name, "password": password})
    origin = f"https://{host}:{port}"
    with socket.create_connection((host, int(port)), timeout=20) as s, ctx.wrap_socket(s, server_hostname=host) as t:
        req = (f"POST /login HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: {origin}\r\nConnection: close\r\n"
               f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n{body}")
        t.sendall(req.encode())
        raw = b""
        while chunk := t.recv(65536):
            raw += chunk
    head = raw.split(b"\r\n\r\n")[0].decode()
    status = int(head.split()[1])
    cookie = [l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.lower().startswith("set-cookie:")]
    return {"status": status, "set_cookie": cookie[0] if cookie else None}


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "mcp":
        out = asyncio.run(mcp(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None))
    elif cmd == "peer":
        out = peer(sys.argv[2], sys.argv[3])
    else:
        out = login(*sys.argv[2:7])
    print(json.dumps(out))
