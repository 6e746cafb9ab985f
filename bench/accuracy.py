"""How much int8 / int4 weight-only quantization changes the numbers, per quantized linear and at the output.

    python bench/accuracy.py                                  # the golden tiny models (seconds)
    python bench/accuracy.py --shape 6b --dir /tmp/bench-6b   # also a 6B-shaped random checkpoint
    python bench/accuracy.py --json accuracy.json

For each model the float model reads the golden prompts while hooks record the input of every linear that
quantization replaces. Then, per linear and per bit width, on those recorded inputs:

- rtn:     the error of round-to-nearest per-row quantization itself, computed exactly (float64 product with
           the de-quantized weight; float32 for the random checkpoint) against the product with the float
           weight;
- kernel:  the error of what the model really computes (QuantizedLinear.forward on this CPU: the native
           matrix-vector kernel for one token, the blocked GEMM for all the prompts' rows) against the same
           reference;
- float:   for context, the error of the unquantized layer (nn.Linear in the model's dtype) against it.

Errors are relative Frobenius norms, ||y - y_ref|| / ||y_ref||; the table shows the median and the maximum
over the layers. kernel / rtn near 1.00 means the kernels add nothing to the error quantization must make.

At the output, the model quantized while loading (`load_model(..., quantize=bits)`, the user's path) reads
the same prompt: relative error of its logits against the float model's, and how often the top-1 token
agrees. For the golden tiny model the same is shown for the original implementation, from its recorded
logits of chatglm2-tiny and its int4 / int8 copies (which hold the same weights quantized), so the two
implementations' quantization error can be compared directly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import load_model  # noqa: E402
from model.quantization import QuantizedLinear, dequantize_weight  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "golden")


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def record_linear_inputs(model, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Run the float model once; returns ({linear name: (module, input rows)}, logits [T, vocab])."""
    inputs, hooks = {}, []
    for i, layer in enumerate(model.blocks):
        for path in model.BLOCK_LINEARS:
            module = layer.get_submodule(path)
            name = f"layers.{i}.{path}"
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, name=name: inputs.__setitem__(name, (mod, args[0].reshape(-1, args[0].shape[-1])))))
    try:
        with torch.inference_mode():
            logits = model(ids).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    return inputs, logits


def linear_errors(inputs: dict, bits_list: list[int], exact_dtype=torch.float64) -> dict:
    """inputs: {name: (linear, rows of every prompt)}. The references are computed in exact_dtype (float32
    suffices for the 6B shape: its own error is ~1e-6, far below the 1e-3..1e-1 measured here)."""
    rows = {}
    with torch.inference_mode():
        for name, (linear, x) in inputs.items():
            w = linear.weight.detach().to(exact_dtype)
            bias = None if linear.bias is None else linear.bias.detach().to(exact_dtype)
            xe = x.to(exact_dtype)
            exact = torch.nn.functional.linear(xe, w, bias)
            entry = {"float": rel(linear(x), exact)}
            for bits in bits_list:
                q = QuantizedLinear.from_linear(linear, bits)
                deq = dequantize_weight(q.weight, q.weight_scale.float(), bits, exact_dtype)
                entry[f"int{bits}"] = {
                    "rtn": rel(torch.nn.functional.linear(xe, deq, bias), exact),
                    "kernel_prompt": rel(q(x), exact),
                    "kernel_decode": rel(q(x[-1:]), exact[-1:]),
                }
                del q, deq
            rows[name] = entry
    return rows


def output_errors(directory: str, dtype: str, prompts: list, float_logits: list, bits_list) -> dict:
    out = {}
    for bits in bits_list:
        model, _ = load_model(directory, device="cpu", dtype=dtype, quantize=bits)
        errs, agree = [], []
        for (ids, rows), ref in zip(prompts, float_logits):
            with torch.inference_mode():
                logits = model(ids).logits[0, rows].float()
            errs.append(rel(logits, ref.double()))
            agree += (logits.argmax(-1) == ref.argmax(-1)).tolist()
        del model
        out[f"int{bits}"] = {"logits": statistics.median(errs), "top1": statistics.mean(agree)}
    return out


