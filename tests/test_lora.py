"""LoRA adapters in PEFT's format (issue 20): made here with the peft library on a float32 copy of our model,
saved with its save_pretrained, and loaded with load_model(base, adapter=DIR), which merges them into the weights.
The merged weights are PEFT's merge_and_unload() to the bit and the logits the PEFT model's (float32 rounding,
1e-5 of their size); on a quantized model it stays unmerged, beside the quantized linears;
--adapter loads the same model in every script; what the merge cannot reproduce is refused, naming the file."""

import datetime
import json
import os
import shutil

import pytest
import torch

from conftest import float_twin, golden_case, loaded, model_dir
from model import load_model
from model.flags import ModelLoadError, build_parser, load_from_args
from model.hub import CheckpointError

peft = pytest.importorskip("peft")

FAMILIES = ["chatglm1-tiny", "chatglm2-tiny", "chatglm3-tiny"]
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
TEXTS = ["Tell me about the sea and the mountains", "你好"]


def golden_prompt(tokenizer, name):
    """The golden case's first text, and a left-padded batch of two."""
    texts = [golden_case(name)["runs"]["float32"]["cases"][0]["text"]] + TEXTS
    return tokenizer(texts, padding=True, return_tensors="pt")


def logits(model, enc):
    with torch.inference_mode():
        return model(**enc).logits


def make_adapter(name, directory, safe_serialization=True, **settings):
    """A random (init_lora_weights=False) PEFT LoRA adapter on a fresh float32 copy of the model, saved to
    directory; returns the PEFT model's logits for the golden prompt and its merge_and_unload() parameters."""
    model, tokenizer = load_model(model_dir(name), device="cpu", dtype="float32")
    torch.manual_seed(len(directory))
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False,
                                **settings})
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random lora_B / 10: an update of a trained adapter's size; biases "trained"
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.mul_(0.1)
            elif param.requires_grad and param_name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(directory, safe_serialization=safe_serialization)
    expected = logits(peft_model.eval(), golden_prompt(tokenizer, name))
    return expected, dict(peft_model.merge_and_unload().named_parameters())


