#!/usr/bin/env python3
"""A stand-in coding agent for `ephyr run` tests: it uses only the environment the run gave it
(the official `openai` and `anthropic` SDKs read their base URLs and keys from it; the `mcp`
SDK reads the MCP configuration file it names) and prints one JSON object of what it saw.

Usage: run_agent.py MODE [SECONDS]
  chat     one OpenAI chat, one Anthropic message (streamed), one MCP tool call; reports the run
           directory (its files, mode, whether a provider key is anywhere in it or in the
           environment)
  budget   OpenAI chats until the broker refuses one; reports how the SDK saw the refusal
  env      the provider variables only (disposable keys)
  sleep    prints READY, then sleeps SECONDS (the test kills the CLI meanwhile)
"""

import asyncio
import json
import os
import sys
import time

PROVIDER_KEY = os.environ.get("STANDIN_PROVIDER_KEY", "sk-real-provider-key")


def the_dir():
    d = os.path.dirname(os.environ["EPHYR_MCP_CONFIG"])
    files = sorted(os.listdir(d))
    text = "".join(open(os.path.join(d, f)).read() for f in files)
    return {
        "dir": d,
        "files": files,
        "mode": oct(os.stat(d).st_mode & 0o777),
        "provider_key_in_dir": PROVIDER_KEY in text,
        "provider_key_in_env": any(PROVIDER_KEY in v for v in os.environ.values()),
        "token_file": open(os.path.join(d, "token")).read(),
    }


async def mcp_call():
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    cfg = json.load(open(os.environ["EPHYR_MCP_CONFIG"]))["mcpServers"]["ephyr"]
    http = httpx2.AsyncClient(headers=cfg["headers"])
    async with Client(streamable_http_client(cfg["url"], http_client=http)) as c:
        r = await c.call_tool("task_info", {})
        return {"is_error": bool(r.is_error), "text": r.content[0].text}


def chat():
    import anthropic
    import openai

    out = the_dir()
    o = openai.OpenAI()
    r = o.chat.completions.create(model="gpt-standin", messages=[{"role": "user", "content": "hi"}])
    out["openai"] = r.choices[0].message.content
    a = anthropic.Anthropic()
    text = ""
    with a.messages.stream(model="claude-standin", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
        for t in s.text_stream:
            text += t
    out["anthropic"] = text
    out["mcp"] = asyncio.run(mcp_call())
    return out


def budget():
    import openai

    o = openai.OpenAI(max_retries=0)
    out = {"ok": 0}
    for _ in range(10):
        try:
            o.chat.completions.create(model="gpt-standin", messages=[{"role": "user", "content": "hi"}])
            out["ok"] += 1
        except openai.APIStatusError as e:
            out["error"] = {"class": type(e).__name__, "status": e.status_code, "message": str(e)}
            break
    return out


def main():
    mode = sys.argv[1]
    if mode == "chat":
        print(json.dumps(chat()), flush=True)
    elif mode == "budget":
        print(json.dumps(budget()), flush=True)
    elif mode == "env":
        keys = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")
        print(json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
    elif mode == "sleep":
        print(json.dumps(the_dir()), flush=True)
        print("READY", flush=True)
        time.sleep(float(sys.argv[2]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
