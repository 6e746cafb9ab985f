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


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, path: str = "/health",
                 output=None) -> None:
    """Poll url+path until it answers 200; if proc exits first, raise with its output (output(), else its
    stdout read here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = output() if output is not None else proc.stdout.read()
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy")


class ServerProcess:
    """`python SCRIPT --model DIR --port P [args]` from the repository root; .url once healthy. Its output is
    read as it comes (a server that fills the pipe would block on its next log line); .output() after stop()."""

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
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()
        try:
            wait_healthy(self.url, self.proc, path=ready_path, output=self.output)
        except Exception:
            self.stop()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the server printed; complete once it has exited."""
        if self.proc.poll() is not None:
            self._reader.join(10)
        return "".join(self._lines)

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
    each prompt whole in one pass (prefill_chunk=None, prefix_cache_tokens=0).
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


class StepGate:
    """Holds an engine's worker before each forward pass of `model.transformer` until the test lets it pass.

    step() lets one pass run and returns once the worker reaches the next one (or `idle` says it has no more
    work), so a test decides exactly which requests are in the batch at each step, with no race against time.
    open() lets every pass through from then on.
    """

    def __init__(self, model, timeout: float = 30.0):
        self._cond = threading.Condition()
        self._credits = 0
        self._opened = False
        self.waiting = False  # the worker is held before a forward pass
        self.passes = 0
        self.timeout = timeout
        self._hook = model.transformer.register_forward_pre_hook(lambda module, args: self._hold())

    def _hold(self) -> None:
        with self._cond:
            self.waiting = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._opened or self._credits > 0, self.timeout):
                raise TimeoutError("StepGate: the test never let this forward pass run")
            if not self._opened:
                self._credits -= 1
            self.waiting = False
            self.passes += 1
            self._cond.notify_all()

    def _wait(self, predicate, what: str) -> None:
        # short waits: predicate may depend on state this condition is not notified of (idle)
        deadline = time.monotonic() + self.timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"StepGate: {what}")
            self._cond.wait(0.005)

    def wait_held(self) -> None:
        """Until the worker is held before a forward pass."""
        with self._cond:
            self._wait(lambda: self.waiting, "the worker never reached a forward pass")

    def step(self, idle=lambda: False) -> None:
        """Let one forward pass run; return when the worker is held before the next, or idle() is true."""
        with self._cond:
            self._wait(lambda: self.waiting, "the worker never reached a forward pass")
            done = self.passes + 1
            self._credits += 1
            self._cond.notify_all()
            self._wait(lambda: self.passes >= done and (self.waiting or idle()), "the pass did not end")

    def open(self) -> None:
        with self._cond:
            self._opened = True
            self._cond.notify_all()

    def remove(self) -> None:
        self.open()
        self._hook.remove()