def assert_same_as_peft(model, tokenizer, name, expected):
    """The merged model is PEFT's merge_and_unload() to the bit, and its logits are the (unmerged) PEFT model's
    but for float32 rounding: the two sum x W^T + (x A^T) B^T * s and x (W + B A s)^T in another order, which
    at these logits (up to about 35 in the tiny models) moves them by up to 1e-5 of their size."""
    peft_logits, peft_merged = expected
    for param_name, param in model.named_parameters():
        assert torch.equal(param, peft_merged[param_name]), param_name
    got = logits(model, golden_prompt(tokenizer, name))
    torch.testing.assert_close(got, peft_logits, atol=1e-5 * float(peft_logits.abs().max()), rtol=0)
    return got


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> (adapter folder, (PEFT logits, PEFT merged parameters)), made once per family."""
    made = {}

    def get(name):
        if name not in made:
            directory = str(tmp_path_factory.mktemp("lora") / name)
            made[name] = directory, make_adapter(name, directory)
        return made[name]

    return get


def copy_adapter(source, target, config_changes=None, tensors=None):
    """A copy of an adapter folder with adapter_config.json entries changed and tensors(dict) -> dict applied."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if config_changes:
        with open(os.path.join(target, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config.update(config_changes)
        with open(os.path.join(target, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    if tensors:
        filename = os.path.join(target, "adapter_model.safetensors")
        save_file(tensors(load_file(filename)), filename)
    return str(target)


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_model_equals_the_peft_model(name, adapters):
    directory, expected = adapters(name)
    model, tokenizer = load_model(model_dir(name), adapter=directory, device="cpu", dtype="float32")
    got = assert_same_as_peft(model, tokenizer, name, expected)
    base, _ = loaded(name)
    assert (logits(base, golden_prompt(tokenizer, name)) - got).abs().max() > 1  # the adapter changes a lot
    # only the targeted weights changed
    merged = dict(model.named_parameters())
    for param_name, param in base.named_parameters():
        changed = not torch.equal(param, merged[param_name])
        assert changed == any(param_name.endswith(f".{t}.weight") for t in TARGETS), param_name


def test_rslora_rank_and_alpha_patterns_and_bin_file(tmp_path):
    name = "chatglm2-tiny"
    directory = str(tmp_path / "patterns")
    expected = make_adapter(name, directory, safe_serialization=False, use_rslora=True,
                            rank_pattern={"dense_h_to_4h": 2}, alpha_pattern={"query_key_value": 16})
    assert "adapter_model.bin" in os.listdir(directory)
    model, tokenizer = load_model(model_dir(name), adapter=directory, device="cpu", dtype="float32")
    assert_same_as_peft(model, tokenizer, name, expected)


@pytest.mark.parametrize("name,bias", [("chatglm1-tiny", "all"), ("chatglm2-tiny", "lora_only"),
                                       ("chatglm3-tiny", "all")])
def test_trained_biases_replace_the_base_models(name, bias, tmp_path):
    """bias lora_only: the adapted linears' biases are trained and saved (as <module>.base_layer.bias); all:
    every bias (ChatGLM-6B's LayerNorms' too, as <module>.bias)."""
    directory = str(tmp_path / bias)
    expected = make_adapter(name, directory, bias=bias)
    model, tokenizer = load_model(model_dir(name), adapter=directory, device="cpu", dtype="float32")
    assert_same_as_peft(model, tokenizer, name, expected)
    base = dict(loaded(name)[0].named_parameters())
    changed = {n for n, p in model.named_parameters() if n.endswith(".bias") and not torch.equal(p, base[n])}
    assert changed and any("layernorm" in n for n in changed) == (name == "chatglm1-tiny")


def test_settings_that_change_nothing_at_inference_are_accepted(tmp_path, adapters):
    """What PEFT saves about training (dropout, init, task) or run time (runtime_config, which some versions
    save) changes no merged weight."""
    name = "chatglm2-tiny"
    source, expected = adapters(name)
    directory = copy_adapter(source, tmp_path / "inert", {
        "lora_dropout": 0.1, "task_type": "CAUSAL_LM", "init_lora_weights": "gaussian", "inference_mode": False,
        "runtime_config": {"ephemeral_gpu_offload": False}, "use_dora": False, "modules_to_save": None})
    model, tokenizer = load_model(model_dir(name), adapter=directory, device="cpu", dtype="float32")
    assert_same_as_peft(model, tokenizer, name, expected)


def test_fan_in_fan_out_is_ignored_for_linears_as_peft_does(tmp_path, adapters):
    """PEFT turns fan_in_fan_out off for nn.Linear targets (ChatGLM has no others) and saves false; a config that
    says true anyway is loaded by PEFT as false, and merged here the same way."""
    name = "chatglm2-tiny"
    source, expected = adapters(name)
    directory = copy_adapter(source, tmp_path / "fifo", {"fan_in_fan_out": True})
    base, _ = load_model(model_dir(name), device="cpu", dtype="float32")
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        merged = peft.PeftModel.from_pretrained(base, directory).merge_and_unload()
    model, tokenizer = load_model(model_dir(name), adapter=directory, device="cpu", dtype="float32")
    assert_same_as_peft(model, tokenizer, name, expected)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), merged.parameters()))


def test_bfloat16_merges_in_float32(adapters):
    name = "chatglm2-tiny"
    directory, (_, peft_merged) = adapters(name)
    model, _ = load_model(model_dir(name), adapter=directory, device="cpu", dtype="bfloat16")
    for param_name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, peft_merged[param_name].to(torch.bfloat16))


