"""Training (issue 20 §3): the model's training conventions (labels -> shifted cross-entropy, gradient
checkpointing, prepare_inputs_for_generation, peft, the transformers Trainer), finetune.py's data handling and
errors, and, marked slow, LoRA / P-Tuning v2 runs on a tiny golden model of each family that learn a fixed answer
and keep it after saving and reloading (load_model, cli_demo.py and openai_api.py with the scripts' flags)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import finetune
from conftest import float_twin, loaded, model_dir
from model import load_model
from model.devices import FORCE_ENV
from model.formats import DEFAULT_TOOL_PROMPT, format_for

QUESTION = "What is the code word?"
ANSWER = "Blue sky"


def fresh(name: str = "chatglm3-tiny", dtype: str = "float32"):
    """A model of its own (the tests change its parameters' requires_grad and mode)."""
    model, tokenizer = load_model(model_dir(name), device="cpu", dtype=dtype)
    model.requires_grad_(True)
    model.train()
    return model, tokenizer


def sample_batch(tokenizer, texts=("hello world, how are you", "1 + 1 = 2")):
    examples = [finetune.Example(tokenizer.encode(t), tokenizer.encode(t)) for t in texts]
    for e in examples:  # the first three positions do not count
        e.labels[:3] = [-100] * 3
    return finetune.collate(examples, tokenizer.pad_token_id)


# ---- the model's training conventions ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny", "chatglm1-tiny"])
def test_loss_is_the_shifted_cross_entropy_over_counted_tokens(name):
    model, tokenizer = loaded(name)
    ids, labels = sample_batch(tokenizer)
    with torch.no_grad():
        out = model(ids, labels=labels)
        logits = model(ids).logits.double()
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):  # position t predicts the label at t + 1
            if labels[b, t + 1] != -100:
                total -= float(logits[b, t].log_softmax(-1)[labels[b, t + 1]])
                count += 1
    assert count == int((labels[:, 1:] != -100).sum()) > 0
    assert out.loss.dtype == torch.float32
    assert abs(float(out.loss) - total / count) < 1e-5
    assert out[0] is out.loss and out["loss"] is out.loss and out[1] is out.logits  # transformers' tuple order
    assert out.past_key_values is None  # no cache for a pass with labels


def test_loss_of_bf16_logits_is_computed_in_float32():
    model, tokenizer = loaded("chatglm2-tiny", "bfloat16")
    ids, labels = sample_batch(tokenizer)
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    expected = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny", "chatglm1-tiny"])
def test_backward_gives_finite_gradients_to_every_parameter(name, dtype):
    model, tokenizer = fresh(name, dtype)
    ids, labels = sample_batch(tokenizer)
    out = model(ids, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def grads_of(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,prefix", [("chatglm3-tiny", False), ("chatglm3-tiny", True),
                                         ("chatglm1-tiny", False), ("chatglm1-tiny", True)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name, prefix):
    model, tokenizer = fresh(name)
    if prefix:
        model.add_prefix_encoder(4)
    ids, labels = sample_batch(tokenizer)
    loss, grads = grads_of(model, ids, labels)
    model.gradient_checkpointing_enable()
    layers = model.transformer.encoder if name != "chatglm1-tiny" else model.transformer
    assert layers.gradient_checkpointing
    calls = []
    checkpoint = layers._gradient_checkpointing_func
    layers._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    loss2, grads2 = grads_of(model, ids, labels)
    assert len(calls) == model.config.num_layers  # every block went through the checkpoint
    assert set(grads2) == set(grads) and (not prefix or any("prefix_encoder" in n for n in grads))
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=0)
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():  # inference keeps its cache with checkpointing on
        model.eval()
        assert model(ids).past_key_values is not None


