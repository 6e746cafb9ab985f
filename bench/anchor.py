"""What bench/chatglm_cpp.py and bench/llama_cpp.py share: their common flags, the checkpoint they convert,
and running a program while watching its peak memory."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time


def add_arguments(ap: argparse.ArgumentParser, what: str, types: tuple[str, ...], default_types: str) -> None:
    ap.add_argument("--source", required=True, help=f"{what} source tree, built (see --help)")
    ap.add_argument("--dir", required=True, help="bench/speed.py's --dir (holds or gets bf16/)")
    ap.add_argument("--shape", default="6b", help="shape of bf16/ if it has to be written")
    ap.add_argument("--types", default=default_types, help="comma list of " + ", ".join(types))
    ap.add_argument("--prefill", default="128,512", help="prompt lengths, comma separated (0: none)")
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")


def prepare(ap: argparse.ArgumentParser, args, types: tuple[str, ...], program: str,
            what: str) -> tuple[list[str], str, str, list[int]]:
    """(the chosen types, the built program's path, the bf16 checkpoint (written when missing), prompt
    lengths); argparse's error for an unknown type, SystemExit naming what to build for a missing program."""
    chosen = [t for t in args.types.split(",") if t]
    for t in chosen:
        if t not in types:
            ap.error(f"unknown type {t!r}; choose from {', '.join(types)}")
    binary = os.path.join(args.source, "build", "bin", program)
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"{binary} not found: build {what}'s {program} first (see --help)")
    from model.tiny import write_checkpoint

    checkpoint = os.path.join(args.dir, "bf16")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        write_checkpoint(checkpoint, "chatglm2", args.shape, "bfloat16")
    prefill = [int(p) for p in args.prefill.split(",") if int(p or 0)]
    return chosen, binary, checkpoint, prefill


def run_watched(cmd: list[str], merge_stderr: bool = True) -> tuple[str, int, int]:
    """Run a program to its end: (its stdout, with stderr after it (merge_stderr False: only on failure), exit
    status, its peak RSS in bytes: the VmHWM read while it runs; wait4's ru_maxrss would count this process's
    peak as well)."""
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else errors)
    peak = [0]

    def watch():
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak[0] = max([peak[0]] + [int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:")])
            except OSError:
                break
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    output = proc.stdout.read().decode("utf-8", "replace")
    proc.wait()
    watcher.join()
    if proc.returncode and not merge_stderr:
        errors.seek(0)
        output += errors.read().decode("utf-8", "replace")
    errors.close()
    return output, proc.returncode, peak[0]


def finish(results: dict, what: str, prefill: list[int], json_path: str | None) -> None:
    """Print one table of every type in bench/speed.py's columns (load time where the program reports it) and
    write every number to json_path if given."""
    types = results["types"]
    with_load = all("load_s" in r for r in types.values())
    head = [what] + (["load s"] if with_load else []) + ["peak RSS GB"] + [f"prefill {p} s" for p in prefill]
    head.append("decode b=1 tok/s")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for t, r in types.items():
        cells = [t] + ([f"{r['load_s']:.1f}"] if with_load else []) + [f"{r['peak_rss'] / 1e9:.2f}"]
        cells += [f"{r['prefill_s'][str(p)]['median']:.1f}" for p in prefill]
        cells.append(f"{r['decode_tok_s']['1']['median']:.2f}")
        print("| " + " | ".join(cells) + " |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
