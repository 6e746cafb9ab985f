"""Throughput of a running openai_api.py under concurrent streaming clients (continuous batching).

    python bench/serve.py                                   # mid shape, 1 / 4 / 8 / 16 clients
    python bench/serve.py --shape tiny --clients 1,2,4 --tokens 16 --json serve.json

Writes a random-weight chatglm2 checkpoint of the shape (bf16 for mid / 6b) under --dir (default: a temporary
directory), starts `openai_api.py` on it on a free loopback port, and for each client count runs that many
clients at once, each streaming one greedy chat completion of --tokens tokens (the random model may stop
earlier; the usage it reports is what is counted). Printed per client count:

- aggregate tokens/s: all completion tokens over the wall time from the first request sent to the last byte;
- time to first token, p50 and p95 over the clients (request sent -> first content chunk);
- per-client tokens/s: each client's tokens after its first over the time from its first to its last chunk,
  median;
- identical: whether every client's text equals the text its prompt gets when it runs alone. Each of the
  --prompts distinct prompts is first run alone, one after the other; those runs also give the 1-client row.

--soak N then sends N more requests, twice, 16 at a time, half of them hung up after their first chunk, and
prints the server's resident memory (VmRSS) after each round: memory that grows with the request count shows
as growth between the two rounds.

Every request pays its prompt's prefill (compute-bound; prompts that wait together are read in one batched
pass, see --prefill-batch-tokens), so short --tokens make the prefills dominate and understate what batching the
decode steps gives.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOPICS = ["the sea", "mountains", "a city at night", "rain", "an old library", "trains", "the desert", "bees",
          "a lighthouse", "winter", "a market", "rivers", "the moon", "gardens", "a violin", "clouds"]


def prompt(i: int) -> str:
    return f"Write a story about {TOPICS[i % len(TOPICS)]} (#{i})"


async def one_stream(client, url: str, i: int, tokens: int) -> dict:
    body = {"model": "chatglm", "messages": [{"role": "user", "content": prompt(i)}], "stream": True,
            "temperature": 0, "max_tokens": tokens, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    text, completion = "", 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content") or ""
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text += piece
    end = time.perf_counter()
    first = first or end
    return {"text": text, "tokens": completion, "ttft": first - sent, "sent": sent, "end": end,
            "rate": (completion - 1) / (last - first) if last and last > first and completion > 1 else float("nan")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_output(server: subprocess.Popen) -> collections.deque:
    """The server's last 200 lines, read as they come: an unread pipe fills up and blocks the server."""
    lines: collections.deque = collections.deque(maxlen=200)
    threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
    return lines