@pytest.mark.parametrize("name,quantize", [("chatglm2-tiny", 8), ("chatglm2-tiny", 4), ("chatglm2-tiny-int4", None)])
def test_a_quantized_model_keeps_the_adapter_beside_its_linears(name, quantize, adapters):
    """On a quantized model (quantize=, or a checkpoint stored quantized) the adapter stays unmerged, as PEFT
    runs LoRA on a quantized base: merged and then quantized, a trained update would mostly round away. The
    quantized weights are the base model's, and the logits are PEFT's (unmerged LoRA) on a float twin holding
    the de-quantized weights, within float32 rounding: for a prompt batch (GEMMs over de-quantized blocks) and
    for single decoding steps (the native kernels)."""
    directory, _ = adapters("chatglm2-tiny")
    model, tokenizer = load_model(model_dir(name), adapter=directory, device="cpu", dtype="float32", quantize=quantize)
    base, _ = load_model(model_dir(name), device="cpu", dtype="float32", quantize=quantize)
    assert model.config.quantization_bit == (quantize or 4)
    base_params = dict(base.named_parameters())
    adapted = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(adapted) == 2 * len(TARGETS) * model.config.num_layers
    for param_name, param in model.named_parameters():
        if param_name not in adapted:
            assert torch.equal(param, base_params[param_name]), param_name
    reference = peft.PeftModel.from_pretrained(float_twin(base), directory).eval()
    batch = golden_prompt(tokenizer, "chatglm2-tiny")
    one = {k: v[:1, -6:] for k, v in tokenizer(TEXTS[:1], return_tensors="pt").items()}
    for enc in (batch, one):
        got, expected = logits(model, enc), logits(reference, enc)
        tolerance = 1e-5 * float(expected.abs().max())
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
        assert float((got - logits(base, enc)).abs().max()) > 100 * tolerance  # the adapter does change them
    with torch.inference_mode():  # decoding step by step on the cache gives the same greedy tokens as PEFT's
        ids = tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
        cache, out, want = None, ids, ids
        for _ in range(4):
            step = model(input_ids=out if cache is None else out[:, -1:], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            out = torch.cat([out, step.logits[:, -1:].argmax(-1)], 1)
            want = torch.cat([want, reference(input_ids=want).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, want)


def test_the_adapter_beside_a_bf16_quantized_model_stays_float32(adapters):
    """PEFT keeps an adapter on a half-precision base in float32, and finetune.py trains it so: the update is
    computed in float32 (x cast up, the result cast back), not rounded to bf16 first. The bf16 model's logits are
    the float32 model's within bf16 rounding."""
    directory, _ = adapters("chatglm2-tiny")
    model, tokenizer = load_model(model_dir("chatglm2-tiny-int4"), adapter=directory, device="cpu", dtype="bfloat16")
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    exact, _ = load_model(model_dir("chatglm2-tiny-int4"), adapter=directory, device="cpu", dtype="float32")
    enc = golden_prompt(tokenizer, "chatglm2-tiny")
    got, want = logits(model, enc).float(), logits(exact, enc)
    assert got.dtype == torch.float32 and float((got - want).abs().max()) < 0.03 * float(want.abs().max())


def test_quantizing_a_model_with_a_merged_adapter_warns(adapters, caplog):
    """model.quantize() after loading quantizes the merged weights, where a trained update mostly rounds away:
    it says so and names quantize= / --quantize, which keeps the adapter beside the layers."""
    directory, _ = adapters("chatglm2-tiny")
    model, _ = load_model(model_dir("chatglm2-tiny"), adapter=directory, device="cpu", dtype="float32")
    with caplog.at_level("WARNING"):
        model.quantize(4)
    assert f"the LoRA adapter {directory} was merged into the float weights" in caplog.text
    assert "--quantize 4" in caplog.text
    caplog.clear()
    plain, _ = load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="float32")
    with caplog.at_level("WARNING"):
        plain.quantize(4)
    assert "LoRA" not in caplog.text


def test_saving_a_quantized_model_with_its_adapter_beside_is_refused(tmp_path, adapters):
    """A checkpoint holds no LoRA beside quantized weights: saving one would drop the adapter on reload."""
    model, _ = load_model(model_dir("chatglm2-tiny-int4"), adapter=adapters("chatglm2-tiny")[0], device="cpu")
    with pytest.raises(ValueError, match=r"carries a LoRA adapter beside its quantized layers \(transformer"):
        model.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()


def test_the_flag_loads_the_same_model(adapters):
    name = "chatglm3-tiny"
    directory, expected = adapters(name)
    args = build_parser("test").parse_args(["--model", model_dir(name), "--adapter", directory, "--device", "cpu",
                                            "--dtype", "float32"])
    assert args.adapter == directory
    model, tokenizer = load_from_args(args)
    assert_same_as_peft(model, tokenizer, name, expected)
    assert build_parser("test").parse_args([]).adapter is None
    args = build_parser("test").parse_args(["--model", model_dir(name), "--adapter", "/nonexistent/adapter",
                                            "--device", "cpu"])
    with pytest.raises(ModelLoadError, match="LoRA adapter /nonexistent/adapter is not a directory"):
        load_from_args(args)


@pytest.mark.slow
def test_openai_api_serves_the_merged_model(adapters):
    import httpx

    from serving import ServerProcess

    name = "chatglm2-tiny"
    directory, _ = adapters(name)
    model, tokenizer = load_model(model_dir(name), adapter=directory, device="cpu", dtype="float32")
    expected = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=12)[0]
    base, base_tokenizer = loaded(name)
    assert expected != base.chat(base_tokenizer, "你好", do_sample=False, max_new_tokens=12)[0]  # the adapter shows
    with ServerProcess("openai_api.py", model_dir(name), "--adapter", directory) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected


