"""A real MCP client (the Python `mcp` SDK over Streamable HTTP) runs one command through the
broker's exec tool, as a user's agent would.

Usage: mcp_exec.py URL CREDENTIAL TARGET ROLE COMMAND
Prints {"is_error", "text", "structured"} as JSON: the tool result's text and its
structuredContent (None when the protocol version has none).
"""

import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, credential: str, target: str, role: str, command: str) -> dict:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {credential}"})
    async with Client(streamable_http_client(url, http_client=http)) as c:
        r = await c.call_tool("exec", {"target": target, "role": role, "command": command})
        return {
            "protocol_version": c.protocol_version,
            "is_error": bool(r.is_error),
            "text": r.content[0].text,
            "structured": r.structured_content,
        }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:6]))))