@pytest.mark.parametrize("name", ["chatglm2-tiny-int4", "chatglm2-tiny-int8", "chatglm1-tiny-int4"])
@pytest.mark.parametrize("path", ["native", "torch", "cuda", "mps"])
def test_a_prefix_trains_through_quantized_layers(monkeypatch, name, path):
    """P-Tuning v2 on an int4 / int8 model (the original's --quantization_bit): the prefix's gradient equals the
    one of the same network with the de-quantized weights in float linears (the quantized forward differs only by
    the kernels' rounding), through the native kernels, torch's products and the GPU branches, the backward
    de-quantizing each weight in several blocks; a trained bias gets its gradient; the frozen quantized weights
    get none and do not change; their scales refuse to train."""
    from model import kernels, quantization
    from model.quantization import QuantizedLinear

    monkeypatch.setattr(quantization, "BACKWARD_BLOCK_BYTES", 4096)  # several blocks per layer's backward
    if path == "torch":  # torch's products (as on ARM): their graph was the one to fail (a buffer reused in place)
        monkeypatch.setattr(kernels, "library", lambda: None)
    elif path in ("cuda", "mps"):  # the GPU branches, run on the CPU
        monkeypatch.setenv(FORCE_ENV, path)
    model, tokenizer = load_model(model_dir(name), device="cpu", dtype="float32")
    model.requires_grad_(False)
    torch.manual_seed(0)
    model.add_prefix_encoder(4, False).requires_grad_(True)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    trained_bias = next(m for m in layers if m.bias is not None)
    trained_bias.bias.requires_grad_(True)
    before = [m.weight.clone() for m in layers]
    twin = float_twin(model)
    twin_bias = next(m for m in twin.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
                     and m.bias.requires_grad)
    ids, labels = sample_batch(tokenizer)
    model.train(), twin.train()
    model(ids, labels=labels).loss.backward()
    twin(ids, labels=labels).loss.backward()
    ours, theirs = model.transformer.prefix_encoder.embedding.weight.grad, twin.transformer.prefix_encoder.embedding.weight.grad
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item())
    torch.testing.assert_close(trained_bias.bias.grad, twin_bias.bias.grad, rtol=1e-3,
                               atol=1e-3 * twin_bias.bias.grad.abs().max().item())
    assert all(m.weight.grad is None and m.weight_scale.grad is None for m in layers)
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, before))
    layers[0].weight_scale.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        model(ids, labels=labels)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_layers_input_gradient_is_grad_y_times_its_weight(monkeypatch, bits, dtype):
    """The backward's grad_x = grad_y (q * scale), in one block or several (summed in float32), for 3-D inputs;
    in bf16 on the CUDA branch the weight is stored in torch's repacked int4 layout and read back for it."""
    from model import quantization
    from model.quantization import QuantizedLinear, dequantize_weight

    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(256, 96, dtype=dtype), bits)
    x = torch.randn(2, 3, 256, dtype=dtype)
    grad_y = torch.randn(2, 3, 96, dtype=dtype)
    exact = grad_y.double() @ dequantize_weight(layer.stored_weight(), layer.weight_scale, bits, torch.float64)
    if dtype == torch.bfloat16 and bits == 4:
        monkeypatch.setenv(FORCE_ENV, "cuda")
    for block in (64 << 20, 2048):  # 96 rows in one block, or 4 rows (4 x 256 x 2 bytes) a block
        monkeypatch.setattr(quantization, "BACKWARD_BLOCK_BYTES", block)
        xg = x.clone().requires_grad_(True)
        layer(xg).backward(grad_y)
        assert xg.grad.dtype == dtype and xg.grad.shape == x.shape
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(xg.grad.double(), exact, rtol=tolerance, atol=tolerance * exact.abs().max().item())
    if dtype == torch.bfloat16 and bits == 4:
        assert layer._tinygemm  # the forward took the repacked product, the backward its stored bytes


def test_prefix_in_a_training_pass_equals_the_prefix_in_the_cache():
    """The training path concatenates the prefix in each layer (StaticPrefix); inference reads it from the
    KV cache: the same logits, and the prefix encoder gets gradients."""
    model, tokenizer = loaded("chatglm2-tiny-ptuning-p4")
    ids, _ = sample_batch(tokenizer)
    with torch.no_grad():
        cached = model(ids).logits
    train_model, _ = fresh("chatglm2-tiny")
    train_model.add_prefix_encoder(4)
    train_model.transformer.prefix_encoder.load_state_dict(model.transformer.prefix_encoder.state_dict())
    out = train_model(ids, use_cache=False)
    assert out.logits.requires_grad and out.past_key_values is None
    torch.testing.assert_close(out.logits.detach(), cached, atol=1e-5, rtol=0)
    out.logits.sum().backward()
    assert float(train_model.transformer.prefix_encoder.embedding.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny", "chatglm2-tiny-ptuning-p4", "chatglm1-tiny"])
def test_prepare_inputs_for_generation_drives_a_greedy_loop(name):
    model, tokenizer = loaded(name)
    ids = torch.tensor([tokenizer.encode("hello world")])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[])
    seq, past = ids, None
    with torch.no_grad():
        for _ in range(6):
            inputs = model.prepare_inputs_for_generation(seq, past_key_values=past)
            out = model(**inputs)
            past = out.past_key_values
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert seq.tolist() == expected.tolist()
    assert not type(model).can_generate()  # generate() is our own: transformers attaches nothing