def wait_healthy(url: str, server: subprocess.Popen, timeout: float, output: collections.deque) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            time.sleep(0.5)  # the reader's last lines
            raise RuntimeError(f"the server exited with {server.returncode}:\n{''.join(output)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(results: list[dict]) -> dict:
    wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
    rates = [r["rate"] for r in results if r["rate"] == r["rate"]]
    return {"tokens": sum(r["tokens"] for r in results), "wall_s": wall,
            "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": percentile([r["ttft"] for r in results], 0.5),
            "ttft_p95_s": percentile([r["ttft"] for r in results], 0.95),
            "per_client_tok_s": statistics.median(rates) if rates else float("nan")}


async def drive(url: str, levels: list[int], tokens: int, prompts: int) -> list[dict]:
    import httpx

    rows = []
    async with httpx.AsyncClient(timeout=None) as client:
        await one_stream(client, url, 0, 4)  # warm-up
        alone = [await one_stream(client, url, i, tokens) for i in range(min(prompts, max(levels)))]
        reference = [r["text"] for r in alone]
        for n in levels:
            if n == 1:
                results = alone
                row = summarise(alone[:1]) | {"clients": 1}
                # one client at a time, over every prompt: the steadier 1-client number
                row["aggregate_tok_s"] = sum(r["tokens"] for r in alone) / sum(r["end"] - r["sent"] for r in alone)
                rates = [r["rate"] for r in alone if r["rate"] == r["rate"]]
                row["per_client_tok_s"] = statistics.median(rates) if rates else float("nan")
                row["identical"] = True
            else:
                results = await asyncio.gather(*(one_stream(client, url, i % prompts, tokens) for i in range(n)))
                row = summarise(results) | {"clients": n}
                row["identical"] = all(r["text"] == reference[i % prompts] for i, r in enumerate(results))
            rows.append(row)
            print(f"{n:>7} {row['aggregate_tok_s']:>12.2f} {row['ttft_p50_s']:>9.2f} {row['ttft_p95_s']:>9.2f} "
                  f"{row['per_client_tok_s']:>11.2f} {row['tokens']:>7} {'yes' if row['identical'] else 'NO':>9}",
                  flush=True)
    return rows


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def soak_round(url: str, requests: int, tokens: int) -> None:
    """requests streaming completions, 16 at a time; every other one is hung up after its first chunk."""
    import httpx

    semaphore = asyncio.Semaphore(16)

    async def one(client, i: int) -> None:
        body = {"model": "chatglm", "messages": [{"role": "user", "content": prompt(i)}], "stream": True,
                "max_tokens": tokens, "seed": i}
        async with semaphore, client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if i % 2 and line.startswith("data: {"):
                    return  # leaving the block hangs up mid-stream

    async with httpx.AsyncClient(timeout=None) as client:
        await asyncio.gather(*(one(client, i) for i in range(requests)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mid", help="tiny, mid or 6b (model/tiny.py SHAPES)")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts (client i sends prompt i mod this)")
    ap.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: most clients)")
    ap.add_argument("--dtype", default=None, help="checkpoint dtype (default bfloat16 for mid / 6b)")
    ap.add_argument("--run-dtype", default="auto", help="the server's --dtype (auto: bf16 where the CPU has it)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (kept; reused if present)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--soak", type=int, default=0, help="then N mixed requests twice, printing the server's RSS")
    ap.add_argument("--server-args", default="", help="more flags for openai_api.py (e.g. \"--gather-ms 0\")")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    if 1 not in levels:
        levels = [1] + levels

    from model.tiny import write_checkpoint

    tmp = None if args.dir else tempfile.mkdtemp(prefix="chatglm-serve-")
    directory = args.dir or os.path.join(tmp, args.shape)
    dtype = args.dtype or ("bfloat16" if args.shape in ("mid", "6b") else "float32")
    if not os.path.exists(os.path.join(directory, "config.json")):
        print(f"writing a random {args.shape} checkpoint ({dtype}) to {directory}", flush=True)
        write_checkpoint(directory, "chatglm2", args.shape, dtype)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "openai_api.py"), "--model", directory,
                               "--port", str(port), "--device", "cpu", "--dtype", args.run_dtype, "--max-batch", str(args.max_batch or max(levels)),
                               "--max-queue", str(4 * max(levels)), *shlex.split(args.server_args)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    output = read_output(server)
    try:
        wait_healthy(url, server, 600, output)
        print(f"openai_api.py on {args.shape} (checkpoint {dtype}, --dtype {args.run_dtype}), {os.cpu_count()} CPUs, "
              f"oneDNN linear {os.environ.get('CHATGLM_ONEDNN_LINEAR', '1')}, --max-batch "
              f"{args.max_batch or max(levels)}, {args.tokens} tokens per request"
              + (f", server flags: {args.server_args}" if args.server_args else ""))
        print(f"{'clients':>7} {'aggregate/s':>12} {'ttft p50':>9} {'ttft p95':>9} {'per-client':>11} {'tokens':>7} "
              f"{'identical':>9}")
        rows = asyncio.run(drive(url, levels, args.tokens, args.prompts))
        base = rows[0]["aggregate_tok_s"]
        for row in rows[1:]:
            print(f"{row['clients']} clients: {row['aggregate_tok_s'] / base:.2f}x the 1-client throughput")
        for round_ in range(2 if args.soak else 0):
            asyncio.run(soak_round(url, args.soak, args.tokens))
            print(f"soak round {round_ + 1}: {args.soak} requests, server RSS {rss_mib(server.pid):.0f} MiB", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"shape": args.shape, "dtype": dtype, "tokens": args.tokens, "rows": rows}, f, indent=2)
        return 0 if all(r["identical"] for r in rows) else 1
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
