"""A real MCP client (the Python `mcp` SDK over Streamable HTTP) lists the tools it is offered
and calls one.

Usage: mcp_call.py URL CREDENTIAL TOOL ARGS_JSON [progress]
Prints {"tools": [names], "is_error", "text", "progress": [messages]} as JSON; with `progress`
the call asks for progress notifications (a progress callback) and records their messages.
"""

import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, credential: str, tool: str, args: str, mode: str = "") -> dict:
    seen = []

    async def on_progress(progress, total, message):
        seen.append(message or str(progress))

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {credential}"})
    async with Client(streamable_http_client(url, http_client=http)) as c:
        tools = await c.list_tools()
        callback = on_progress if mode == "progress" else None
        r = await c.call_tool(tool, json.loads(args), progress_callback=callback)
        return {
            "tools": [t.name for t in tools.tools],
            "is_error": bool(r.is_error),
            "text": r.content[0].text if r.content else "",
            "progress": seen,
        }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:6]))))
