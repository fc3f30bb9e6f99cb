// A real MCP client: the official TypeScript SDK over Streamable HTTP lists its tools and calls one.
// Usage: node ts_call.mjs <url> <credential> <tool> <arguments as JSON>
// Prints {"tools": [names], "isError", "text", "progress": [the progress values reported]} as JSON
// (the call asks for progress notifications).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, credential, tool, args] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${credential}` } },
});
const client = new Client({ name: "ephyr-ts-call", version: "1.0.0" });
await client.connect(transport);
const tools = (await client.listTools()).tools.map((t) => t.name);
const progress = [];
const r = await client.callTool({ name: tool, arguments: JSON.parse(args) }, undefined, {
  onprogress: (p) => progress.push(p.progress),
});
console.log(JSON.stringify({ tools, isError: r.isError ?? false, text: r.content?.[0]?.text ?? "", progress }));
await transport.terminateSession();
await client.close();
