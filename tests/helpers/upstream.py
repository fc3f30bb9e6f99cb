#!/usr/bin/env python3
"""A real HTTP(S) upstream for the proxy tests (Python's http.server, HTTP/1.1 keep-alive).

    upstream.py serve [--host H] [--port P] [--log FILE] [--tls CERT KEY] [--client-ca CA]
        Prints "READY <port>" once listening. Every request is appended to --log as a JSON line
        {method, path, headers, body} before it is answered. Routes:
          /echo...            200, JSON of the request as received (headers included)
          /redirect?to=URL    302 to URL
          /sse?n=N&delay=S    text/event-stream, chunked: "data: tok<i>" every S seconds
          /bytes?n=N          N bytes with Content-Length
          /chunked?n=N        N bytes, chunked in 16 KiB pieces
          /slow?delay=S       waits S seconds before answering
          /gzip               a gzip-encoded body
          /gzip-te            the echo, gzip-compressed as a transfer-coding
                              ("Transfer-Encoding: gzip, chunked"): a hostile upstream
          /cookie             Set-Cookie, WWW-Authenticate and a harmless header
          POST /v1/chat/completions   an OpenAI-style stand-in (the real API is paid and
                              unreachable here): needs "Authorization: Bearer $LLM_KEY";
                              "stream": true gives chunk events 0.2 s apart
          POST /v1/messages   an Anthropic-style stand-in: needs "x-api-key: $LLM_KEY" and
                              anthropic-version; streams message events 0.2 s apart
          /v1/organization/projects/<id>/service_accounts[/<account>]
                              a STAND-IN for OpenAI's admin API (project service accounts;
                              paid and unreachable here), shapes from its published reference:
                              POST creates an account with an api_key (expires_at from
                              expires_in_seconds; none with create_service_account_only),
                              POST .../<account>/api_keys adds a key (scopes, expiry), GET lists
                              (limit/after/has_more/last_id), DELETE deletes the account and its
                              keys; needs "Authorization: Bearer $ADMIN_KEY"
          /_standin/accounts  the stand-in's live accounts (for the test to check)
          POST /_standin/hang the next account creation stores the account, then never answers
          anything else       the same as /echo
    upstream.py certs DIR
        Writes a test CA, a server certificate for localhost (only) and a client certificate
        (ca.pem, server.pem, server.key, client.pem, client.key, other-ca.pem).
"""

