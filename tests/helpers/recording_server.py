"""A minimal session-era (2025-06-18) MCP server over Streamable HTTP that writes every JSON-RPC
message it receives to a file, one per line: what a remote sees of the broker. Its one tool,
`wait`, answers after `seconds`.

Usage: recording_server.py PORT LOG_FILE
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, log_path = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()
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

    def do_POST(self):
        msg = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock, open(log_path, "a") as f:
            f.write(json.dumps(msg) + "\n")
        method, rid = msg.get("method"), msg.get("id")
        if rid is None:
            return self.reply(202)
        if method == "initialize":
            result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "recording", "version": "1"}}
            return self.reply(200, {"jsonrpc": "2.0", "id": rid, "result": result}, [("Mcp-Session-Id", "s1")])
        if method == "tools/list":
            return self.reply(200, {"jsonrpc": "2.0", "id": rid, "result": {"tools": [TOOL]}})
        if method == "tools/call":
            time.sleep(float(msg["params"]["arguments"].get("seconds", 0)))
            result = {"content": [{"type": "text", "text": "waited"}]}
            return self.reply(200, {"jsonrpc": "2.0", "id": rid, "result": result})
        return self.reply(200, {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "no"}})


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
