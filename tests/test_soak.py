"""Soak: a few hundred mixed requests with random disconnects against openai_api.py (loopback, bounded time).

Afterwards nothing may be left running or queued, the batch KV cache must be back to its idle size, and it must
still answer exactly as before. (Its memory over many requests is measured by bench/serve.py --soak.)
"""

import asyncio
import concurrent.futures
import json
import random
import time

import httpx
import pytest

from conftest import model_dir
from serving import ServerProcess
from test_openai_api import metrics

REQUESTS = 240
CONCURRENCY = 12


@pytest.fixture(scope="module")
def server():
    with ServerProcess("openai_api.py", model_dir("chatglm2-tiny"), "--max-batch", "4", "--max-queue", "64") as s:
        yield s


def body(rng: random.Random, stream: bool) -> dict:
    words = " ".join(rng.choice(["你好", "hello", "story", "天气", "code", "why", "1+1"]) for _ in range(rng.randint(1, 30)))
    return {"model": "m", "messages": [{"role": "user", "content": words}], "stream": stream,
            "max_tokens": rng.randint(1, 120), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}


async def one(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    """One request of a random kind; returns what happened."""
    kind = rng.choice(["stream", "stream", "stream-hangup", "plain", "plain-timeout"])
    if kind.startswith("stream"):
        hang_up_after = rng.randint(1, 5) if kind == "stream-hangup" else None
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body(rng, True)) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if hang_up_after and chunks >= hang_up_after:
                        return "hung up"  # leaving the block closes the connection mid-stream
                elif line == "data: [DONE]":
                    return "done"
            return "ended without [DONE]"
    try:
        r = await client.post(f"{url}/v1/chat/completions", json=body(rng, False),
                              timeout=0.05 if kind == "plain-timeout" else 60)
    except httpx.TimeoutException:
        return "timed out"
    if r.status_code != 200:
        return f"status {r.status_code}"
    return "done" if r.json()["choices"][0]["finish_reason"] in ("stop", "length") else "bad finish"


async def soak(url: str) -> list[str]:
    rng = random.Random(1234)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=60) as client:
        async def limited(i):
            async with semaphore:
                return await one(client, url, random.Random(rng.random() + i))
        return await asyncio.gather(*(limited(i) for i in range(REQUESTS)))


def greedy_reply(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 40})
    return r.json()["choices"][0]["message"]["content"]


def settle(server) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["chatglm_running_sequences"] == 0 and m["chatglm_queue_depth"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"work left over: {m}")


@pytest.mark.slow
def test_soak_with_random_disconnects(server):
    before_text = greedy_reply(server.url)
    idle = settle(server)
    started = time.monotonic()
    # in a thread of its own: a session's Playwright (sync API) keeps an event loop running in the main thread
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        outcomes = pool.submit(asyncio.run, soak(server.url)).result()
    elapsed = time.monotonic() - started
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert set(counts) <= {"done", "hung up", "timed out"}, counts  # no error status, no stream cut short
    assert counts.get("done", 0) > 0 and counts.get("hung up", 0) + counts.get("timed out", 0) > 0, counts
    m = settle(server)
    assert m["chatglm_kv_cache_bytes"] == idle["chatglm_kv_cache_bytes"]  # the cache went back to its idle size
    # every answered or streamed request reached the engine; one timed out early may have left before it did
    accepted = m["chatglm_requests_total"] - idle["chatglm_requests_total"]
    assert counts.get("done", 0) + counts.get("hung up", 0) <= accepted <= REQUESTS
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert greedy_reply(server.url) == before_text  # and it still answers exactly as before
    print(f"soak: {REQUESTS} requests in {elapsed:.1f} s, {json.dumps(counts)}")
