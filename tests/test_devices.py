"""Device bugs caught without a GPU: mocked device properties, torch's meta device (which, like CUDA, refuses
tensors of another device) and a stand-in "other device" for tensors that must not mix."""

import pytest
import torch

from conftest import loaded, model_dir
from model.loading import pick_dtype


# ---- dtype="auto" on CUDA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_fp16_on_pre_ampere_gpus(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() counts emulation: True on a T4 / V100 / RTX 20xx
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert pick_dtype("auto", torch.device("cuda")) == expected
    assert pick_dtype(None, torch.device("cuda:1")) == expected


def test_auto_dtype_asks_about_the_gpu_it_loads_on(monkeypatch):
    capabilities = {0: (7, 5), 1: (8, 6)}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[device])
    monkeypatch.setattr(torch.version, "hip", None)
    assert pick_dtype("auto", torch.device("cuda:0")) == torch.float16
    assert pick_dtype("auto", torch.device("cuda:1")) == torch.bfloat16


# ---- the KV cache grows on demand -----------------------------------------------------------------------------
LONG_CONTEXT = 32768


def long_context(monkeypatch, model):
    """The model's context raised to LONG_CONTEXT for this test (a 32K / 128K checkpoint's config)."""
    field = "max_sequence_length" if model.config.family == "chatglm1" else "seq_length"
    monkeypatch.setattr(model.config, field, LONG_CONTEXT)


@pytest.fixture
def largest_cache(monkeypatch):
    """Records the largest capacity any KVCache reached."""
    from model.cache import KVCache

    seen = [0]
    reserve = KVCache.reserve

    def spy(self, new_tokens):
        reserve(self, new_tokens)
        seen[0] = max(seen[0], self.capacity)

    monkeypatch.setattr(KVCache, "reserve", spy)
    return seen


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny", "chatglm1-tiny"])
@pytest.mark.slow
def test_chat_reserves_what_the_turn_uses_not_the_whole_context(monkeypatch, largest_cache, name):
    # the reply's budget is the rest of the context: the cache must not be sized for it up front
    model, tokenizer = loaded(name)
    long_context(monkeypatch, model)
    stream = model.stream_chat(tokenizer, "你好", do_sample=False, return_past_key_values=True)
    for _, (_, _, cache) in zip(range(3), stream):
        assert cache.capacity <= 1024
    stream.close()
    assert 0 < largest_cache[0] <= 1024
    # chat() alike (it stops generating here after 40 tokens: only the first step's reservation matters)
    largest_cache[0] = 0
    model.chat(tokenizer, "你好", do_sample=False, logits_processor=[stop_after(40, tokenizer)])
    assert 0 < largest_cache[0] <= 1024


def stop_after(n, tokenizer):
    """A logits hook forcing a stop id once n tokens were generated."""
    stop = tokenizer.reply_stop_ids()[0]
    count = [0]

    def hook(ids, logits):
        count[0] += 1
        if count[0] > n:
            logits = torch.full_like(logits, -1e4)
            logits[:, stop] = 0
        return logits

    return hook


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm1-tiny"])
def test_generate_reserves_what_it_uses(monkeypatch, largest_cache, name):
    from model.generation import SamplingParams, generate_tokens

    model, tokenizer = loaded(name)
    long_context(monkeypatch, model)
    ids = torch.tensor([tokenizer.encode("你好")])
    steps = generate_tokens(model, ids, max_new_tokens=LONG_CONTEXT - ids.shape[1], params=SamplingParams())
    next(steps)
    steps.close()
    assert 0 < largest_cache[0] <= 1024


# ---- logits from an output layer on another device --------------------------------------------------------
class OnOtherDevice(torch.Tensor):
    """A tensor on "another GPU": an op mixing it with an ordinary (non-scalar) tensor raises, as CUDA does for
    cuda:1 with cuda:0; .to(a device) brings it over. (A CPU has no second device, and the meta device cannot
    be copied back from.)"""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = list(args) + list(kwargs.values())
        flat += [x for a in flat if isinstance(a, (list, tuple)) for x in a]
        if func in (torch.Tensor.to,) and any(isinstance(a, (torch.device, str)) for a in flat[1:]):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        if any(type(a) is torch.Tensor and a.dim() > 0 for a in flat):
            raise RuntimeError(f"Expected all tensors to be on the same device ({func.__name__})")
        if any(isinstance(a, torch.Generator) for a in flat):  # seeded generators live on the ids' device
            raise RuntimeError(f"Expected a generator of this tensor's device ({func.__name__})")
        return super().__torch_function__(func, types, args, kwargs)


@pytest.fixture
def output_on_other_device(monkeypatch):
    """Makes a loaded model's logits come back on "another GPU"."""
    def patch(model):
        forward = model.transformer.forward

        def split_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.logits = out.logits.as_subclass(OnOtherDevice)
            return out

        monkeypatch.setattr(model.transformer, "forward", split_forward)
    return patch


