"""P-Tuning v2 on ChatGLM-6B (issue 20): no golden case was recorded for it, so these tests pin the original's
semantics directly and check the invariants every path must keep.

The original ChatGLM-6B (modeling_chatglm.py of THUDM/chatglm-6b): PrefixEncoder is Embedding(pre_seq_len,
num_layers * 2 * hidden) or, with prefix_projection, Embedding(pre_seq_len, hidden) -> Linear(hidden, hidden) ->
tanh -> Linear(hidden, num_layers * 2 * hidden); get_prompt views its output as (batch, pre_seq_len,
num_layers * 2, heads, head_dim) and permutes it to past_key_values of (seq, batch, heads, head_dim) per layer
(keys at 2i, values at 2i + 1). With no past, forward takes that prompt as the past; its token mask (True =
blocked) gets pre_seq_len columns of False prepended; position ids are computed from input_ids alone (not
shifted by the prefix), also in prepare_inputs_for_generation with a past.
"""

import os
import shutil

import pytest
import torch

from conftest import loaded, model_dir
from model import load_model
from model.cache import KVCache
from model.engine import Engine, GenerationRequest
from model.generation import SamplingParams
from model.hub import CheckpointError
from test_engine import alone_events, prompt, run_staggered

BASE = model_dir("chatglm1-tiny")
P = 3
PREFIX = "transformer.prefix_encoder."
TEXTS = ["你好", "Tell me about the sea and the mountains"]


def write_checkpoint(path, projection: bool = False, seed: int = 0) -> dict:
    """A P-Tuning checkpoint folder as the original's ptuning/main.py saves it: pytorch_model.bin holding only
    transformer.prefix_encoder.* (float32), no config: pre_seq_len / projection follow from the tensors."""
    config = loaded("chatglm1-tiny")[0].config
    H, L = config.hidden_size, config.num_layers
    gen = torch.Generator().manual_seed(seed)
    if projection:
        state = {"embedding.weight": torch.randn(P, H, generator=gen),
                 "trans.0.weight": torch.randn(H, H, generator=gen) / H ** 0.5, "trans.0.bias": torch.zeros(H),
                 "trans.2.weight": torch.randn(L * 2 * H, H, generator=gen), "trans.2.bias": torch.zeros(L * 2 * H)}
    else:
        state = {"embedding.weight": torch.randn(P, L * 2 * H, generator=gen)}
    state = {PREFIX + k: v for k, v in state.items()}
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    return state


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("v1-ptuning") / "checkpoint-100")
    write_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def prefixed(ckpt):
    return load_model(BASE, ptuning=ckpt, device="cpu", dtype="float32")


def original_past(prefix_out: torch.Tensor, batch: int, config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The original get_prompt: encoder output -> per layer (key, value), each (pre_seq_len, batch, heads,
    head_dim)."""
    nh, hd = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    past = prefix_out[None].expand(batch, -1, -1).reshape(batch, P, config.num_layers * 2, nh, hd)
    return [(kv[0], kv[1]) for kv in past.permute(2, 1, 0, 3, 4).split(2)]


def explicit_cache(past, config) -> KVCache:
    """A cache of the base model holding `past` (the original's layout) as its first positions."""
    cache = KVCache.for_model(config, past[0][0].shape[1], torch.float32, "cpu")
    for layer, (key, value) in enumerate(past):
        cache.update(layer, key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3))
    cache.advance(P)
    return cache


def original_inputs(ids: list[int], config) -> dict:
    """input_ids, position_ids and the (1, 1, T, T) mask (True = blocked) of one unpadded prompt, as the
    original's get_position_ids / get_masks compute them: the context before <bos> sees itself both ways; its
    tokens are at 0..c-1, the rest at the [gMASK] position with block positions 1, 2, ..."""
    T, c = len(ids), ids.index(config.bos_token_id)
    mask_at = ids.index(config.gmask_token_id)
    attend = torch.ones(T, T).tril()
    attend[:, :c] = 1
    positions = [j if j < c else mask_at for j in range(T)]
    blocks = [0 if j < c else j - c + 1 for j in range(T)]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([[positions, blocks]]),
            "attention_mask": (attend < 0.5)[None, None]}


def expected_logits(past, enc, steps=()):
    """What the original computes: the base network with the prefix given explicitly as past_key_values and
    its token mask (True = blocked) extended by pre_seq_len unblocked columns; then decode steps, each one
    token at the positions prepare_inputs_for_generation gives (mask position, block position + 1)."""
    base, _ = loaded("chatglm1-tiny")
    cache = explicit_cache(past, base.config)
    blocked = enc["attention_mask"]  # (B, 1, T, T), True = blocked
    blocked = torch.cat([torch.zeros(*blocked.shape[:3], P, dtype=torch.bool), blocked], dim=-1)
    with torch.inference_mode():
        out = [base.transformer(enc["input_ids"], enc["position_ids"], ~blocked, cache).logits]
        positions = enc["position_ids"][..., -1:]
        for token in steps:
            positions = torch.cat([positions[:, :1], positions[:, 1:] + 1], dim=1)
            out.append(base.transformer(torch.tensor([[token]]), positions, None, cache).logits)
    return out, cache


