"""A real MCP client (the Python `mcp` SDK) calls every kind of broker tool once and lets the SDK
check each result's structuredContent against the tool's outputSchema (it raises on a mismatch).

Usage: mcp_tour.py URL CREDENTIAL TARGET ROLE
Prints {"protocol_version", "schemas": {tool: outputSchema}, "structured": {tool: structuredContent}}.
"""

import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, credential: str, target: str, role: str) -> dict:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {credential}"})
    out: dict = {"structured": {}}
    async with Client(streamable_http_client(url, http_client=http)) as c:
        out["protocol_version"] = c.protocol_version
        tools = await c.list_tools()
        out["schemas"] = {t.name: t.output_schema for t in tools.tools}

        async def call(name, args):
            r = await c.call_tool(name, args)  # the SDK validates structuredContent here
            if r.is_error:
                raise SystemExit(f"{name}: {r.content[0].text}")
            out["structured"][name] = r.structured_content
            return r.structured_content

        await call("list_targets", {})
        await call("exec", {"target": target, "role": role, "command": "echo structured"})
        s = await call("session_create", {"target": target, "role": role})
        await call("session_close", {"session_id": s["session_id"]})
        await call("list_sessions", {})
        await call("list_certs", {})
        t = await call("task_create", {"description": "tour", "ttl": "5m", "can_delegate": True})
        await call("task_delegate", {"parent_task_id": t["task_id"], "description": "child", "ttl": "1m"})
        await call("task_info", {"task_id": t["task_id"]})
        await call("task_list", {})
        await call("task_revoke", {"task_id": t["task_id"]})
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))))