def golden_reference() -> dict:
    """The original implementation's own quantization error on chatglm2-tiny, from the golden cases."""
    from safetensors.torch import load_file

    def cases(name):
        with open(os.path.join(GOLDEN, "cases", f"{name}.json"), encoding="utf-8") as f:
            meta = json.load(f)["runs"]["float32"]["cases"]
        return meta, load_file(os.path.join(GOLDEN, "cases", f"{name}.safetensors"))

    ref_meta, ref_tensors = cases("chatglm2-tiny")
    out = {}
    for bits in (8, 4):
        meta, tensors = cases(f"chatglm2-tiny-int{bits}")
        errs, agree = [], []
        for a, b in zip(ref_meta, meta):
            assert a["text"] == b["text"]
            fa, fb = ref_tensors[a["prefill_logits"]], tensors[b["prefill_logits"]]
            errs.append(rel(fb, fa.double()))
            agree += (fa.argmax(-1) == fb.argmax(-1)).tolist()
        out[f"int{bits}"] = {"logits": statistics.median(errs), "top1": statistics.mean(agree)}
    return out


def golden_prompts() -> list[tuple[str, list[int]]]:
    """The golden cases' texts and the rows whose logits the original recorded."""
    with open(os.path.join(GOLDEN, "cases", "chatglm2-tiny.json"), encoding="utf-8") as f:
        return [(c["text"], c["prefill_rows"]) for c in json.load(f)["runs"]["float32"]["cases"]]


def evaluate(label: str, directory: str, dtype: str, bits_list: list[int], exact_dtype=torch.float64) -> dict:
    """Per-linear errors on the golden prompts' recorded inputs (all prompts' rows together); output errors on
    the rows the original recorded."""
    model, tokenizer = load_model(directory, device="cpu", dtype=dtype)
    prompts, float_logits, inputs = [], [], {}
    for text, rows in golden_prompts():
        ids = torch.tensor(tokenizer([text])["input_ids"])
        rows = [r for r in rows if r < ids.shape[1]]
        recorded, logits = record_linear_inputs(model, ids)
        for name, (linear, x) in recorded.items():
            inputs[name] = (linear, torch.cat([inputs[name][1], x]) if name in inputs else x)
        prompts.append((ids, rows))
        float_logits.append(logits[rows])
    per_linear = linear_errors(inputs, bits_list, exact_dtype)
    del model, inputs
    return {"model": label, "dtype": dtype, "prompts": len(prompts), "tokens": sum(ids.shape[1] for ids, _ in prompts),
            "linears": per_linear,
            "output": output_errors(directory, dtype, prompts, float_logits, bits_list)}


def summarize(result: dict, bits_list: list[int]) -> list[str]:
    lines = [f"{result['model']} ({result['dtype']}; the {result['prompts']} golden prompts, {result['tokens']} tokens; "
             f"{len(result['linears'])} quantized linears; relative error, median / max over them)"]
    lines.append("| bits | RTN quantization | kernel, prompt | kernel, one token | kernel / RTN | unquantized layer "
                 "| logits vs float | top-1 agrees | original: logits vs float | original: top-1 |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    flt = [e["float"] for e in result["linears"].values()]
    for bits in bits_list:
        key = f"int{bits}"
        col = {k: [e[key][k] for e in result["linears"].values()] for k in ("rtn", "kernel_prompt", "kernel_decode")}
        ratio = max(e[key]["kernel_prompt"] / e[key]["rtn"] for e in result["linears"].values())

        def mm(xs):
            return f"{statistics.median(xs):.2e} / {max(xs):.2e}"
        out = result["output"][key]
        orig = result.get("original", {}).get(key)
        lines.append(f"| {bits} | {mm(col['rtn'])} | {mm(col['kernel_prompt'])} | {mm(col['kernel_decode'])} | "
                     f"<= {ratio:.3f} | {mm(flt)} | {out['logits']:.2e} | {out['top1'] * 100:.0f}% | "
                     + (f"{orig['logits']:.2e} | {orig['top1'] * 100:.0f}% |" if orig else "- | - |"))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["6b", "mid", "small"], help="also a random checkpoint of this shape")
    ap.add_argument("--dir", help="where the random checkpoint is (its bf16/ folder is made if missing; "
                                  "bench/speed.py --dir uses the same layout)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    bits_list = [8, 4]
    results = []
    tiny = evaluate("chatglm2-tiny (golden)", os.path.join(GOLDEN, "models", "chatglm2-tiny"), "float32", bits_list)
    tiny["original"] = golden_reference()
    results.append(tiny)
    if args.shape:
        import tempfile

        from model.tiny import write_checkpoint
        root = args.dir or tempfile.mkdtemp(prefix=f"chatglm-accuracy-{args.shape}-")
        directory = os.path.join(root, "bf16")
        if not os.path.isfile(os.path.join(directory, "config.json")):
            write_checkpoint(directory, "chatglm2", args.shape, "bfloat16")
        results.append(evaluate(f"random {args.shape}", directory, "bfloat16", bits_list, torch.float32))
    for r in results:
        print("\n".join(summarize(r, bits_list)) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
