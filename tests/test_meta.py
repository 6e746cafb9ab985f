"""The model on torch's meta device: shapes and dtypes only, and like CUDA it refuses an op mixing a meta tensor
with a CPU one, so a tensor made on the wrong device (torch.arange without device=, a CPU scratch buffer, ...)
fails here as it would on a GPU. Every family, the int4 / int8 checkpoints, half precision and float32, through
the branches of CUDA and of MPS (CHATGLM_FORCE_GPU_PATHS applies to meta tensors too).

What cannot run on meta, since it needs values: reading a sampled id as a Python int (stream_ids, the engine's
choose_rows(), stopping on a stop id), a seeded generator (torch has none for meta), ChatGLM-6B's prompt positions
(computed on the host from the ids; here on the CPU, then moved).
"""

from functools import lru_cache

import pytest
import torch

from conftest import model_dir
from model.devices import FORCE_ENV

MODELS = ["chatglm2-tiny", "chatglm3-tiny", "chatglm2-tiny-int4", "chatglm2-tiny-int8", "chatglm1-tiny",
          "chatglm1-tiny-int4"]
META = torch.device("meta")


@lru_cache(maxsize=None)
def on_meta(name, dtype):
    from model import load_model

    model, tokenizer = load_model(model_dir(name), device="meta", dtype=dtype)
    assert {p.device for p in model.parameters()} == {META}
    return model, tokenizer


@pytest.fixture(params=["cuda", "mps"])  # meta's own branches are CUDA's on a GPU without flash attention
def path(request, monkeypatch):
    monkeypatch.setenv(FORCE_ENV, request.param)
    return request.param


# bf16 takes fp16's branches, except int4 on CUDA (the fused product takes bf16 only)
@pytest.fixture(params=[(m, d) for m in MODELS for d in ("float16", "float32")]
                + [(m, "bfloat16") for m in MODELS if "-int4" in m], ids=lambda p: f"{p[0]}-{p[1]}")
def meta_model(request):
    return on_meta(*request.param)


def prompts(tokenizer, texts):
    """(ids on the CPU, their attention mask) for prompts left-padded to one length."""
    rows = [tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def check_logits(out, model, rows, length):
    assert out.logits.device == META and out.logits.shape == (rows, length, model.config.padded_vocab_size)


@torch.inference_mode()
def test_prefill_then_decode(meta_model, path):
    from model.cache import KVCache
    from model.generation import next_position_ids, prompt_position_ids

    model, tokenizer = meta_model
    ids, _ = prompts(tokenizer, ["你好", "你好"])
    cache = KVCache.for_model(model.config, 2, model.dtype, META, capacity=4)  # grows while decoding
    ids = ids.to(META)  # every family works its prompt positions and masks out on the device
    positions = prompt_position_ids(model, ids)
    out = model.transformer(ids, positions, None, cache)
    check_logits(out, model, 2, ids.shape[1])
    for _ in range(6):
        positions = next_position_ids(model, positions)
        out = model.transformer(torch.zeros(2, 1, dtype=torch.long, device=META), positions, None, cache)
        check_logits(out, model, 2, 1)
    assert cache.length == ids.shape[1] + 6 and all(k.device == META for k in cache.keys + cache.values)


@torch.inference_mode()
def test_padded_batch(meta_model, path):
    from model.cache import KVCache
    from model.generation import next_position_ids, prompt_position_ids

    model, tokenizer = meta_model
    ids, mask = prompts(tokenizer, ["你好", "你好，今天天气怎么样？"])
    cache = KVCache.for_model(model.config, 2, model.dtype, META)
    positions = prompt_position_ids(model, ids.to(META))
    mask = mask.to(META)
    out = model.transformer(ids.to(META), positions, mask, cache, last_logits_only=True)
    check_logits(out, model, 2, 1)
    for _ in range(3):
        mask = torch.cat([mask, mask.new_ones(2, 1)], dim=-1)
        positions = next_position_ids(model, positions)
        out = model.transformer(torch.zeros(2, 1, dtype=torch.long, device=META), positions, mask, cache)
        check_logits(out, model, 2, 1)


@torch.inference_mode()
def test_chunked_prefill(meta_model, path):
    from model.cache import KVCache
    from model.generation import prompt_position_ids

    model, tokenizer = meta_model
    if model.config.family == "chatglm1":
        pytest.skip("ChatGLM-6B's prompt attends to itself both ways: it is always read whole")
    ids = torch.tensor([tokenizer.encode("你好，今天天气怎么样？" * 2)], device=META)
    cache = KVCache.for_model(model.config, 1, model.dtype, META, capacity=4)
    for start in range(0, ids.shape[1], 3):
        chunk = ids[:, start:start + 3]
        out = model.transformer(chunk, prompt_position_ids(model, chunk, start), None, cache, last_logits_only=True)
        check_logits(out, model, 1, 1)
    assert cache.length == ids.shape[1]


@pytest.mark.parametrize("sampling", [dict(), dict(do_sample=True, temperature=0.8, top_k=5, top_p=0.9),
                                      dict(do_sample=True, repetition_penalty=1.3)], ids=["greedy", "warped", "penalty"])
def test_generation_loop(meta_model, path, sampling):
    from model.generation import SamplingParams, generate_tokens, prompt_position_ids

    model, tokenizer = meta_model
    ids, mask = prompts(tokenizer, ["你好", "你好，今天天气怎么样？"])
    hook_devices = []

    def hook(history, logits):
        hook_devices.append((history.device, logits.device))
        return logits

    steps = list(generate_tokens(model, ids.to(META), max_new_tokens=5, params=SamplingParams(**sampling),
                                 position_ids=prompt_position_ids(model, ids.to(META)), attention_mask=mask.to(META),
                                 logits_hooks=[hook]))  # no stop ids: stopping on one reads a value
    assert len(steps) == 5 and all(t.device == META and t.shape == (2,) for t in steps)
    assert set(hook_devices) == {(META, META)}


def test_seeded_sampling_cannot_run_on_meta():
    from model.generation import make_generator

    with pytest.raises(RuntimeError):  # if torch ever gets one, seeded sampling joins test_generation_loop
        make_generator(0, META)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_engine_batch_operations(monkeypatch, path, name):
    """Prefill into a row, a long prompt read in chunks into its own cache and adopted, batched decode steps
    with per-row masks, rows leaving: all on meta. Sampling is replaced by a fixed id (it yields a Python int)."""
    import model.engine as engine_module
    from model.engine import Engine, GenerationRequest
    from model.generation import SamplingParams

    model, tokenizer = on_meta(name, "float16")
    seen = []

    def choose_rows(samplers, logits):  # the step's sampling: one fixed id per row
        seen.append(logits.device)
        return [100] * len(samplers)

    monkeypatch.setattr(engine_module, "choose_rows", choose_rows)
    engine = Engine(model, tokenizer, max_queue=8, max_batch=4, prefill_chunk=4)
    try:
        stops = tuple(tokenizer.reply_stop_ids())
        requests = [GenerationRequest(tokenizer.encode(t), SamplingParams(), n, stops)
                    for t, n in (("你好", 3), ("你好，今天天气怎么样？" * 2, 5), ("hi", 7), ("天气", 2))]
        events = [list(h) for h in [engine.submit(r) for r in requests]]
    finally:
        engine.close()
    assert [e[-1].error for e in events] == [None] * 4
    assert [e[-1].finish for e in events] == ["length"] * 4
    assert set(seen) == {META} and engine.cache.keys[0].device == META
