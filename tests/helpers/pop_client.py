"""Proof of possession, ephyr form, from Python: the example of docs/pop.md, run by tests/tasks.rs.

Usage: pop_client.py MCP_URL TOKEN SEED_HEX
Calls tools/call list_targets once with a fresh proof, then replays the identical request, and
prints {"status": ..., "replay_status": ..., "result": ...} as JSON.
"""

import base64
import hashlib
import json
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def pop_header(key: Ed25519PrivateKey, method: str, url: str, mcp_method: str, tool: str,
               body: bytes, token: str) -> str:
    """The Ephyr-PoP header value for one request."""
    u = urllib.parse.urlsplit(url)
    ts = int(time.time())
    nonce = b64url(secrets.token_bytes(16))
    text = "\n".join([
        "ephyr-pop-v1",
        method,
        u.netloc + u.path,                       # authority and path: no scheme, no query
        mcp_method or "-",
        tool or "-",
        hashlib.sha256(body).hexdigest(),
        hashlib.sha256(token.encode()).hexdigest(),
        str(ts),
        nonce,
    ])
    sig = key.sign(text.encode())
    return f"ts={ts}; nonce={nonce}; sig={b64url(sig)}"


def post(url: str, headers: dict, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main(url: str, token: str, seed_hex: str) -> dict:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))
    body = json.dumps({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "list_targets", "arguments": {}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "pop-example", "version": "1"},
        }},
    }).encode()
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "list_targets",
        "Ephyr-PoP": pop_header(key, "POST", url, "tools/call", "list_targets", body, token),
    }
    status, text = post(url, headers, body)
    replay_status, _ = post(url, headers, body)
    return {"status": status, "replay_status": replay_status, "result": text}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