def test_a_checkpoint_in_the_original_format_loads_with_its_settings_from_the_tensors(prefixed, ckpt):
    model, _ = prefixed
    assert model.prefix_length == P and model.config.pre_seq_len == P and not model.config.prefix_projection
    stored = torch.load(os.path.join(ckpt, "pytorch_model.bin"), weights_only=True)
    assert torch.equal(model.transformer.prefix_encoder.embedding.weight, stored[PREFIX + "embedding.weight"])
    base, _ = loaded("chatglm1-tiny")
    assert base.prefix_length == 0 and base.transformer.prefix_encoder is None


def test_prefix_is_the_originals_past_with_an_unblocked_mask_and_unshifted_positions(prefixed, ckpt):
    model, tok = prefixed
    enc = original_inputs(tok.encode(TEXTS[1]), model.config)
    stored = torch.load(os.path.join(ckpt, "pytorch_model.bin"), weights_only=True)[PREFIX + "embedding.weight"]
    past = original_past(stored, 1, model.config)
    with torch.inference_mode():
        got = model(enc["input_ids"])  # positions and mask are ours, from the ids
        token = int(got.logits[0, -1].argmax())
        positions = enc["position_ids"][..., -1:]
        step = model(torch.tensor([[token]]), torch.cat([positions[:, :1], positions[:, 1:] + 1], dim=1),
                     past_key_values=got.past_key_values)
    (want, want_step), _ = expected_logits(past, enc, [token])
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(step.logits, want_step, atol=1e-5, rtol=0)
    cache = got.past_key_values  # the reference layout of cache[i]: (seq, batch, heads, head_dim), prefix first
    assert cache.length == P + enc["input_ids"].shape[1] + 1
    for layer, (key, value) in enumerate(past):
        torch.testing.assert_close(cache[layer][0][:P], key, atol=0, rtol=0)
        torch.testing.assert_close(cache[layer][1][:P], value, atol=0, rtol=0)
    base, _ = loaded("chatglm1-tiny")
    with torch.inference_mode():  # the prefix really changes the output
        assert not torch.allclose(base(enc["input_ids"]).logits, got.logits, atol=1e-2)


def test_prefix_projection_as_the_original(tmp_path):
    state = write_checkpoint(tmp_path / "ckpt", projection=True, seed=1)
    model, tok = load_model(BASE, ptuning=str(tmp_path / "ckpt"), device="cpu", dtype="float32")
    assert model.config.prefix_projection and model.prefix_length == P
    H = model.config.hidden_size
    trans = torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh(), torch.nn.Linear(H, 2 * 2 * H))
    trans.load_state_dict({k.removeprefix(PREFIX + "trans."): v for k, v in state.items() if ".trans." in k})
    enc = original_inputs(tok.encode(TEXTS[0]), model.config)
    with torch.inference_mode():
        past = original_past(trans(state[PREFIX + "embedding.weight"]), 1, model.config)
        got = model(enc["input_ids"]).logits
    (want,), _ = expected_logits(past, enc)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cached_decoding_equals_reading_the_whole_sequence_again(prefixed):
    model, tok = prefixed
    enc = tok([TEXTS[1]], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=[])
    assert out.shape == (1, n + 8)
    with torch.inference_mode():
        whole = model(out[:, :-1]).logits[0, n - 1:]  # positions and mask from the ids alone, prefix in front
    assert whole.argmax(-1).tolist() == out[0, n:].tolist()
    with torch.inference_mode():
        seq, past, steps = out[:, :n], None, []
        for _ in range(8):
            step = model(**model.prepare_inputs_for_generation(seq, past_key_values=past))
            past = step.past_key_values
            steps.append(step.logits[0, -1])
            seq = torch.cat([seq, step.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert seq.tolist() == out.tolist()
    torch.testing.assert_close(torch.stack(steps), whole, atol=1e-4, rtol=0)


def test_padded_batch_rows_equal_each_row_alone(prefixed):
    model, tok = prefixed
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["input_ids"] == tok.pad_token_id).any()  # really padded
    with torch.inference_mode():
        batch = model(**enc).logits
        for row, text in enumerate(TEXTS):
            one = tok([text], return_tensors="pt")
            n = one["input_ids"].shape[1]
            # float32 rounding of other reduction shapes (logits up to ~30; float64 gives equal logits)
            torch.testing.assert_close(batch[row, -n:], model(**one).logits[0], atol=1e-4, rtol=0)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=[])
    for row, text in enumerate(TEXTS):
        one = tok([text], return_tensors="pt")
        alone = model.generate(**one, max_new_tokens=8, do_sample=False, eos_token_id=[])
        assert out[row, enc["input_ids"].shape[1]:].tolist() == alone[0, one["input_ids"].shape[1]:].tolist()


