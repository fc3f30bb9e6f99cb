"""A real MCP client: the Python `mcp` SDK (2.x) over Streamable HTTP.

Usage: mcp_client.py URL CREDENTIAL [MODE]   (MODE: auto (default), legacy, 2026-07-28)
Prints one JSON object describing what the connection saw; the Rust test asserts on it.
"""

import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


async def main(url: str, credential: str, mode: str) -> dict:
    out: dict = {}
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {credential}"})
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as c:
        out["protocol_version"] = c.protocol_version
        tools = await c.list_tools()
        out["tools"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools.tools]
        res = await c.list_resources()
        out["resources"] = [str(r.uri) for r in res.resources]
        status = await c.read_resource("ephyr://status")
        out["status"] = status.contents[0].text
        call = await c.call_tool("list_targets", {})
        out["list_targets"] = {"is_error": bool(call.is_error), "text": call.content[0].text}
        bad = await c.call_tool("list_targets", {"target": 1})
        out["bad_args"] = {"is_error": bool(bad.is_error), "text": bad.content[0].text}
        try:
            await c.call_tool("no_such_tool", {})
            out["unknown_tool"] = None
        except MCPError as e:
            out["unknown_tool"] = {"code": e.code, "message": str(e)}
        try:
            await c.read_resource("ephyr://nope")
            out["unknown_resource"] = None
        except MCPError as e:
            out["unknown_resource"] = {"code": e.code, "message": str(e)}
    return out


if __name__ == "__main__":
    mode = sys.argv[3] if len(sys.argv) > 3 else "auto"
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], mode))))
