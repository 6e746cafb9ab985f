"""Starting the servers for tests: as real processes on a free loopback port, or uvicorn in a thread."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import httpx

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy")


class ServerProcess:
    """`python SCRIPT --model DIR --port P [args]` from the repository root; .url once healthy."""

    def __init__(self, script: str, model_dir: str, *args: str, ready_path: str = "/health", streamlit=False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        model_args = ["--model", model_dir, "--device", "cpu", "--dtype", "float32", *args]
        if streamlit:  # streamlit run SCRIPT [streamlit options] -- [script flags]
            argv = [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(self.port),
                    "--server.address", "127.0.0.1", "--server.headless", "true",
                    "--browser.gatherUsageStats", "false", "--", *model_args]
        else:
            argv = [sys.executable, script, "--port", str(self.port), *model_args]
        self.proc = subprocess.Popen(argv,
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_healthy(self.url, self.proc, path=ready_path)
        except Exception:
            self.stop()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ThreadServer:
    """uvicorn serving an app object on a free port in a background thread (for injected test engines)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ScriptedModel:
    """A real tiny model (real forward pass, real cache) whose next-token choice follows a script.

    Each request's prefill takes the next scripted reply (a list of ids); the prompts seen are kept in .prompts.
    It lets server tests drive replies a random model would never write (tool calls, exact text). The script is
    one stream of replies, so an engine driving it must decode one request at a time (max_batch=1) and read
    each prompt in one pass (prefill_chunk=None).
    """

    def __init__(self, model, vocab_size: int, replies: list[list[int]]):
        import torch

        self._torch = torch
        self.config, self.dtype, self.device = model.config, model.dtype, model.device
        self.name_or_path = "scripted"
        self.vocab_size = max(vocab_size, model.config.padded_vocab_size)
        self.replies = list(replies)
        self.prompts: list[list[int]] = []
        self._real = model.transformer
        self._current = iter(())

    def transformer(self, ids, positions=None, mask=None, cache=None, last_logits_only=False):
        from model.modeling import ModelOutput

        if cache is not None and cache.length == 0:
            self.prompts.append(ids[0].tolist())
            self._current = iter(self.replies.pop(0))
        self._real(ids, positions, mask, cache, last_logits_only=True)
        logits = self._torch.full((ids.shape[0], 1, self.vocab_size), -1e4)
        logits[..., next(self._current)] = 0.0
        return ModelOutput(logits=logits, past_key_values=cache)
