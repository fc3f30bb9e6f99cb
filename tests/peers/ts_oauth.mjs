// A real MCP client doing OAuth: the official TypeScript SDK's auth flow (RFC 9728 discovery,
// RFC 8414 metadata, dynamic registration, authorization code with PKCE) over Streamable HTTP,
// then a tool call with the access token. The "browser" is the test: this prints
// `AUTHORIZE <url>` and reads the URL it was sent back to from stdin.
// Usage: node ts_oauth.mjs <url> <tool> <arguments as JSON>
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";

const [url, tool, args] = process.argv.slice(2);
const redirectUrl = "http://127.0.0.1:53683/callback";
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const state = { tokens: undefined, client: undefined, verifier: undefined };
const provider = {
  get redirectUrl() { return redirectUrl; },
  get clientMetadata() {
    return { client_name: "ts-sdk-test", redirect_uris: [redirectUrl], token_endpoint_auth_method: "none",
      grant_types: ["authorization_code", "refresh_token"], response_types: ["code"] };
  },
  clientInformation() { return state.client; },
  saveClientInformation(c) { state.client = c; },
  tokens() { return state.tokens; },
  saveTokens(t) { state.tokens = t; },
  redirectToAuthorization(u) { console.log(`AUTHORIZE ${u.toString()}`); },
  saveCodeVerifier(v) { state.verifier = v; },
  codeVerifier() { return state.verifier; },
};

const connect = async () => {
  const transport = new StreamableHTTPClientTransport(new URL(url), { authProvider: provider });
  const client = new Client({ name: "ephyr-ts-oauth", version: "1.0.0" });
  await client.connect(transport);
  return { client, transport };
};

let session;
try {
  session = await connect();
} catch (e) {
  if (!(e instanceof UnauthorizedError)) throw e;
  const back = new URL((await lines.next()).value.trim());
  if (back.searchParams.get("error")) throw new Error(`refused: ${back.searchParams.get("error")}`);
  const t = new StreamableHTTPClientTransport(new URL(url), { authProvider: provider });
  await t.finishAuth(back.searchParams.get("code"));
  session = await connect();
}
const tools = (await session.client.listTools()).tools.map((t) => t.name);
const r = await session.client.callTool({ name: tool, arguments: JSON.parse(args) });
console.log(JSON.stringify({ tools, isError: r.isError ?? false, text: r.content?.[0]?.text ?? "",
  token_prefix: state.tokens?.access_token?.slice(0, 4), refresh: Boolean(state.tokens?.refresh_token) }));
await session.client.close();
process.exit(0);
