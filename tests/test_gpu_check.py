"""bench/gpu_check.py's dry run (--device cpu): the one-command GPU check stays runnable without a GPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_dry_run_passes_every_check_and_prints_one_json_line_each():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = {line["check"] for line in lines}
    assert {"device", "golden", "chat", "engine", "attention", "quant", "speed", "split", "summary"} <= kinds
    quant = [line for line in lines if line["check"] == "quant"]  # the CUDA branches with their CPU stand-ins
    assert [(q["bits"], q["dtype"]) for q in quant if q["fused"]] == [
        (4, "bfloat16"), (4, "bfloat16"), (8, "bfloat16"), (8, "bfloat16"), (8, "float16"), (8, "float16"),
        (8, "float32"), (8, "float32")]
    assert all(q["in_place"] == (q["bits"] == 4 and q["dtype"] == "bfloat16") for q in quant)
    assert all(line["ok"] for line in lines)
    golden = [line for line in lines if line["check"] == "golden" and line["mode"] == "float32"]
    assert len(golden) >= 6 and all(line["max_abs_diff"] < 1e-3 for line in golden)
    speed = [line for line in lines if line["check"] == "speed"]
    assert {line["mode"] for line in speed} == {"bfloat16", "int8", "int4"}
    assert all(line["decode_b1_tok_s"] > 0 and line["decode_b8_tok_s"] > 0 for line in speed)
