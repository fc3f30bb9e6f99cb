"""A small MCP server made with the Python `mcp` SDK (MCPServer, Streamable HTTP), whose tool
description comes from the command line: restarted with another description, it is a server
that changed a tool under its clients (the rug pull that tool pinning stops).

Usage: pinned_server.py PORT DESCRIPTION
"""

import sys

from mcp.server.mcpserver import MCPServer

port, description = int(sys.argv[1]), sys.argv[2]
app = MCPServer("pinned")


@app.tool(description=description)
def note(text: str) -> str:
    return f"noted: {text}"


@app.tool(description="Adds two numbers.")
def add(a: int, b: int) -> int:
    return a + b


app.run("streamable-http", host="127.0.0.1", port=port)
