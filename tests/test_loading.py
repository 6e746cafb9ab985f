"""Checkpoint formats, dtype/device choice, config validation, Hub resolution, transformers Auto* classes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, loaded, model_dir
from model import CheckpointError, ChatGLMConfig, ModelNotFoundError, UnsupportedConfigError, load_model
from model.loading import pick_device, pick_dtype
from model.modeling import rotary_cos_sin

PROMPT = "你好 hello"


def logits_of(model, tokenizer):
    with torch.inference_mode():
        return model(torch.tensor([tokenizer.encode(PROMPT)])).logits.float()


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = loaded("chatglm2-tiny")
    return model, tokenizer, logits_of(model, tokenizer)


def copy_meta(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), dst)


@pytest.mark.parametrize("layout", ["bin", "bin_sharded", "safetensors_sharded"])
def test_every_checkpoint_layout_loads_the_same(tmp_path, reference, layout):
    model, tokenizer, expected = reference
    src = model_dir("chatglm2-tiny")
    dst = str(tmp_path / layout)
    copy_meta(src, dst)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == "bin":
        torch.save(state, os.path.join(dst, "pytorch_model.bin"))
    elif layout == "bin_sharded":
        names = sorted(state)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
            fname = f"pytorch_model-0000{i}-of-00002.bin"
            torch.save({k: state[k] for k in part}, os.path.join(dst, fname))
            weight_map.update({k: fname for k in part})
        with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        model.save_pretrained(dst, max_shard_size=100_000)
        assert os.path.isfile(os.path.join(dst, "model.safetensors.index.json"))
    again, tok = load_model(dst, device="cpu", dtype="float32")
    assert torch.equal(logits_of(again, tok), expected)


def test_bin_is_loaded_without_unpickling_code(tmp_path, reference):
    dst = str(tmp_path / "evil")
    copy_meta(model_dir("chatglm2-tiny"), dst)

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Boom()}, os.path.join(dst, "pytorch_model.bin"))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_model(dst, device="cpu")


def test_bfloat16_and_auto_dtype(reference):
    _, _, expected = reference
    model, tokenizer = load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    got = logits_of(model, tokenizer)
    # bf16 keeps ~3 significant digits: the logits agree to within bf16 rounding, not bit for bit.
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    auto, _ = load_model(model_dir("chatglm2-tiny"))
    best = pick_device("auto")  # CUDA, then MPS, then the CPU: what this machine has
    assert auto.device.type == best.type and auto.dtype == pick_dtype("auto", best)
    assert best.type != "cpu" or auto.dtype in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(model_dir("chatglm2-tiny"), dtype="float8")


def test_missing_tensor_is_reported(tmp_path, reference):
    model, _, _ = reference
    dst = str(tmp_path / "partial")
    copy_meta(model_dir("chatglm2-tiny"), dst)
    state = dict(model.state_dict())
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    torch.save(state, os.path.join(dst, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="dense_4h_to_h"):
        load_model(dst, device="cpu")


def test_no_weights_is_reported(tmp_path):
    copy_meta(model_dir("chatglm2-tiny"), str(tmp_path))
    with pytest.raises(CheckpointError, match="has no weights"):
        load_model(str(tmp_path))


def test_save_pretrained_round_trip(tmp_path, reference):
    model, tokenizer, expected = reference
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    again, tok = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert again.config.family == "chatglm2" and tok.family == "chatglm2"
    assert torch.equal(logits_of(again, tok), expected)


def _mapped(path):
    with open("/proc/self/maps") as f:
        return os.path.realpath(path) in f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_safetensors_weights_stay_in_the_file_mapping(tmp_path, reference, monkeypatch):
    """Weights used as stored are views of a private memory map of the file: loading reads no weight bytes,
    writes to a parameter never reach the file, and saving over the mapped checkpoint is safe."""
    model, tokenizer, expected = reference
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    weights = os.path.join(tmp_path, "model.safetensors")
    before = open(weights, "rb").read()
    mapped, tok = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert _mapped(weights)
    assert torch.equal(logits_of(mapped, tok), expected)
    with torch.no_grad():
        mapped.transformer.output_layer.weight.zero_()  # copy-on-write: this process only
    assert open(weights, "rb").read() == before
    mapped.save_pretrained(str(tmp_path))  # over the file it maps: replaced, not rewritten in place
    assert not torch.equal(logits_of(mapped, tok), expected)  # the mapping (and the zeroed layer) is intact
    again, _ = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert torch.equal(logits_of(again, tok), logits_of(mapped, tok))
    del mapped, again
    # a dtype change needs a converted copy; CHATGLM_MMAP=0 reads every tensor into memory
    as_bf16, _ = load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert as_bf16.transformer.output_layer.weight.dtype == torch.bfloat16
    monkeypatch.setenv("CHATGLM_MMAP", "0")
    read, _ = load_model(str(tmp_path), device="cpu", dtype="float32")
    del as_bf16
    import gc
    gc.collect()
    assert not _mapped(weights)
    assert not logits_of(read, tok).any()  # the saved checkpoint has the zeroed output layer


def test_a_file_that_cannot_be_mapped_is_read(tmp_path, reference, monkeypatch):
    import model.loading as loading

    model, tokenizer, expected = reference
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))

    def refuse(*args, **kwargs):
        raise OSError("mmap not supported")

    monkeypatch.setattr(loading.mmap, "mmap", refuse)
    again, tok = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert torch.equal(logits_of(again, tok), expected)


@pytest.mark.parametrize("flag,value", [("pre_seq_len", -1), ("rmsnorm", False), ("fp32_residual_connection", True),
                                        ("quantization_bit", 3), ("multi_query_group_num", 3)])
def test_unsupported_flags_are_named(flag, value):
    d = json.load(open(os.path.join(model_dir("chatglm2-tiny"), "config.json")))
    d[flag] = value
    with pytest.raises(UnsupportedConfigError, match=flag):
        ChatGLMConfig.from_dict(d).validate()


def test_unknown_keys_tolerated_and_family_inference(tmp_path, caplog):
    d = json.load(open(os.path.join(model_dir("chatglm3-tiny"), "config.json")))
    d["some_future_key"] = {"x": 1}
    assert ChatGLMConfig.from_dict(d).family == "chatglm3"
    d["_name_or_path"] = "THUDM/chatglm2-6b-32k"
    assert ChatGLMConfig.from_dict(d).family == "chatglm2"
    copy_meta(model_dir("chatglm2-tiny"), str(tmp_path))
    d["_name_or_path"] = "my-finetune"
    json.dump(d, open(tmp_path / "config.json", "w"))
    json.dump({"tokenizer_class": "ChatGLMTokenizer"}, open(tmp_path / "tokenizer_config.json", "w"))
    with caplog.at_level("WARNING"):
        config = ChatGLMConfig.from_checkpoint_dir(str(tmp_path))
    assert config.family == "chatglm2" and "assuming chatglm2" in caplog.text
    assert ChatGLMConfig.from_checkpoint_dir(str(tmp_path), family="chatglm3").family == "chatglm3"


def test_rope_ratio_semantics_per_family():
    d = json.load(open(os.path.join(model_dir("chatglm2-tiny"), "config.json")))
    pos = torch.tensor([[0, 1, 100, 5000]])
    theta = lambda base: 1.0 / base ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)  # kv_channels 16 -> 8 dims
    v2 = ChatGLMConfig.from_dict({**d, "rope_ratio": 16, "family": "chatglm2"})
    cos, sin = rotary_cos_sin(v2, pos, torch.float32)
    torch.testing.assert_close(cos[0, 0], torch.cos((pos[0, :, None] / 16) * theta(10000.0)))
    v3 = ChatGLMConfig.from_dict({**d, "rope_ratio": 50, "family": "chatglm3"})
    cos, sin = rotary_cos_sin(v3, pos, torch.float32)
    torch.testing.assert_close(sin[0, 0], torch.sin(pos[0, :, None].float() * theta(500000.0)))
    # a family without a row in config.NETWORK_TRAITS is an error, not another family's policy
    unknown = ChatGLMConfig.from_dict({**d, "rope_ratio": 16, "family": "chatglm4"})
    with pytest.raises(UnsupportedConfigError, match="chatglm4"):
        rotary_cos_sin(unknown, pos, torch.float32)
    from model.chatglm import model_class_for

    with pytest.raises(UnsupportedConfigError, match="chatglm4"):
        model_class_for(unknown)


@pytest.mark.slow
def test_transformers_auto_classes_without_remote_code():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = model_dir("chatglm3-tiny")
    config = AutoConfig.from_pretrained(path)
    assert type(config).__name__ == "ChatGLMConfig" and config.family == "chatglm3"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert type(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)) is type(model)
    ref, _ = loaded("chatglm3-tiny")  # on the CPU, as model (from_pretrained's default, as transformers')
    inputs = tokenizer(["你好"], return_tensors="pt")
    got = model.generate(**inputs.to(model.device), max_new_tokens=6).cpu()
    assert torch.equal(got, ref.generate(**inputs.to("cpu"), max_new_tokens=6))


def run_offline(code: str, cache: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_CACHE=cache, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2", PYTHONPATH=ROOT)
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_hub_id_unreachable_and_not_cached_says_what_to_do(tmp_path):
    r = run_offline("from model import load_model; load_model('THUDM/chatglm2-6b')", str(tmp_path))
    assert r.returncode != 0
    assert "ModelNotFoundError" in r.stderr and "--model" in r.stderr and "python -m model.tiny" in r.stderr


@pytest.mark.slow
def test_hub_id_unreachable_uses_the_local_cache(tmp_path):
    repo = tmp_path / "models--THUDM--chatglm3-6b"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(model_dir("chatglm3-tiny"), snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    code = ("from model import load_model; m, t = load_model('THUDM/chatglm3-6b', device='cpu', dtype='float32'); "
            "print(t.family, m.config.num_layers, repr(m.chat(t, 'hi', do_sample=False, max_new_tokens=3)[0]))")
    r = run_offline(code, str(tmp_path))
    assert r.returncode == 0, r.stderr
    ref, tok = loaded("chatglm3-tiny")  # the same files, loaded from their directory
    expected = ref.chat(tok, "hi", do_sample=False, max_new_tokens=3)[0]
    assert expected and r.stdout.split(maxsplit=2) == ["chatglm3", "2", repr(expected) + "\n"]


def test_not_a_path_nor_hub_id():
    with pytest.raises(ModelNotFoundError, match="not a checkpoint directory"):
        load_model("./does/not/exist")


@pytest.mark.slow
def test_tiny_checkpoint_writer(tmp_path):
    r = subprocess.run([sys.executable, "-m", "model.tiny", str(tmp_path / "t"), "--family", "chatglm2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RANDOM" in r.stdout
    model, tokenizer = load_model(str(tmp_path / "t"), device="cpu", dtype="float32")
    assert tokenizer.family == "chatglm2" and model.config.family == "chatglm2"
    text = "你好 hello world\n\tdef f(x): return 1"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_ids_to_tokens(list(range(3, 5))) == ["<0x00>", "<0x01>"]
    response, history = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=5)
    assert history == [("你好", response)]


@pytest.mark.slow
def test_tiny_checkpoint_writer_chatglm1(tmp_path, caplog):
    r = subprocess.run([sys.executable, "-m", "model.tiny", str(tmp_path / "t"), "--family", "chatglm1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "t")) == ["config.json", "ice_text.model", "model.safetensors",
                                                  "tokenizer_config.json"]
    with caplog.at_level("WARNING"):
        model, tokenizer = load_model(str(tmp_path / "t"), device="cpu", dtype="float32")
    assert "lm_head.weight differs" not in caplog.text  # the stored copy of the embedding, as ChatGLM-6B's
    assert tokenizer.family == "chatglm1" and model.config.family == "chatglm1"
    assert model.config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<eop>")
    text = "你好 hello world\n\tdef f(x):    return 1"
    ids = tokenizer.encode(text)
    assert ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id] and tokenizer.decode(ids[:-2]) == text
    response, history = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=5)
    assert response and history == [("你好", response)]