def _renamed(old, new):
    return lambda tensors: {k.replace(old, new): v for k, v in tensors.items()}


def _qkv_b(shape):
    key = "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_B.weight"
    return lambda tensors: {**tensors, key: torch.zeros(shape)}


ERRORS = {
    "no_config": (None, None, r"has no adapter_config.json"),
    "no_weights": (None, None, r"has no adapter_model.safetensors or adapter_model.bin"),
    "other_peft_type": ({"peft_type": "IA3"}, None, r"adapter_config.json: peft_type is 'IA3'; only LoRA"),
    "dora": ({"use_dora": True}, None, r"adapter_config.json sets use_dora=True: not supported \(DoRA"),
    "modules_to_save": ({"modules_to_save": ["output_layer"]}, None, r"sets modules_to_save=\['output_layer'\]"),
    "bias": ({"bias": "some"}, None, r"adapter_config.json sets bias='some'; PEFT knows none, lora_only and all"),
    "bias_shape": ({"bias": "lora_only"}, lambda t: {**t, "base_model.model.transformer.encoder.layers.0."
                                                          "self_attention.dense.base_layer.bias": torch.zeros(64)},
                   r"self_attention.dense has a trained bias of shape \(64,\), but the base model's "
                   r"transformer.encoder.layers.0.self_attention.dense has no bias"),
    "unknown_option": ({"some_new_option": {"x": 1}}, None, r"sets some_new_option=.*not supported"),
    "no_module": (None, _renamed("layers.1.", "layers.7."),
                  r"adapter_model.safetensors: transformer.encoder.layers.7.mlp.dense_4h_to_h matches no linear"),
    "not_lora": (None, lambda t: {**t, "base_model.model.transformer.output_layer.weight": torch.zeros(2, 2)},
                 r"adapter_model.safetensors: tensor base_model.model.transformer.output_layer.weight is not a LoRA"),
    "half_pair": (None, lambda t: {k: v for k, v in t.items() if "layers.0.mlp.dense_4h_to_h.lora_B" not in k},
                  r"layers.0.mlp.dense_4h_to_h has no lora_B.weight"),
    "shape": (None, _qkv_b((96, 4)),
              r"query_key_value has lora_A \(4, 64\) and lora_B \(96, 4\), but the base model's .* is 64 -> 128"),
    "rank": ({"r": 8}, None,
             r"dense_4h_to_h has lora_A \(4, 128\) and lora_B \(64, 4\), not \(r, in\) and \(out, r\) with r=8"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_name_the_file(case, tmp_path, adapters):
    changes, tensors, message = ERRORS[case]
    directory = copy_adapter(adapters("chatglm2-tiny")[0], tmp_path / case, changes, tensors)
    if case == "no_config":
        os.remove(os.path.join(directory, "adapter_config.json"))
    if case == "no_weights":
        os.remove(os.path.join(directory, "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(model_dir("chatglm2-tiny"), adapter=directory, device="cpu", dtype="float32")
    assert directory in str(info.value)


def test_another_familys_adapter_is_refused(adapters):
    with pytest.raises(CheckpointError, match=r"transformer.layers.0.attention.dense matches no linear of this "
                                              r"chatglm2 model \(expected names like transformer.encoder.layers.0"):
        load_model(model_dir("chatglm2-tiny"), adapter=adapters("chatglm1-tiny")[0], device="cpu")


def test_a_bin_with_objects_is_refused(tmp_path, adapters):
    directory = copy_adapter(adapters("chatglm2-tiny")[0], tmp_path / "pickled")
    os.remove(os.path.join(directory, "adapter_model.safetensors"))
    torch.save({"base_model.model.x.lora_A.weight": datetime.date(2024, 1, 1)},
               os.path.join(directory, "adapter_model.bin"))
    with pytest.raises(CheckpointError, match=r"adapter_model.bin holds objects other than tensors, refused by "
                                              r"weights_only"):
        load_model(model_dir("chatglm2-tiny"), adapter=directory, device="cpu")
