// A real MCP client: the official TypeScript SDK over Streamable HTTP.
// Usage: node ts_client.mjs <url> <credential>
// Prints one JSON object describing what the session saw (the Rust test asserts on it).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, credential] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${credential}` } },
});
const client = new Client({ name: "ephyr-ts-test", version: "1.0.0" });
const out = {};
try {
  await client.connect(transport);
  out.protocolVersion = transport.protocolVersion;
  out.sessionId = transport.sessionId ?? null;
  out.serverInfo = client.getServerVersion();
  out.capabilities = client.getServerCapabilities();
  out.instructions = client.getInstructions();
  out.tools = (await client.listTools()).tools;
  out.resources = (await client.listResources()).resources.map((r) => r.uri);
  out.overview = (await client.readResource({ uri: "ephyr://overview" })).contents[0].text;
  const call = await client.callTool({ name: "list_targets", arguments: {} });
  out.listTargets = { isError: call.isError ?? false, text: call.content[0].text };
  const bad = await client.callTool({ name: "list_targets", arguments: { nope: 1 } });
  out.badArgs = { isError: bad.isError ?? false, text: bad.content[0].text };
  try {
    await client.callTool({ name: "no_such_tool", arguments: {} });
    out.unknownTool = "no error";
  } catch (e) {
    out.unknownTool = { code: e.code, message: e.message };
  }
  try {
    await client.readResource({ uri: "ephyr://nope" });
    out.unknownResource = "no error";
  } catch (e) {
    out.unknownResource = { code: e.code, message: e.message };
  }
  out.ping = await client.ping();
  await transport.terminateSession();
  out.terminated = true;
} catch (e) {
  out.error = String(e?.stack ?? e) + (e?.cause ? `\ncause: ${e.cause.code ?? ""} ${e.cause.message ?? e.cause}` : "");
}
await client.close().catch(() => {});
console.log(JSON.stringify(out));