def test_lora_through_peft_starts_equal_and_trains_only_the_adapters():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = fresh("chatglm3-tiny")
    ids, labels = sample_batch(tokenizer)
    with torch.no_grad():
        base = model(ids).logits
    model.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=finetune.LORA_TARGETS))
    adapted = {n for n, _ in peft_model.named_modules() if n.endswith(("query_key_value", "dense",
                                                                          "dense_h_to_4h", "dense_4h_to_h"))}
    assert len(adapted) == 4 * model.config.num_layers
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, base, atol=0, rtol=0)  # B starts at zero
    peft_model.train()
    peft_model(input_ids=ids, labels=labels).loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert trained == {n for n, p in peft_model.named_parameters() if p.requires_grad}


def test_transformers_trainer_runs_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, tokenizer = fresh("chatglm2-tiny")
    example = finetune.tokenize(tokenizer, finetune.messages_of({"prompt": QUESTION, "response": ANSWER}))
    rows = [{"input_ids": example.input_ids, "labels": example.labels}] * 4

    def collate(batch):
        ids, labels = finetune.collate([finetune.Example(r["input_ids"], r["labels"]) for r in batch],
                                       tokenizer.pad_token_id)
        return {"input_ids": ids, "labels": labels}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 3 and len(losses) == 3 and all(map(lambda x: x == x, losses))
    assert losses[-1] < losses[0]


# ---- finetune.py: the data ----------------------------------------------------------------------------------
def test_chatglm3_conversation_labels_every_reply_and_its_ending():
    _, tokenizer = loaded("chatglm3-tiny")
    record = {"conversations": [
        {"role": "system", "content": "Be brief.", "tools": [{"name": "f", "parameters": {}}]},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "tool?"}, {"role": "assistant", "metadata": "f", "content": "call"},
        {"role": "observation", "content": "42"}, {"role": "assistant", "content": "It is 42"}]}
    messages = finetune.messages_of(record)
    example = finetune.tokenize(tokenizer, messages)
    fmt = format_for("chatglm3")
    last_context = fmt.prompt_ids(tokenizer, messages[:-1])
    final = tokenizer.build_single_message("assistant", "", "It is 42")[1:]
    assert example.input_ids == last_context + final + [tokenizer.eos_token_id]  # one sequence for all turns
    counted = [t for t in example.labels if t != -100]
    first = tokenizer.build_single_message("assistant", "", "hello")[1:]
    call = tokenizer.build_single_message("assistant", "f", "call")[1:]
    user, observation = tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")
    assert counted == first + [user] + call + [observation] + final + [tokenizer.eos_token_id]
    for i, label in enumerate(example.labels):
        assert label in (-100, example.input_ids[i])


def test_chatglm2_prompt_response_trains_the_response_as_the_original():
    _, tokenizer = loaded("chatglm2-tiny")
    record = {"prompt": "q2", "response": "a2", "history": [["q1", "a1"]]}
    example = finetune.tokenize(tokenizer, finetune.messages_of(record))
    # the original ptuning main.py: encode(build_prompt(query, history)) + encode(answer) + [eos]
    context = tokenizer.encode(tokenizer.build_prompt("q2", [("q1", "a1")]))
    answer = tokenizer.encode("a2", add_special_tokens=False)
    assert example.input_ids == context + answer + [tokenizer.eos_token_id]
    assert example.labels == [-100] * len(context) + answer + [tokenizer.eos_token_id]


def test_top_level_tools_are_offered_by_a_system_message_as_the_original_examples():
    _, tokenizer = loaded("chatglm3-tiny")
    tools = [{"name": "get_weather", "parameters": {"city": "str"}}]
    conversation = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "sunny"}]
    with_top = finetune.tokenize(tokenizer, finetune.messages_of({"tools": tools, "conversations": conversation}))
    system = {"role": "system", "content": DEFAULT_TOOL_PROMPT, "tools": tools}
    explicit = finetune.tokenize(tokenizer, finetune.messages_of({"conversations": [system] + conversation}))
    assert with_top == explicit


