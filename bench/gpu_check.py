"""One command to check a GPU (or any device) against the CPU: one JSON line per check.

    python bench/gpu_check.py                      # CUDA: golden models, chat / engine, attention plans, 6B speed
    python bench/gpu_check.py --device mps         # Apple Silicon
    python bench/gpu_check.py --device cpu         # the dry run CI does: tiny shapes, a few tokens

Checks (each line has "check" and "ok"; a line with "skipped" says why a check did not run):
- golden: every golden tiny checkpoint in float32 / bfloat16 / float16 / int8 / int4 on the device against
  the same checkpoint in float32 on the CPU: largest logit difference and greedy agreement (float32 must agree
  within 1e-3 and greedily token for token; the others must stay finite);
- chat / engine: greedy model.chat() and the engine's reply on the device equal to the CPU's;
- attention: the plan (expanded K/V, explicit causal mask, grouped decode) per call shape on this device;
- quant: one int4 / int8 linear of each 6B input width per dtype: whether torch's fused weight-only product
  ran ("fused") or the layer de-quantized, its error against q * scale, milliseconds per 1-row call either
  way, and for CUDA int4 whether torch's packing equals ours (then the stored copy is dropped: "in_place");
- speed: a random checkpoint of the 6B shape (--shape) loaded on the device per mode: load seconds, peak
  memory, prefill seconds for 512 and 4096 tokens, decode tokens/s at batch 1 and 8;
- split: with two or more GPUs, the layers split over two against one GPU (greedy ids equal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import load_model  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.formats import Message, format_for  # noqa: E402
from model.generation import SamplingParams, generate_tokens  # noqa: E402
from model.modeling import attention_plan  # noqa: E402
from model.service import CompletionSettings, LocalService  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "golden", "models")
FLOAT_MODES = {"float32": None, "bfloat16": None, "float16": None, "int8": 8, "int4": 4}
QUESTION = "你好，请介绍一下你自己"
GREEDY = SamplingParams()


def emit(**fields) -> dict:
    print(json.dumps(fields, ensure_ascii=False), flush=True)
    return fields


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def prompt(tokenizer) -> list[int]:
    return format_for(tokenizer.family).prompt_ids(tokenizer, [Message("user", QUESTION)])


def greedy_ids(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    return [int(t[0]) for t in generate_tokens(model, x, max_new_tokens=n, params=GREEDY)]


def engine_text(model, tokenizer, n: int) -> str:
    service = LocalService(Engine(model, tokenizer, model_name="check"))
    try:
        return service.complete([Message("user", QUESTION)], CompletionSettings(temperature=0, max_tokens=n)).text()[0]
    finally:
        service.close()


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens the two greedy runs share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def golden_checks(device: str, tokens: int) -> list[dict]:
    out = []
    for name in sorted(os.listdir(GOLDEN)):
        path = os.path.join(GOLDEN, name)
        if not os.path.isfile(os.path.join(path, "config.json")) or "ptuning" in name:
            continue
        ref, tokenizer = load_model(path, device="cpu", dtype="float32")
        ids = prompt(tokenizer)
        ref_logits = ref(torch.tensor([ids])).logits[0].float()
        ref_ids = greedy_ids(ref, ids, tokens)
        ref_chat = ref.chat(tokenizer, QUESTION, do_sample=False, max_new_tokens=tokens)[0]
        ref_engine = engine_text(ref, tokenizer, tokens)
        quantized_checkpoint = "-int" in name
        for mode, bits in FLOAT_MODES.items():
            if quantized_checkpoint and bits is not None:
                continue  # already quantized: run in each float dtype only
            dtype = "float32" if bits is not None and device == "cpu" else (mode if bits is None else "auto")
            try:
                model, _ = load_model(path, device=device, dtype=dtype, quantize=bits)
                logits = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()
                got = greedy_ids(model, ids, tokens)
            except Exception as e:  # noqa: BLE001 - a check that cannot run is a failed check, not a crash
                out.append(emit(check="golden", model=name, mode=mode, ok=False, error=f"{type(e).__name__}: {e}"))
                continue
            diff = float((logits - ref_logits).abs().max())
            agree = agreement(got, ref_ids)
            exact = mode == "float32"
            ok = math.isfinite(diff) and (not exact or (diff < 1e-3 and got == ref_ids))
            out.append(emit(check="golden", model=name, mode=mode, dtype=str(model.dtype).removeprefix("torch."),
                            max_abs_diff=round(diff, 6), greedy_agree=f"{agree}/{len(ref_ids)}", ok=ok))
            if mode == "float32":
                chat = model.chat(tokenizer, QUESTION, do_sample=False, max_new_tokens=tokens)[0]
                out.append(emit(check="chat", model=name, ok=chat == ref_chat))
                out.append(emit(check="engine", model=name, ok=engine_text(model, tokenizer, tokens) == ref_engine))
            del model
    return out


def attention_checks(device: torch.device) -> list[dict]:
    out = []
    flash = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    for decode in (False, True):
        for masked in (False, True):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                plan = attention_plan(device.type, grouped=True, decode=decode, masked=masked, dtype=dtype,
                                      flash_arch=flash)
                # CUDA: a grouped call not taken by flash must expand K/V, or it falls to the math kernel
                out.append(emit(check="attention", decode=decode, masked=masked,
                                dtype=str(dtype).removeprefix("torch."), expand_kv=plan.expand_kv,
                                explicit_causal=plan.explicit_causal, grouped_decode=plan.grouped_decode,
                                ok=device.type != "cuda" or plan.expand_kv or (flash and not masked and dtype != torch.float32)))
    return out


def timed_ms(device: torch.device, fn, repeat: int) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return round((time.perf_counter() - t) * 1000 / repeat, 3)


@torch.inference_mode()
def quant_checks(device: torch.device, dry: bool) -> list[dict]:
    """On a CPU (the dry run) the CUDA branches run with their stand-ins (model/quantization.py)."""
    from model.quantization import QuantizedLinear, dequantize_weight

    out = []
    path = "cuda" if device.type == "cpu" else device.type
    widths = [(256, 128), (384, 96)] if dry else [(4096, 4608), (13696, 4096)]  # (in, out): K % 256, K % 128
    for bits in (4, 8):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for k, n in widths:
                layer = QuantizedLinear.from_linear(torch.nn.Linear(k, n, dtype=dtype, device=device), bits)
                stored = layer.weight.clone()
                x = torch.randn(1, k, dtype=dtype, device=device)
                ref = x.double() @ dequantize_weight(layer.weight, layer.weight_scale, bits, torch.float64).T
                ref += layer.bias.double()
                try:
                    y = layer._device_fused(x, path)
                except Exception as e:  # noqa: BLE001 - reported, not a crash
                    out.append(emit(check="quant", bits=bits, dtype=str(dtype), k=k, ok=False, error=repr(e)))
                    continue
                fields = {"check": "quant", "bits": bits, "dtype": str(dtype).removeprefix("torch."), "k": k, "n": n,
                          "fused": y is not None, "in_place": layer._tinygemm}
                ok = torch.equal(layer.stored_weight(), stored)
                if y is not None:
                    err = float((y.double() - ref).abs().max() / ref.abs().max())
                    fields["rel_err"] = round(err, 5)
                    ok = ok and err < (2e-2 if dtype != torch.float32 else 1e-4)
                    fields["fused_ms"] = timed_ms(device, lambda: layer._device_fused(x, path), 3 if dry else 50)

                def dequantized():
                    w = dequantize_weight(layer.stored_weight(), layer.weight_scale, bits, dtype)
                    return torch.nn.functional.linear(x, w, layer.bias)
                fields["dequantize_ms"] = timed_ms(device, dequantized, 3 if dry else 50)
                out.append(emit(**fields, ok=ok))
                del layer
    return out


@torch.inference_mode()
def speed_checks(device: torch.device, shape: str, prefills: list[int], decode_tokens: int, modes: list[str],
                 work_dir: str) -> list[dict]:
    from model.tiny import write_checkpoint

    out = []
    path = os.path.join(work_dir, f"chatglm2-{shape}")
    t = time.perf_counter()
    write_checkpoint(path, "chatglm2", shape, "bfloat16")
    emit(check="speed-setup", shape=shape, write_s=round(time.perf_counter() - t, 1), ok=True)
    for mode in modes:
        bits = {"int8": 8, "int4": 4}.get(mode)
        dtype = "float32" if device.type == "cpu" and bits is None and mode == "float32" else "bfloat16"
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        model, tokenizer = load_model(path, device=str(device), dtype=dtype, quantize=bits)
        sync(device)
        fields = {"check": "speed", "shape": shape, "mode": mode, "load_s": round(time.perf_counter() - t, 2)}
        for n in prefills:
            ids = torch.randint(300, 900, (1, n), device=device)
            model(ids)  # warm-up of this shape
            sync(device)
            t = time.perf_counter()
            model(ids, return_last_logit=True)
            sync(device)
            fields[f"prefill_{n}_s"] = round(time.perf_counter() - t, 4)
        for batch in (1, 8):
            ids = torch.randint(300, 900, (batch, 16), device=device)
            list(generate_tokens(model, ids, max_new_tokens=2, params=GREEDY))  # warm-up
            sync(device)
            t = time.perf_counter()
            steps = sum(1 for _ in generate_tokens(model, ids, max_new_tokens=decode_tokens, params=GREEDY))
            sync(device)
            fields[f"decode_b{batch}_tok_s"] = round(batch * steps / (time.perf_counter() - t), 2)
        if device.type == "cuda":
            fields["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        out.append(emit(**fields, ok=True))
        del model
    return out


@torch.inference_mode()
def split_check(shape: str, work_dir: str) -> list[dict]:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return [emit(check="split", skipped="fewer than two GPUs", ok=True)]
    from model.multigpu import load_model_on_gpus

    path = os.path.join(work_dir, f"chatglm2-{shape}")
    one, tokenizer = load_model(path, device="cuda:0", dtype="bfloat16")
    ids = prompt(tokenizer)
    expected = greedy_ids(one, ids, 16)
    del one
    two, _ = load_model_on_gpus(path, num_gpus=2, dtype="bfloat16")
    return [emit(check="split", shape=shape, ok=greedy_ids(two, ids, 16) == expected)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1, mps or cpu (cpu: the dry run)")
    ap.add_argument("--shape", default=None, help="speed check shape (default: 6b; small for the dry run)")
    ap.add_argument("--modes", default="bfloat16,int8,int4", help="speed check modes")
    ap.add_argument("--skip", default="", help="comma-separated checks to skip: golden, attention, quant, speed, split")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dry = device.type == "cpu"
    skip = set(filter(None, args.skip.split(",")))
    emit(check="device", device=str(device), torch=torch.__version__, dry_run=dry,
         name=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type, ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="chatglm-gpu-check-") as work_dir:
        if "golden" not in skip:
            results += golden_checks(str(device), tokens=8 if dry else 24)
        if "attention" not in skip:
            results += attention_checks(device)
        if "quant" not in skip:
            results += quant_checks(device, dry)
        shape = args.shape or ("tiny" if dry else "6b")
        if "speed" not in skip:
            results += speed_checks(device, shape, [32, 64] if dry else [512, 4096], 4 if dry else 64,
                                    args.modes.split(","), work_dir)
        if "split" not in skip:
            results += split_check(shape, work_dir)
    failed = [r for r in results if not r["ok"]]
    emit(check="summary", checks=len(results), failed=len(failed), ok=not failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
