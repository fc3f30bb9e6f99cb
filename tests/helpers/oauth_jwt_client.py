"""A key-bound agent with the official Python SDK (`mcp`): the `oauth-client-credentials`
extension's PrivateKeyJWTOAuthProvider gets an access token with a JWT assertion signed by the
agent's own key (RFC 7523; no secret exists), then calls a tool over Streamable HTTP.

Usage: oauth_jwt_client.py <mcp url> <client id> <private key PEM file> <tool> <arguments JSON>
Prints {"tools": [...], "text": ..., "isError": ..., "token_prefix": "mac_"} as JSON.
"""

import asyncio
import json
import os
import sys

import httpx2
from mcp import Client
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider, SignedJWTParameters
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, os.path.dirname(__file__))
from oauth_store import Memory  # noqa: E402


async def main() -> None:
    url, client_id, pem_file, tool, args = sys.argv[1:6]
    pem = open(pem_file).read()
    store = Memory()
    params = SignedJWTParameters(issuer=client_id, subject=client_id, signing_key=pem, signing_algorithm="ES256")
    provider = PrivateKeyJWTOAuthProvider(
        server_url=url,
        storage=store,
        client_id=client_id,
        assertion_provider=params.create_assertion_provider(),
    )
    http = httpx2.AsyncClient(auth=provider)
    async with Client(streamable_http_client(url, http_client=http)) as c:
        tools = [t.name for t in (await c.list_tools()).tools]
        r = await c.call_tool(tool, json.loads(args))
        text = r.content[0].text if r.content else ""
    print(
        json.dumps(
            {
                "tools": tools,
                "text": text,
                "isError": bool(r.is_error),
                "token_prefix": store.tokens.access_token[:4] if store.tokens else None,
            }
        ),
        flush=True,
    )


asyncio.run(main())