def test_the_stand_in_device_refuses_mixing():
    a = torch.ones(3).as_subclass(OnOtherDevice)
    with pytest.raises(RuntimeError, match="same device"):
        a + torch.ones(3)
    with pytest.raises(RuntimeError, match="generator"):
        torch.multinomial(a, 1, generator=torch.Generator())
    assert type(a.to("cpu")) is torch.Tensor and type(a.float() * 2) is OnOtherDevice


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny", "chatglm1-tiny"])
@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(do_sample=True, seed=7, repetition_penalty=1.2)])
@pytest.mark.slow
def test_generation_with_the_output_layer_on_another_device(output_on_other_device, name, sampling):
    model, tokenizer = loaded(name)
    ids = torch.tensor([tokenizer.encode("你好")] * 2)
    expected = model.generate(ids, max_new_tokens=8, **sampling)
    output_on_other_device(model)
    assert torch.equal(model.generate(ids, max_new_tokens=8, **sampling), expected)
    expected_chat = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=8)
    assert model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=8) == expected_chat


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm1-tiny"])
def test_engine_with_the_output_layer_on_another_device(output_on_other_device, name):
    from model.engine import Engine, GenerationRequest
    from model.generation import SamplingParams

    model, tokenizer = loaded(name)
    stops = tuple(tokenizer.reply_stop_ids())
    short, long = tokenizer.encode("你好"), tokenizer.encode("你好" * 20)
    requests = [GenerationRequest(short, SamplingParams(), 6, stops),
                GenerationRequest(long, SamplingParams(do_sample=True, seed=3), 6, stops)]

    def run():
        engine = Engine(model, tokenizer, max_queue=4, prefill_chunk=8)  # the long prompt is read in chunks
        try:
            handles = [engine.submit(r) for r in requests]
            events = [list(h) for h in handles]
        finally:
            engine.close()
        assert all(e[-1].error is None for e in events), [e[-1].error for e in events]
        return ["".join(x.text for x in e) for e in events]

    expected = run()
    output_on_other_device(model)
    assert run() == expected


# ---- from_pretrained: device_map, the CPU by default, quantizing on the target device ---------------------------
def model_class(name):
    from model.chatglm import model_class_for
    from model.config import ChatGLMConfig

    return model_class_for(ChatGLMConfig.from_checkpoint_dir(model_dir(name)))


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm1-tiny"])
def test_from_pretrained_follows_a_device_map(name):
    from model.placement import layer_module

    reference, tokenizer = loaded(name)
    device_map = {m: "cpu" for m in ("transformer.embedding", "transformer.encoder.final_layernorm",
                                     "transformer.output_layer", "transformer.word_embeddings",
                                     "transformer.final_layernorm")}
    device_map.update({layer_module(reference.config, i): "cpu" for i in range(reference.config.num_layers)})
    device_map = {k: v for k, v in device_map.items() if k in dict(reference.named_modules())}
    model = model_class(name).from_pretrained(model_dir(name), device_map=device_map, dtype=torch.float32)
    assert hasattr(model.get_submodule(layer_module(model.config, 1)), "_hf_hook")  # dispatched as the map says
    ids = torch.tensor([tokenizer.encode("你好")])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("strategy", ["auto", "balanced", "sequential"])
def test_from_pretrained_device_map_strategies(monkeypatch, strategy):
    import model.placement

    cls = model_class("chatglm2-tiny")
    # no GPU: the best device there is (the CPU here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded_model = cls.from_pretrained(model_dir("chatglm2-tiny"), device_map=strategy, dtype=torch.float32)
    assert {p.device.type for p in loaded_model.parameters()} == {"cpu"}
    # two GPUs (each standing in for by the CPU): the layers spread over them, embedding on the first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    placed = []
    real = model.placement.as_torch_device  # what loading reads device maps with
    monkeypatch.setattr(model.placement, "as_torch_device",
                        lambda d: placed.append(d) or (torch.device("cpu") if isinstance(d, int) else real(d)))
    split = cls.from_pretrained(model_dir("chatglm2-tiny"), device_map=strategy, dtype=torch.float32)
    assert set(placed) == {0, 1} and hasattr(split.transformer.encoder.layers[1], "_hf_hook")


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm1-tiny"])
def test_from_pretrained_loads_on_the_cpu_even_with_a_gpu(monkeypatch, name):
    # AutoModel.from_pretrained(id).quantize(4).cuda(): the float model must not go to the (6 GB) GPU first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = model_class(name).from_pretrained(model_dir(name), dtype=torch.float32)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    from model import load_model

    reference, tokenizer = load_model(model_dir(name), device="cpu", dtype="float32", quantize=4)
    ids = torch.tensor([tokenizer.encode("你好")])
    torch.testing.assert_close(model.quantize(4)(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm1-tiny"])
def test_quantize_while_loading_runs_on_the_target_device(monkeypatch, name):
    import model.quantization
    from model import load_model

    devices = []
    real = model.quantization.quantize_weight
    monkeypatch.setattr(model.quantization, "quantize_weight", lambda w, bits: devices.append(w.device) or real(w, bits))
    meta, _ = load_model(model_dir(name), device="meta", dtype="float16", quantize=4)
    assert devices and set(devices) == {torch.device("meta")}  # not the CPU, then copied
    assert {p.device.type for p in meta.parameters()} == {"meta"}
