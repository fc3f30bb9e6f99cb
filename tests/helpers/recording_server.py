"""A minimal session-era (2025-06-18) MCP server over Streamable HTTP that writes every JSON-RPC
message it receives to a file, one per line: what a remote sees of the broker. Its tool `wait`
answers after `seconds`; its tool `change` adds a tool `extra` and announces the change
(`notifications/tools/list_changed`) on the session's GET stream, which it holds open.

It records an `X-Team` request header with each message (`_x_team`); `wait` with `pad` adds
that many characters to its answer.

Usage: recording_server.py PORT LOG_FILE [CERT KEY]   (with CERT and KEY: over TLS)
"""

import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, log_path = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()
changed = threading.Condition()
state = {"extra": False, "generation": 0}
CHANGE = {"name": "change", "description": "Adds a tool.", "inputSchema": {"type": "object", "properties": {}}}
EXTRA = {"name": "extra", "description": "The added tool.", "inputSchema": {"type": "object", "properties": {}}}
TOOL = {
    "name": "wait",
    "description": "Waits, then says so.",
    "inputSchema": {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]},
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=None, headers=()):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        # The session's notification stream: close-delimited SSE, one event per change.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b": open\n\n")
        self.wfile.flush()
        seen = state["generation"]
        while True:
            with changed:
                changed.wait_for(lambda: state["generation"] != seen, timeout=30)
            if state["generation"] == seen:
                continue
            seen = state["generation"]
            note = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
            try:
                self.wfile.write(b"event: message\r\ndata: " + json.dumps(note).encode() + b"\r\n\r\n")
                self.wfile.flush()
            except OSError:
                return

    def do_POST(self):
        msg = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock, open(log_path, "a") as f:
            f.write(json.dumps(dict(msg, _x_team=self.headers.get("X-Team"))) + "\n")
        method, rid = msg.get("method"), msg.get("id")
        if rid is None:
            return self.reply(202)
        if method == "initialize":
            result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {"listChanged": True}},
                      "serverInfo": {"name": "recording", "version": "1"}}
            return self.reply(200, {"jsonrpc": "2.0", "id": rid, "result": result}, [("Mcp-Session-Id", "s1")])
        if method == "tools/list":
            tools = [TOOL, CHANGE] + ([EXTRA] if state["extra"] else [])
            return self.reply(200, {"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}})
        if method == "tools/call" and msg["params"]["name"] == "change":
            with changed:
                state["extra"] = True
                state["generation"] += 1
                changed.notify_all()
            return self.reply(200, {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "changed"}]}})
        if method == "tools/call":
            args = msg["params"]["arguments"]
            time.sleep(float(args.get("seconds", 0)))
            result = {"content": [{"type": "text", "text": "waited" + "." * int(args.get("pad", 0))}]}
            return self.reply(200, {"jsonrpc": "2.0", "id": rid, "result": result})
        return self.reply(200, {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "no"}})


srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
srv.daemon_threads = True
if len(sys.argv) > 4:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
