"""P-Tuning v2 checkpoints (issue 20): the prefix encoder loaded on top of a base model, its keys/values in every
cache before the tokens. The golden logits, greedy ids and chat strings of chatglm2-tiny-ptuning-p4 are checked
with the other golden models (test_model_golden.py, test_chat_golden.py: PTUNING_MODELS); here what only the
prefix has: the engine, padded batches, the projection, the errors, the dtype of the encoder."""

import json
import os
import shutil

import pytest
import torch

from conftest import PTUNING_MODELS, golden_case, loaded, model_dir
from model import load_model
from model.cache import KVCache
from model.engine import Engine, GenerationRequest
from model.generation import SamplingParams
from model.hub import CheckpointError
from test_engine import BatchSizes, alone_events, prompt, run_staggered

NAME = PTUNING_MODELS[0]
BASE = model_dir("chatglm2-tiny")
CKPT = model_dir(NAME)
PREFIX_KEY = "transformer.prefix_encoder.embedding.weight"


def test_golden_case_is_the_prefixed_base():
    case = golden_case(NAME)
    assert case["model_dir"] == "chatglm2-tiny" and case["ptuning"]["pre_seq_len"] == 4
    model, _ = loaded(NAME)
    assert model.prefix_length == 4 and model.config.pre_seq_len == 4 and not model.config.prefix_projection
    base, _ = loaded("chatglm2-tiny")
    assert base.prefix_length == 0 and base.transformer.prefix_encoder is None


def test_settings_come_from_the_folder_and_arguments_override(tmp_path):
    # pre_seq_len from ptuning.json (no argument); an argument that contradicts the tensors is a shape error
    model, _ = load_model(BASE, ptuning=CKPT, device="cpu", dtype="float32")
    assert model.config.pre_seq_len == 4
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*embedding.weight has shape \(4, 128\).*\(5, 128\)"):
        load_model(BASE, ptuning=CKPT, pre_seq_len=5, device="cpu", dtype="float32")