import datetime
import gzip
import json
import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
ACCOUNTS = {}  # id -> account (with its key), the admin API stand-in's state
STATE = {"hang": False, "seq": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_file = None

    def log_message(self, *args):
        pass

    def record(self, body):
        entry = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("utf-8", "replace"),
        }
        if self.log_file:
            with LOCK, open(self.log_file, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return entry

    def send(self, status, body, ctype="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        entry = self.record(body)
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        route = url.path
        if route.startswith("/v1/organization/projects/"):
            self.admin(route, q, body)
        elif route.startswith("/client-metadata/"):
            # An OAuth client ID metadata document naming itself (or, for /client-metadata/liar,
            # another URL); redirect_uri from the query.
            own = "https://%s%s" % (self.headers.get("Host"), self.path)
            doc = {
                "client_id": "https://elsewhere.example/client" if route.endswith("/liar") else own,
                "client_name": "cimd test client",
                "redirect_uris": [q.get("redirect_uri", "http://127.0.0.1:9/cb")],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
            }
            self.send(200, json.dumps(doc).encode())
        elif route == "/_standin/accounts":
            with LOCK:
                self.send(200, json.dumps(list(ACCOUNTS.values())).encode())
        elif route == "/_standin/hang":
            STATE["hang"] = True
            self.send(200, b"{}")
        elif route.endswith("/chat/completions") or route.endswith("/v1/messages"):
            self.llm(route, body)
        elif route.startswith("/redirect"):
            self.send(302, b"", extra=[("Location", q.get("to", "/"))])
        elif route.startswith("/sse"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(q.get("n", "5"))):
                self.chunk(b"data: tok%d t=%.3f\n\n" % (i, time.time()))
                time.sleep(float(q.get("delay", "0.2")))
            self.chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        elif route.startswith("/bytes"):
            self.send(200, b"x" * int(q.get("n", "10")), ctype="application/octet-stream")
        elif route.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            left = int(q.get("n", "10"))
            try:
                while left > 0:
                    k = min(left, 16384)
                    self.chunk(b"y" * k)
                    left -= k
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif route.startswith("/slow"):
            time.sleep(float(q.get("delay", "5")))
            self.send(200, b'{"slow":true}')
        elif route.startswith("/gzip-te"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "gzip, chunked")
            self.end_headers()
            self.chunk(gzip.compress(json.dumps(entry).encode()))
            self.chunk(b"")
        elif route.startswith("/gzip"):
            self.send(200, gzip.compress(json.dumps(entry).encode()), extra=[("Content-Encoding", "gzip")])
        elif route.startswith("/cookie"):
            self.send(200, b"{}", extra=[("Set-Cookie", "sid=abc"), ("WWW-Authenticate", "Bearer"), ("X-Fine", "yes")])
        else:
            self.send(200, json.dumps(entry).encode())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any


    def admin(self, route, q, body):
        if self.headers.get("Authorization") != "Bearer " + os.environ.get("ADMIN_KEY", "-"):
            err = {"error": {"message": "Invalid admin key", "type": "invalid_request_error"}}
            return self.send(401, json.dumps(err).encode())
        parts = route.split("/")  # ['', 'v1', 'organization', 'projects', id, 'service_accounts', acct?]
        if len(parts) < 6 or parts[5] != "service_accounts":
            return self.send(404, b'{"error":{"message":"not found"}}')
        project = parts[4]
        account = parts[6] if len(parts) > 6 else None
        if self.command == "POST" and account and len(parts) == 8 and parts[7] == "api_keys":
            req = json.loads(body or b"{}")
            with LOCK:
                acct = ACCOUNTS.get(account)
                if acct is None:
                    return self.send(404, b'{"error":{"message":"No such service account"}}')
                STATE["seq"] += 1
                n = STATE["seq"]
                now = int(time.time())
                exp = req.get("expires_in_seconds")
                key = {"object": "organization.project.service_account.api_key", "id": f"key_{n}",
                       "name": req.get("name", ""), "created_at": now, "value": f"sk-svcacct-disposable-{n}",
                       "expires_at": now + exp if exp else None, "scopes": req.get("scopes")}
                acct["api_key"] = key
            return self.send(200, json.dumps(key).encode())
        if self.command == "POST" and account is None:
            req = json.loads(body or b"{}")
            with LOCK:
                STATE["seq"] += 1
                n = STATE["seq"]
                now = int(time.time())
                exp = req.get("expires_in_seconds")
                only = bool(req.get("create_service_account_only"))
                acct = {"object": "organization.project.service_account", "id": f"svc_acct_{n}",
                        "name": req.get("name", ""), "role": "none" if only else "member", "created_at": now,
                        "project": project,
                        "api_key": None if only else {"object": "organization.project.service_account.api_key",
                                                      "value": f"sk-svcacct-disposable-{n}", "name": "Secret Key",
                                                      "created_at": now, "id": f"key_{n}",
                                                      "expires_at": now + exp if exp else None}}
                ACCOUNTS[acct["id"]] = acct
                hang = STATE["hang"]
                STATE["hang"] = False
            if hang:
                time.sleep(120)
                return
            return self.send(201, json.dumps(acct).encode())
        if self.command == "GET" and account is None:
            with LOCK:
                rows = [{k: v for k, v in a.items() if k not in ("api_key", "project")}
                        for a in ACCOUNTS.values() if a["project"] == project]
            after = q.get("after")
            if after:
                ids = [r["id"] for r in rows]
                rows = rows[ids.index(after) + 1:] if after in ids else []
            limit = int(q.get("limit", "20"))
            page = rows[:limit]
            out = {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                   "last_id": page[-1]["id"] if page else None, "has_more": len(rows) > limit}
            return self.send(200, json.dumps(out).encode())
        if self.command == "DELETE" and account:
            with LOCK:
                gone = ACCOUNTS.pop(account, None)
            if not gone:
                return self.send(404, b'{"error":{"message":"No such service account"}}')
            out = {"object": "organization.project.service_account.deleted", "id": account, "deleted": True}
            return self.send(200, json.dumps(out).encode())
        self.send(405, b'{"error":{"message":"method not allowed"}}')

    def sse_event(self, data, event=None):
        text = (f"event: {event}\n" if event else "") + "data: " + json.dumps(data) + "\n\n"
        self.chunk(text.encode())

    def llm(self, route, body):
        key = os.environ.get("LLM_KEY", "")
        req = json.loads(body or b"{}")
        words = ["Hello", " from", " the", " stand-in"]
        openai = route.endswith("/chat/completions")
        if openai:
            ok = self.headers.get("Authorization") == f"Bearer {key}"
        else:
            ok = self.headers.get("x-api-key") == key and self.headers.get("anthropic-version")
        if not ok:
            err = {"error": {"type": "authentication_error", "message": "invalid api key"}}
            return self.send(401, json.dumps(err).encode())
        model = req.get("model", "m")
        if not req.get("stream"):
            if openai:
                out = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}}
            else:
                out = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                       "content": [{"type": "text", "text": "".join(words)}], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 4}}
            return self.send(200, json.dumps(out).encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if openai:
            for i, w in enumerate(words):
                delta = {"role": "assistant", "content": w} if i == 0 else {"content": w}
                self.sse_event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                time.sleep(0.2)
            self.sse_event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            self.chunk(b"data: [DONE]\n\n")
        else:
            self.sse_event({"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 0}}},
                "message_start")
            self.sse_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                           "content_block_start")
            for w in words:
                self.sse_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
                               "content_block_delta")
                time.sleep(0.2)
            self.sse_event({"type": "content_block_stop", "index": 0}, "content_block_stop")
            self.sse_event({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"output_tokens": 4}}, "message_delta")
            self.sse_event({"type": "message_stop"}, "message_stop")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def serve(args):
    host, port, tls, client_ca = "127.0.0.1", 0, None, None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--host":
            host = args[i + 1]; i += 2
        elif a == "--port":
            port = int(args[i + 1]); i += 2
        elif a == "--log":
            Handler.log_file = args[i + 1]; i += 2
        elif a == "--tls":
            tls = (args[i + 1], args[i + 2]); i += 3
        elif a == "--client-ca":
            client_ca = args[i + 1]; i += 2
        else:
            sys.exit(f"unknown argument {a}")
    cls = ThreadingHTTPServer
    if ":" in host:
        import socket

        class V6(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        cls = V6
    srv = cls((host, port), Handler)
    srv.daemon_threads = True
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        if client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"READY {srv.server_address[1]}", flush=True)
    srv.serve_forever()


def certs(out):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(out, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(k, path):
        with open(path, "wb") as f:
            f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))

    def ca(cn):
        k = ec.generate_private_key(ec.SECP256R1())
        c = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
             .sign(k, hashes.SHA256()))
        return k, c

    def leaf(ca_k, ca_c, cn, sans, usage):
        k = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_c.subject).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_k.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return k, b.sign(ca_k, hashes.SHA256())

    ca_k, ca_c = ca("ephyr test CA")
    other_k, other_c = ca("some other CA")
    sk, sc = leaf(ca_k, ca_c, "localhost", [x509.DNSName("localhost")], ExtendedKeyUsageOID.SERVER_AUTH)
    ck, cc = leaf(ca_k, ca_c, "ephyr-client", [x509.DNSName("ephyr-client")], ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    for fname, c in [("ca.pem", ca_c), ("other-ca.pem", other_c), ("server.pem", sc), ("client.pem", cc)]:
        with open(os.path.join(out, fname), "wb") as f:
            f.write(c.public_bytes(pem))
    write_key(sk, os.path.join(out, "server.key"))
    write_key(ck, os.path.join(out, "client.key"))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        serve(sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "certs":
        certs(sys.argv[2])
    else:
        sys.exit(__doc__)
