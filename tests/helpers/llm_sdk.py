#!/usr/bin/env python3
"""The official OpenAI and Anthropic Python SDKs, pointed at the broker's proxy route with a
task token as their API key (exactly what an agent on a remote host is given).

    llm_sdk.py BROKER_URL TOKEN [OPENAI_VICTIM_TOKEN ANTHROPIC_VICTIM_TOKEN]
Prints one JSON object: the text each SDK assembled, non-streamed and streamed, with the arrival
time of each streamed piece (seconds since the request started); what each SDK shows for the
broker's 401 and 403; and, given victim tokens, what each SDK shows when the victim's task is
revoked (by the victim token itself, through MCP task_revoke) in the middle of a stream.
"""

import json
import urllib.request
import sys
import time

import anthropic
import openai

base, token = sys.argv[1], sys.argv[2]
out = {}

oa = openai.OpenAI(base_url=f"{base}/v1/proxy/openai", api_key=token, max_retries=0, timeout=30)
r = oa.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
out["openai_text"] = r.choices[0].message.content
t0 = time.monotonic()
pieces = []
for chunk in oa.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append([chunk.choices[0].delta.content, round(time.monotonic() - t0, 3)])
out["openai_stream"] = pieces

an = anthropic.Anthropic(base_url=f"{base}/v1/proxy/anthropic", api_key=token, max_retries=0, timeout=30)
m = an.messages.create(model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
out["anthropic_text"] = m.content[0].text
t0 = time.monotonic()
pieces = []
with an.messages.stream(model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
    for text in s.text_stream:
        pieces.append([text, round(time.monotonic() - t0, 3)])
out["anthropic_stream"] = pieces

try:
    bad = openai.OpenAI(base_url=f"{base}/v1/proxy/openai", api_key="mac_not-a-token", max_retries=0)
    bad.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    out["bad_token"] = "accepted"
except openai.AuthenticationError as e:
    out["bad_token"] = f"401: {e.message}"

try:
    oa.files.list()
    out["openai_403"] = "accepted"
except openai.PermissionDeniedError as e:
    out["openai_403"] = f"403: {e.message}"

try:
    bad = anthropic.Anthropic(base_url=f"{base}/v1/proxy/anthropic", api_key="mac_not-a-token", max_retries=0)
    bad.messages.create(model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    out["anthropic_401"] = "accepted"
except anthropic.AuthenticationError as e:
    out["anthropic_401"] = f"401: {e.message}"

try:
    an.models.list()
    out["anthropic_403"] = "accepted"
except anthropic.PermissionDeniedError as e:
    out["anthropic_403"] = f"403: {e.message}"


def revoke_own_task(token: str) -> int:
    """tools/call task_revoke on the token's own task, with the token (stateless MCP)."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "llm-sdk-test", "version": "1"},
    }
    headers = {
        "Authorization": f"Bearer {token}", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
    }

    def call(name, args):
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": name, "arguments": args, "_meta": meta}}).encode()
        h = dict(headers, **{"Mcp-Name": name})
        req = urllib.request.Request(f"{base}/mcp", data=body, headers=h, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(json.loads(r.read())["result"]["content"][0]["text"])

    task = call("task_info", {})["task"]["id"]
    return call("task_revoke", {"task_id": task})["cascade_count"]


if len(sys.argv) > 4:

    victim_oa, victim_an = sys.argv[3], sys.argv[4]
    got = []
    try:
        c = openai.OpenAI(base_url=f"{base}/v1/proxy/openai", api_key=victim_oa, max_retries=0, timeout=30)
        for chunk in c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
                if len(got) == 1:
                    revoke_own_task(victim_oa)
        out["openai_revoked_stream"] = f"finished: {''.join(got)}"
    except openai.APIError as e:
        out["openai_revoked_stream"] = f"{type(e).__name__}: {e.message} (after {len(got)} pieces)"
    got = []
    try:
        c = anthropic.Anthropic(base_url=f"{base}/v1/proxy/anthropic", api_key=victim_an, max_retries=0, timeout=30)
        with c.messages.stream(model="claude-test", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
            for text in s.text_stream:
                got.append(text)
                if len(got) == 1:
                    revoke_own_task(victim_an)
        out["anthropic_revoked_stream"] = f"finished: {''.join(got)}"
    except anthropic.APIError as e:
        out["anthropic_revoked_stream"] = f"{type(e).__name__}: {e.message} (after {len(got)} pieces)"

print(json.dumps(out))