def test_engine_and_chat_give_the_text_of_the_model_alone(prefixed):
    model, tok = prefixed
    stops = tuple(tok.reply_stop_ids())
    requests = [GenerationRequest(prompt(tok, t), SamplingParams(), 12, stops) for t in TEXTS + ["天气"]]
    expected = [alone_events(model, tok, r) for r in requests]
    eng = Engine(model, tok, max_queue=8, max_batch=4)
    try:
        assert eng.context_length == model.config.seq_length - P
        assert run_staggered(eng, requests, [[0], [1, 2]]) == expected
    finally:
        eng.close()
    fixed = Engine(model, tok, max_batch=2, cache_capacity=64)  # a fixed cache holds the prefix too
    try:
        events = list(fixed.submit(requests[0]))
        assert ("".join(e.text for e in events), events[-1].finish) == expected[0]
    finally:
        fixed.close()
    reply, history = model.chat(tok, TEXTS[0], do_sample=False, max_new_tokens=12)
    streamed = list(model.stream_chat(tok, TEXTS[0], do_sample=False, max_new_tokens=12))
    assert streamed[-1] == (reply, history)


def test_prefix_encoder_stays_float32_in_a_bf16_model(ckpt):
    model, tok = load_model(BASE, ptuning=ckpt, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.transformer.prefix_encoder.parameters())
    stored = torch.load(os.path.join(ckpt, "pytorch_model.bin"), weights_only=True)[PREFIX + "embedding.weight"]
    assert torch.equal(model.transformer.prefix_encoder.embedding.weight, stored)
    cache = model.seed_prefix(KVCache.for_model(model.config, 1, model.dtype, "cpu"))
    assert cache.length == P and cache.keys[0].dtype == torch.bfloat16
    key = original_past(stored, 1, model.config)[1][0]  # layer 1's keys
    torch.testing.assert_close(cache[1][0].float(), key.bfloat16().float(), atol=0, rtol=0)
    out = model.generate(**tok([TEXTS[0]], return_tensors="pt"), max_new_tokens=4)
    assert out.shape[1] > 0


def test_save_pretrained_keeps_the_prefix(prefixed, tmp_path):
    model, tok = prefixed
    model.save_pretrained(str(tmp_path / "merged"))
    for f in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(BASE, f), tmp_path / "merged" / f)
    again, _ = load_model(str(tmp_path / "merged"), device="cpu", dtype="float32")
    assert again.config.pre_seq_len == P and again.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    enc = tok([TEXTS[0]], return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(again(**enc).logits, model(**enc).logits, atol=0, rtol=0)


def test_a_prefix_of_another_family_is_refused_naming_the_shapes(tmp_path):
    write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"embedding.weight has shape \(3, 256\) .* needs \(3, 128\)"):
        load_model(model_dir("chatglm2-tiny"), ptuning=str(tmp_path / "ckpt"), device="cpu")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin lacks .*trans.0.weight"):
        load_model(BASE, ptuning=str(tmp_path / "ckpt"), prefix_projection=True, device="cpu")


def test_the_scripts_flags_load_the_prefix(ckpt, monkeypatch):
    from model.flags import build_parser, load_from_args

    monkeypatch.setenv("CHECKPOINT_PATH", ckpt)
    monkeypatch.setenv("PRE_SEQ_LEN", str(P))
    args = build_parser("t").parse_args(["--model", BASE, "--device", "cpu", "--dtype", "float32"])
    model, _ = load_from_args(args)
    assert model.prefix_length == P


def test_a_training_pass_reads_the_prefix_as_the_cache_does(prefixed):
    """Training concatenates the prefix in each layer (no cache): the logits of inference, and the prefix
    encoder gets gradients; gradient checkpointing changes neither the loss nor the gradients."""
    model, tok = prefixed
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        cached = model(**enc).logits
    train, _ = load_model(BASE, device="cpu", dtype="float32")
    train.requires_grad_(False)
    train.add_prefix_encoder(P).load_state_dict(model.transformer.prefix_encoder.state_dict())
    train.transformer.prefix_encoder.requires_grad_(True)
    train.train()
    labels = enc["input_ids"].clone()
    out = train(**enc, labels=labels)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits.detach(), cached, atol=1e-5, rtol=0)
    out.loss.backward()
    grad = train.transformer.prefix_encoder.embedding.weight.grad.clone()
    assert float(grad.abs().sum()) > 0
    train.zero_grad()
    train.gradient_checkpointing_enable()
    again = train(**enc, labels=labels)
    again.loss.backward()
    torch.testing.assert_close(again.loss, out.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(train.transformer.prefix_encoder.embedding.weight.grad, grad, atol=1e-6, rtol=1e-5)
