"""A real MCP client doing OAuth: the official Python SDK (`mcp`) over Streamable HTTP with its
OAuthClientProvider: discovery (RFC 9728 / RFC 8414), dynamic registration, authorization code
with PKCE, then a tool call with the access token.

The "browser" is the test: this prints `AUTHORIZE <url>` and reads the redirect URL it was sent
back to (after an operator consented on the console) from stdin.

Usage: oauth_client.py <mcp url> <tool> <arguments as JSON>
Prints {"tools": [...], "text": ..., "isError": ..., "iss": ..., "token_prefix": "mac_"} as JSON.
"""

import asyncio
import json
import os
import sys
from urllib.parse import parse_qs, urlparse

import httpx2
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, os.path.dirname(__file__))
from oauth_store import Memory  # noqa: E402
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

REDIRECT = "http://127.0.0.1:53682/callback"


seen = {}


async def redirect(url: str) -> None:
    print("AUTHORIZE " + url, flush=True)


async def callback() -> AuthorizationCodeResult:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    q = parse_qs(urlparse(line.strip()).query)
    if "error" in q:
        raise SystemExit("authorization refused: " + q["error"][0])
    seen["iss"] = q.get("iss", [None])[0]
    return AuthorizationCodeResult(code=q["code"][0], state=q.get("state", [None])[0], iss=seen["iss"])


async def main() -> None:
    url, tool, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    store = Memory()
    provider = OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name="python-sdk-test",
            redirect_uris=[REDIRECT],
            token_endpoint_auth_method="none",
        ),
        storage=store,
        redirect_handler=redirect,
        callback_handler=callback,
    )
    http = httpx2.AsyncClient(auth=provider)
    async with Client(streamable_http_client(url, http_client=http)) as c:
        tools = [t.name for t in (await c.list_tools()).tools]
        r = await c.call_tool(tool, args)
        text = r.content[0].text if r.content else ""
    print(
        json.dumps(
            {
                "tools": tools,
                "text": text,
                "isError": bool(r.is_error),
                "iss": seen.get("iss"),
                "token_prefix": store.tokens.access_token[:4] if store.tokens else None,
                "refresh": bool(store.tokens and store.tokens.refresh_token),
            }
        ),
        flush=True,
    )


asyncio.run(main())