def test_padded_batch_rows_equal_each_row_alone():
    model, tok = loaded(NAME)
    texts = ["你好", "Tell me about the sea and the mountains"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert not bool(enc["attention_mask"].all())  # really padded
    with torch.inference_mode():
        batch = model(**enc).logits
        for row, text in enumerate(texts):
            one = tok([text], return_tensors="pt")
            n = one["input_ids"].shape[1]
            alone = model(**one).logits[0]
            torch.testing.assert_close(batch[row, -n:], alone, atol=1e-5, rtol=0)
            # a mask that already counts the prefix (pre_seq_len + tokens) means the same
            full = torch.cat([torch.ones(1, 4, dtype=torch.long), one["attention_mask"]], dim=-1)
            torch.testing.assert_close(model(one["input_ids"], one["position_ids"], full).logits[0], alone,
                                       atol=1e-6, rtol=0)
    out = model.generate(**enc, max_new_tokens=8)
    for row, text in enumerate(texts):
        one = tok([text], return_tensors="pt")
        alone = model.generate(**one, max_new_tokens=8)
        assert out[row, enc["input_ids"].shape[1]:].tolist() == alone[0, one["input_ids"].shape[1]:].tolist()


def test_engine_text_equals_the_model_alone():
    """Rows prefilled whole, prompts read in chunks (a staging cache) and batched decode steps: each text is
    the text of the model alone, so every cache the engine creates starts with the prefix."""
    model, tok = loaded(NAME)
    stops = tuple(tok.reply_stop_ids())
    texts = ["你好", "Tell me a long story about the sea and the mountains, please, with many details", "天气"]
    requests = [GenerationRequest(prompt(tok, t), SamplingParams(), 16, stops) for t in texts]
    expected = [alone_events(model, tok, r) for r in requests]
    eng = Engine(model, tok, max_queue=8, max_batch=4, prefill_chunk=8)
    sizes = BatchSizes(model)
    try:
        assert eng.context_length == model.config.seq_length - 4
        got = run_staggered(eng, requests, [[0], [1, 2]])
    finally:
        sizes.remove()
        eng.close()
    assert got == expected
    assert max(sizes.sizes) > 1 and (1, 8) in sizes.shapes  # batched steps and 8-token chunks happened
    fixed = Engine(model, tok, max_batch=2, cache_capacity=64)  # a fixed cache holds the prefix too
    try:
        handle = fixed.submit(requests[0])
        events = list(handle)
        assert ("".join(e.text for e in events), events[-1].finish) == expected[0]
        assert fixed.context_length == 60
    finally:
        fixed.close()


def test_prefix_encoder_stays_float32_in_a_bf16_model():
    model, tok = load_model(BASE, ptuning=CKPT, device="cpu", dtype="bfloat16")
    encoder = model.transformer.prefix_encoder
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    stored = torch.load(os.path.join(CKPT, "pytorch_model.bin"), weights_only=True)[PREFIX_KEY]
    assert torch.equal(encoder.embedding.weight, stored)  # exactly as stored, never rounded through bf16
    cache = model.seed_prefix(KVCache.for_model(model.config, 1, model.dtype, "cpu"))
    assert cache.length == 4 and cache.keys[0].dtype == torch.bfloat16
    torch.testing.assert_close(cache[1][1][:, 0].float(), stored.view(4, 4, 2, 16)[:, 3].bfloat16().float())
    out = model.generate(**tok(["你好"], return_tensors="pt"), max_new_tokens=4)
    assert out.shape == (1, 7)


def test_a_device_map_places_the_prefix_with_the_embedding():
    """A map that does not name the prefix encoder (the original's maps, auto_device_map) puts it with the
    embedding; the dispatched model gives the same logits."""
    reference, tok = loaded(NAME)
    device_map = {"transformer.embedding": "cpu", "transformer.encoder.layers.0": "cpu",
                  "transformer.encoder.layers.1": "cpu", "transformer.encoder.final_layernorm": "cpu",
                  "transformer.output_layer": "cpu"}
    model, _ = load_model(BASE, ptuning=CKPT, device_map=device_map, dtype="float32")
    enc = tok(["你好"], return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(model(**enc).logits, reference(**enc).logits, atol=1e-6, rtol=0)


def _projection_checkpoint(path, hidden=64, kv=128, rows=3):
    gen = torch.Generator().manual_seed(1)
    state = {PREFIX_KEY: torch.randn(rows, kv, generator=gen),
             "transformer.prefix_encoder.trans.0.weight": torch.randn(hidden, kv, generator=gen) * 0.1,
             "transformer.prefix_encoder.trans.0.bias": torch.randn(hidden, generator=gen) * 0.1,
             "transformer.prefix_encoder.trans.2.weight": torch.randn(kv, hidden, generator=gen) * 0.1,
             "transformer.prefix_encoder.trans.2.bias": torch.randn(kv, generator=gen) * 0.1}
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    # the training script's config.json: the whole config, pre_seq_len and prefix_projection in it
    config = json.load(open(os.path.join(BASE, "config.json")))
    config.update(pre_seq_len=rows, prefix_projection=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return state


def test_prefix_projection_as_the_original(tmp_path):
    """Linear(kv -> hidden), tanh, Linear(hidden -> kv) over the embedding, viewed as (pre_seq_len, layers*2,
    groups, head_dim): the same logits as the base model reading those keys/values from a cache."""
    state = _projection_checkpoint(tmp_path / "ckpt")
    model, tok = load_model(BASE, ptuning=str(tmp_path / "ckpt"), device="cpu", dtype="float32")
    assert model.config.prefix_projection and model.prefix_length == 3
    trans = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 128))
    trans.load_state_dict({k.removeprefix("transformer.prefix_encoder.trans."): v
                           for k, v in state.items() if ".trans." in k})
    with torch.no_grad():
        kv = trans(torch.nn.Embedding.from_pretrained(state[PREFIX_KEY])(torch.arange(3))).view(3, 4, 2, 16)
    base, _ = loaded("chatglm2-tiny")
    cache = KVCache.for_model(base.config, 1, torch.float32, "cpu")
    for layer in range(2):
        cache.update(layer, kv[:, 2 * layer].transpose(0, 1)[None], kv[:, 2 * layer + 1].transpose(0, 1)[None])
    cache.advance(3)
    enc = tok(["你好 hello"], return_tensors="pt")
    with torch.inference_mode():
        expected = base(enc["input_ids"], enc["position_ids"], None, cache).logits
        got = model(**enc)
    torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
    assert got.past_key_values.length == 3 + enc["input_ids"].shape[1]


def test_save_pretrained_keeps_the_prefix(tmp_path):
    model, tok = loaded(NAME)
    model.save_pretrained(str(tmp_path / "merged"))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(BASE, f), tmp_path / "merged" / f)
    again, _ = load_model(str(tmp_path / "merged"), device="cpu", dtype="float32")
    assert again.config.pre_seq_len == 4 and again.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    enc = tok(["你好"], return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(again(**enc).logits, model(**enc).logits, atol=0, rtol=0)


@pytest.mark.parametrize("how, message", [
    ("no_folder", r"not a directory"),
    ("no_weights", r"has no pytorch_model.bin"),
    ("no_embedding", r"pytorch_model.bin holds no transformer.prefix_encoder.embedding.weight"),
    ("other_base", r"pytorch_model.bin: transformer.prefix_encoder.embedding.weight has shape \(4, 256\) .* "
                   r"needs \(4, 128\)"),
    ("projection_missing", r"pytorch_model.bin lacks .*trans.0.weight"),
    ("projection_unexpected", r"pytorch_model.bin holds .*trans.0.weight.* does not have"),
])
def test_bad_checkpoints_are_refused_naming_the_file(tmp_path, how, message):
    path = tmp_path / "ckpt"
    kwargs = {}
    if how == "no_folder":
        pass
    elif how == "no_weights":
        path.mkdir()
        (path / "ptuning.json").write_text('{"pre_seq_len": 4}')
    elif how == "no_embedding":
        path.mkdir()
        torch.save({"transformer.other.weight": torch.zeros(2)}, path / "pytorch_model.bin")
    elif how == "other_base":  # a prefix trained on a model with twice the layers
        path.mkdir()
        torch.save({PREFIX_KEY: torch.zeros(4, 256)}, path / "pytorch_model.bin")
    elif how == "projection_missing":
        shutil.copytree(CKPT, path)
        kwargs["prefix_projection"] = True
    else:
        _projection_checkpoint(path)
        kwargs["prefix_projection"] = False
    with pytest.raises(CheckpointError, match=message):
        load_model(BASE, ptuning=str(path), device="cpu", dtype="float32", **kwargs)


def test_prefix_settings_without_a_checkpoint_are_refused():
    with pytest.raises(ValueError, match="ptuning="):
        load_model(BASE, pre_seq_len=4, device="cpu")
    with pytest.raises(CheckpointError, match="pre_seq_len=0 must be a positive"):
        load_model(BASE, ptuning=CKPT, pre_seq_len=0, device="cpu")


def test_a_chatglm2_prefix_on_chatglm1_is_refused_naming_the_shapes():
    """ChatGLM-6B has its own prefix (test_v1_ptuning.py); another family's does not fit its shapes."""
    with pytest.raises(CheckpointError, match=r"embedding.weight has shape \(4, 128\) .* needs \(4, 256\)"):
        load_model(model_dir("chatglm1-tiny"), ptuning=CKPT, device="cpu")


# ---- every script: --ptuning-checkpoint / --pre-seq-len (env CHECKPOINT_PATH / PRE_SEQ_LEN) -----------------
def test_the_scripts_flags_load_the_prefix(monkeypatch):
    from model.flags import ModelLoadError, build_parser, load_from_args

    args = build_parser("t").parse_args(["--model", BASE, "--device", "cpu", "--dtype", "float32",
                                         "--ptuning-checkpoint", CKPT])
    model, _ = load_from_args(args)
    assert model.config.pre_seq_len == 4
    monkeypatch.setenv("CHECKPOINT_PATH", CKPT)
    monkeypatch.setenv("PRE_SEQ_LEN", "4")
    args = build_parser("t").parse_args(["--model", BASE, "--device", "cpu", "--dtype", "float32"])
    assert (args.ptuning_checkpoint, args.pre_seq_len) == (CKPT, 4)
    monkeypatch.delenv("CHECKPOINT_PATH")
    args = build_parser("t").parse_args(["--model", BASE, "--device", "cpu"])
    with pytest.raises(ModelLoadError, match="pre_seq_len"):  # a length without a checkpoint: what to do
        load_from_args(args)


@pytest.mark.slow
def test_openai_api_serves_the_prefixed_model():
    import httpx

    from serving import ServerProcess

    model, tok = load_model(BASE, ptuning=CKPT, device="cpu", dtype="float32")
    expected = model.chat(tok, "你好", do_sample=False, max_new_tokens=12)[0]
    with ServerProcess("openai_api.py", BASE, "--ptuning-checkpoint", CKPT) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    assert expected != loaded("chatglm2-tiny")[0].chat(loaded("chatglm2-tiny")[1], "你好", do_sample=False,
                                                       max_new_tokens=12)[0]  # the prefix changes the reply
