"""The Code Interpreter mode's Python: a Jupyter kernel (jupyter_client + ipykernel) on this machine.

    kernel = Kernel()                  # nothing runs yet
    result = kernel.run("print(1 + 1)", timeout=60)   # starts the kernel on first use
    result.text, result.images, result.error, result.timed_out
    kernel.restart(); kernel.shutdown()

The kernel listens on 127.0.0.1 only (tcp), works in a temporary folder of its own (removed at shutdown), and
draws matplotlib figures inline: each comes back as PNG bytes. A run that passes its time limit is interrupted;
a kernel that does not come back from the interrupt is restarted.
"""

from __future__ import annotations

import base64
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Kernel", "RunResult", "MAX_OUTPUT", "code_of"]

MAX_OUTPUT = 4000  # characters of a run's text kept (its end): what is shown and what goes back to the model
INTERRUPT_GRACE_S = 5.0  # how long an interrupted run may take to stop before the kernel is restarted
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:\n```|$)", re.S)


def code_of(text: str) -> str | None:
    """The Python code of an interpreter turn: its (last) fenced code block, or None without one."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


@dataclass
class RunResult:
    text: str = ""  # stdout, stderr, the value of the last expression, the traceback (ANSI codes removed)
    images: list[bytes] = field(default_factory=list)  # PNG images (matplotlib figures)
    error: bool = False  # the code raised
    timed_out: bool = False  # the time limit stopped it

    def observation(self) -> str:
        """What the model is told: the text, "[image]" per image, and why the run ended early."""
        parts = [self.text] if self.text else []
        parts += ["[image]"] * len(self.images)
        if self.timed_out:
            parts.append("[the run was stopped: it passed its time limit]")
        return "\n".join(parts) if parts else "[no output]"


def _cap(text: str) -> str:
    return text if len(text) <= MAX_OUTPUT else "[...]\n" + text[-MAX_OUTPUT:]


class Kernel:
    """One IPython kernel, started on first use; thread-safe (one run at a time)."""

    def __init__(self, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self.manager = None
        self.client = None
        self.workdir: str | None = None
        self.running = False  # a run is in progress
        self._lock = threading.RLock()

    # ---- life -------------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.manager is not None and self.manager.is_alive()

    def start(self) -> None:
        """Start the kernel (no-op when it runs)."""
        from jupyter_client import KernelManager

        with self._lock:
            if self.alive:
                return
            self.shutdown()
            self.workdir = tempfile.mkdtemp(prefix="chatglm-interpreter-")
            manager = KernelManager(kernel_name="python3", ip="127.0.0.1", transport="tcp")
            env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline",
                   "PYTHONUNBUFFERED": "1"}
            manager.start_kernel(cwd=self.workdir, env=env,
                                 extra_arguments=["--HistoryManager.enabled=False"])
            self.manager = manager
            self._connect()

    def _connect(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=self.startup_timeout)

    @property
    def connection(self) -> dict:
        """The kernel's connection info (ip, transport, ports); empty before start."""
        return self.manager.get_connection_info() if self.manager is not None else {}

    @property
    def pid(self) -> int | None:
        provisioner = getattr(self.manager, "provisioner", None)
        return getattr(provisioner, "pid", None)

    def restart(self) -> None:
        """A fresh kernel (its variables gone), in the same folder; starts one if none runs."""
        with self._lock:
            if not self.alive:
                self.start()
                return
            self.manager.restart_kernel(now=True)
            self._connect()

    def shutdown(self) -> None:
        """Stop the kernel process and remove its folder (no-op when stopped)."""
        with self._lock:
            if self.client is not None:
                self.client.stop_channels()
                self.client = None
            if self.manager is not None:
                try:
                    self.manager.shutdown_kernel(now=True)
                except Exception:  # noqa: BLE001 - already gone: nothing left to stop
                    pass
                self.manager = None
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    # ---- runs -------------------------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Interrupt the run in progress, from another thread (its result then holds the KeyboardInterrupt);
        no-op when none runs."""
        manager = self.manager
        if self.running and manager is not None:
            manager.interrupt_kernel()

    def run(self, code: str, timeout: float = 60.0) -> RunResult:
        """Run code; its output, images and errors. Past timeout seconds the run is interrupted (the kernel is
        restarted if the interrupt does not stop it) and timed_out is set."""
        with self._lock:
            self.start()
            result, text = RunResult(), []
            msg_id = self.client.execute(code, store_history=False, allow_stdin=False)
            self.running = True
            try:
                done = self._collect(msg_id, time.monotonic() + timeout, result, text)
            finally:
                self.running = False
            if not done:
                result.timed_out = True
                self.manager.interrupt_kernel()
                if not self._collect(msg_id, time.monotonic() + INTERRUPT_GRACE_S, RunResult(), []):
                    self.restart()
                    text.append("[the kernel did not stop when interrupted: it was restarted]")
            result.text = _cap(_ANSI.sub("", "".join(text)).strip("\n"))
            return result

    def _collect(self, msg_id: str, deadline: float, result: RunResult, text: list[str]) -> bool:
        """Read the run's output until it is idle (True) or the deadline passes (False)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                msg = self.client.get_iopub_msg(timeout=min(left, 1.0))
            except queue.Empty:
                if not self.alive:  # the kernel died (e.g. os._exit in the code)
                    text.append("[the kernel stopped]")
                    result.error = True
                    return True
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue  # an earlier, interrupted run's leftovers
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                if "image/png" in data:
                    result.images.append(base64.b64decode(data["image/png"]))
                elif "text/plain" in data:
                    text.append(data["text/plain"] + "\n")
            elif kind == "error":
                result.error = True
                text.append("\n".join(content.get("traceback") or [f"{content['ename']}: {content['evalue']}"])
                            + "\n")
            elif kind == "status" and content.get("execution_state") == "idle":
                return True

