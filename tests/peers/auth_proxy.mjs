// Test harness adapter, not a peer: the MCP conformance runner cannot send credentials, and
// ephyr refuses unauthenticated requests. This forwards every request unchanged (Host and
// Origin included, so DNS-rebinding checks still see what the runner sent) to the broker and
// adds `Authorization: Bearer <credential>`. Responses, streams included, pass through as is.
// Usage: node auth_proxy.mjs <broker host:port> <credential>; prints the port it listens on.
import http from "node:http";

const [target, credential] = process.argv.slice(2);
const [host, port] = target.split(":");
const server = http.createServer((req, res) => {
  const headers = { ...req.headers, authorization: `Bearer ${credential}` };
  const up = http.request({ host, port: Number(port), method: req.method, path: req.url, headers }, (r) => {
    res.writeHead(r.statusCode, r.headers);
    r.pipe(res);
  });
  up.on("error", (e) => {
    res.writeHead(502, { "content-type": "text/plain" });
    res.end(String(e));
  });
  req.pipe(up);
  res.on("close", () => up.destroy());
});
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