def test_a_reply_marked_loss_false_is_context_only():
    _, tokenizer = loaded("chatglm3-tiny")
    record = {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": False},
                                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    example = finetune.tokenize(tokenizer, finetune.messages_of(record))
    counted = [t for t in example.labels if t != -100]
    assert counted == tokenizer.build_single_message("assistant", "", "d")[1:] + [tokenizer.eos_token_id]


BAD_LINES = [
    ('{"conversations": [', r"train.jsonl:2: not valid JSON"),
    ('[1, 2]', r"train.jsonl:2: expected a JSON object"),
    ('{"conversations": [{"role": "robot", "content": "x"}]}', r"train.jsonl:2: message 1: unknown role 'robot'"),
    ('{"conversations": [{"role": "user"}]}', r'train.jsonl:2: message 1: missing "content"'),
    ('{"conversations": [{"content": "x"}]}', r'train.jsonl:2: message 1: missing "role"'),
    ('{"prompt": "x"}', r'train.jsonl:2: .*missing "response"'),
    ('{"conversations": [{"role": "user", "content": "x"}]}', r"train.jsonl:2: no assistant message"),
    ('{"conversations": [{"role": "assistant", "content": "x"}]}', r"train.jsonl:2: message 1: .*user"),
    (json.dumps({"prompt": "long " * 400, "response": "x"}), r"train.jsonl:2: the conversation is \d+ tokens, "
                                                              r"longer than --max-length 64"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_data_is_one_line_naming_the_file_and_line_and_exit_status_2(tmp_path, capsys, line, message):
    import re

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": QUESTION, "response": ANSWER}) + "\n" + line + "\n", encoding="utf-8")
    status = finetune.main(["--model", model_dir("chatglm2-tiny"), "--data", str(data), "--method", "lora",
                            "--output", str(tmp_path / "out"), "--max-length", "64", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert re.search(message, err), err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "out")


def test_missing_data_file_is_an_error(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert finetune.main(["--model", model_dir("chatglm2-tiny"), "--data", str(tmp_path / "none.jsonl"),
                          "--method", "lora", "--output", out, "--quiet"]) == 2
    assert "none.jsonl: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["chatglm2-tiny-int4", "chatglm2-tiny-int8", "chatglm1-tiny-int4"])
def test_lora_on_a_quantized_model_gets_the_gradients_of_peft_on_its_float_twin(name):
    """LoRA on a quantized base (QLoRA): finetune.py puts A and B beside each quantized target linear; their
    gradients equal those of peft's LoRA with the same A and B on a float twin holding the de-quantized weights
    (the quantized forward differs only by float rounding), and only A and B train."""
    import argparse

    from peft import LoraConfig, get_peft_model

    model, _ = load_model(model_dir(name), device="cpu", dtype="float32")
    twin = float_twin(model)
    args = argparse.Namespace(method="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                              gradient_checkpointing=False)
    torch.manual_seed(0)
    model = finetune.prepare(model, args)
    targets = finetune.quantized_targets(model)
    assert len(targets) == 4 * model.config.num_layers
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for layer in targets.values():
            layer.lora_B.normal_(0, 0.05)
    peft_model = get_peft_model(twin, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=finetune.LORA_TARGETS))
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for module, layer in targets.items():
            for part in ("A", "B"):
                peft_params[f"base_model.model.{module}.lora_{part}.default.weight"].copy_(getattr(layer, f"lora_{part}"))
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = [m(input_ids=ids, labels=ids, use_cache=False).loss for m in (model, peft_model)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{m}.lora_{part}" for m in targets for part in ("A", "B")}
    for module, layer in targets.items():
        for part in ("A", "B"):
            got = getattr(layer, f"lora_{part}").grad
            want = peft_params[f"base_model.model.{module}.lora_{part}.default.weight"].grad
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_lora_beside_a_quantized_layer_drops_out_in_training_only():
    """The LoRA input's dropout (lora_dropout) applies in training mode, as peft's; in eval mode the layer gives
    its product plus the whole update, the same at every call."""
    from model.quantization import QuantizedLinear

    g = torch.Generator().manual_seed(3)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), 4)
    a, b = torch.randn(4, 64, generator=g), torch.randn(32, 4, generator=g)
    layer.add_lora(a.clone(), b.clone(), 2.0, trainable=True, dropout=0.5)
    x = torch.randn(3, 64, generator=g)
    layer.eval()
    first = layer(x)
    assert torch.equal(first, layer(x))
    torch.testing.assert_close(first, layer._product(x) + x @ a.T @ b.T * 2.0)
    with torch.no_grad():  # the inference form (B^T * scaling kept, added in place), after B changes too
        torch.testing.assert_close(layer(x), first)
        layer.lora_B.mul_(3)
        torch.testing.assert_close(layer(x), layer._product(x) + x @ a.T @ b.T * 6.0)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


# ---- finetune.py end to end -----------------------------------------------------------------------------------
def toy_data(path, family: str, n: int = 16) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            if family == "chatglm3":
                record = {"conversations": [{"role": "user", "content": QUESTION},
                                            {"role": "assistant", "content": ANSWER}]}
            else:
                record = {"prompt": QUESTION, "response": ANSWER}
            f.write(json.dumps(record) + "\n")
    return str(path)


def greedy_answer(model, tokenizer) -> str:
    return model.chat(tokenizer, QUESTION, do_sample=False, max_new_tokens=16)[0]


def cli_demo_answer(base: str, *flags: str, env=None) -> str:
    """cli_demo.py's greedy reply to QUESTION (driven through a pseudo-terminal as in test_cli_demo.py)."""
    import pexpect

    from test_cli_demo import ask, spawn

    child = spawn(base, *flags, env=env)
    try:
        return ask(child, QUESTION)
    finally:
        child.sendline("stop")
        child.expect(pexpect.EOF)
        child.close()


@pytest.mark.slow
@pytest.mark.parametrize("method,name,extra", [
    ("lora", "chatglm3-tiny", ["--lr", "5e-3", "--lora-dropout", "0"]),
    ("ptuning", "chatglm3-tiny", ["--lr", "5e-1", "--pre-seq-len", "8"]),
    ("ptuning", "chatglm2-tiny", ["--lr", "5e-1", "--pre-seq-len", "8", "--dtype", "bfloat16"]),
    ("ptuning", "chatglm2-tiny-int4", ["--lr", "5e-1", "--pre-seq-len", "8"]),  # through the int4 layers
    ("lora", "chatglm1-tiny", ["--lr", "5e-3", "--lora-dropout", "0"]),
    ("lora", "chatglm2-tiny-int4", ["--lr", "5e-3", "--lora-dropout", "0"]),  # beside the int4 layers (QLoRA)
    # ChatGLM-6B's residual (LN(x) * sqrt(56)) outweighs the attention the prefix steers: a larger step
    ("ptuning", "chatglm1-tiny", ["--lr", "1", "--pre-seq-len", "8"]),
])
def test_finetune_teaches_an_answer_that_survives_saving_and_reloading(tmp_path, capsys, method, name, extra):
    base = model_dir(name)
    model, tokenizer = loaded(name)
    assert greedy_answer(model, tokenizer) != ANSWER
    family = tokenizer.family
    data = toy_data(tmp_path / "train.jsonl", family)
    out = str(tmp_path / "out")
    status = finetune.main(["--model", base, "--data", data, "--eval", data, "--method", method, "--output", out,
                            "--max-steps", "40", "--batch-size", "4", "--quiet", *extra])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "eval loss" in err and "tokens/s" in err
    if method == "lora":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
        # merged while loading (beside the layers of the int4 model)
        reloaded, tok = load_model(base, adapter=out, device="cpu", dtype="float32")
    else:
        import torch as _torch

        state = _torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
        assert set(state) == {"transformer.prefix_encoder.embedding.weight"}
        assert json.load(open(os.path.join(out, "ptuning.json")))["pre_seq_len"] == 8
        reloaded, tok = load_model(base, ptuning=out, device="cpu", dtype="float32")
    assert greedy_answer(reloaded, tok) == ANSWER
    if method == "lora" and name.endswith("int4"):  # peft reads the QLoRA folder: its LoRA on the float twin
        from peft import PeftModel

        reference = PeftModel.from_pretrained(float_twin(model), out).eval()
        enc = tok([QUESTION], return_tensors="pt")
        with torch.no_grad():
            want, got = reference(**enc).logits, reloaded(**enc).logits
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    # cli_demo.py reloads it with the scripts' flags (one case through the original demos' environment variables)
    flags, env = ["--adapter", out] if method == "lora" else ["--ptuning-checkpoint", out, "--pre-seq-len", "8"], None
    if method == "ptuning" and name == "chatglm2-tiny":
        flags, env = [], dict(os.environ, HF_HUB_OFFLINE="1", CHECKPOINT_PATH=out, PRE_SEQ_LEN="8")
    assert cli_demo_answer(base, *flags, env=env) == ANSWER
    if family == "chatglm3":  # a front end with the scripts' flag serves the answer too
        import httpx

        from serving import ServerProcess

        flag = "--adapter" if method == "lora" else "--ptuning-checkpoint"
        with ServerProcess("openai_api.py", base, flag, out) as server:
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 16})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ANSWER
