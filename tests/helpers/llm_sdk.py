#!/usr/bin/env python3
"""The official OpenAI and Anthropic Python SDKs, pointed at the broker's proxy route with a
task token as their API key (exactly what an agent on a remote host is given).

    llm_sdk.py BROKER_URL TOKEN
Prints one JSON object: the text each SDK assembled, non-streamed and streamed, with the arrival
time of each streamed piece (seconds since the request started).
"""

import json
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

print(json.dumps(out))
