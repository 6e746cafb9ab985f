"""The shared generation engine: same text as the model alone, cancellation, a bounded queue, penalties."""

import threading
import time

import pytest
import torch

from conftest import loaded
from serving import StepGate
from model.engine import Engine, EngineBusy, GenerationRequest
from model.generation import SamplingParams, SequenceSampler, generate_tokens

GREEDY = SamplingParams()


def prompt(tokenizer, text="你好"):
    if tokenizer.family == "chatglm3":
        return tokenizer.build_chat_ids(text)
    return tokenizer.encode(tokenizer.build_prompt(text))


def alone(model, tokenizer, ids, n):
    """Text the model's own stream_ids gives (no engine)."""
    out = "".join(d for d, _ in model.stream_ids(tokenizer, ids, params=GREEDY, max_new_tokens=n,
                                                  stop_ids=tokenizer.reply_stop_ids()))
    return out


def req(tokenizer, ids, n, **kwargs):
    return GenerationRequest(ids, GREEDY, n, tuple(tokenizer.reply_stop_ids()), **kwargs)


def collect(handle):
    events = list(handle)
    return "".join(e.text for e in events), events[-1]


@pytest.fixture(params=["chatglm2-tiny", "chatglm3-tiny"])
def engine(request):
    model, tokenizer = loaded(request.param)
    eng = Engine(model, tokenizer, max_queue=4)
    yield eng
    eng.close()


def test_engine_text_equals_the_model_alone(engine):
    ids = prompt(engine.tokenizer)
    text, last = collect(engine.submit(req(engine.tokenizer, ids, 24)))
    assert text == alone(engine.model, engine.tokenizer, ids, 24)
    assert last.finish in ("stop", "length") and 1 <= last.completion_tokens <= 24
    if last.finish == "length":
        assert last.completion_tokens == 24


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_text(engine):
    texts = ["你好", "hello there", "1 + 1 = ?", "天气"]
    expected = [alone(engine.model, engine.tokenizer, prompt(engine.tokenizer, t), 16) for t in texts]
    results = [None] * len(texts)

    def worker(i):
        handle = engine.submit(req(engine.tokenizer, prompt(engine.tokenizer, texts[i]), 16))
        results[i] = collect(handle)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_cancel_stops_generation_and_frees_the_engine(engine):
    handle = engine.submit(GenerationRequest(prompt(engine.tokenizer), GREEDY, 200))
    first = next(iter(handle))
    handle.cancel()
    events = [first] + list(handle) if first.finish is None else [first]
    assert events[-1].finish == "cancelled" and events[-1].completion_tokens < 200
    deadline = time.monotonic() + 5
    while engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.running == 0 and engine.stats.queued == 0
    ids = prompt(engine.tokenizer)
    assert collect(engine.submit(req(engine.tokenizer, ids, 8)))[0] == alone(engine.model, engine.tokenizer,
                                                                                ids, 8)


def test_full_queue_is_refused_not_piled_up(engine):
    ids = prompt(engine.tokenizer)
    gate = threading.Event()
    # hold the worker inside the first request until the queue has been tested
    hold = engine.model.transformer.register_forward_pre_hook(lambda module, args: gate.wait(10) and None)
    try:
        running = engine.submit(GenerationRequest(ids, GREEDY, 2))
        deadline = time.monotonic() + 5
        while engine.stats.queued and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = [engine.submit(GenerationRequest(ids, GREEDY, 2)) for _ in range(engine.max_queue)]
        with pytest.raises(EngineBusy):
            engine.submit(GenerationRequest(ids, GREEDY, 2))
    finally:
        gate.set()
        hold.remove()
    assert all(collect(h)[1].finish in ("stop", "length") for h in [running] + waiting)
    assert engine.stats.queued == 0


@pytest.mark.parametrize("bad, message", [
    (dict(input_ids=[]), "empty"),
    (dict(max_new_tokens=0), "at least 1"),
    (dict(input_ids=[5] * 300), "context"),
    (dict(params=SamplingParams(do_sample=True, top_p=0)), "top_p"),
])
def test_bad_requests_are_refused_at_submit(engine, bad, message):
    fields = dict(input_ids=prompt(engine.tokenizer), params=GREEDY, max_new_tokens=4) | bad
    with pytest.raises(ValueError, match=message):
        engine.submit(GenerationRequest(**fields))
    assert engine.stats.queued == 0


@pytest.mark.slow
def test_presence_penalty_keeps_generated_ids_distinct(engine):
    ids = prompt(engine.tokenizer)
    model, tokenizer = engine.model, engine.tokenizer
    plain = [int(t) for t in generate_tokens(model, torch.tensor([ids]), max_new_tokens=40, params=GREEDY)]
    assert len(set(plain)) < len(plain)  # the random tiny model repeats itself when greedy
    present = SamplingParams(presence_penalty=1e4)
    penalised = [int(t) for t in generate_tokens(model, torch.tensor([ids]), max_new_tokens=40, params=present)]
    assert len(set(penalised)) == len(penalised)
    text, _ = collect(engine.submit(GenerationRequest(ids, present, 40)))
    expected = "".join(d for d, _ in model.stream_ids(tokenizer, ids, params=present, max_new_tokens=40, stop_ids=()))
    assert text == expected and text != alone(model, tokenizer, ids, 40)


def test_frequency_penalty_counts_only_generated_ids():
    sampler = SequenceSampler(SamplingParams(presence_penalty=0.5, frequency_penalty=1.0), torch.tensor([[3, 3, 5]]))
    for token in (5, 5, 3, 1):  # generated after a prompt of 3, 3, 5
        sampler.record(torch.tensor([token]), 8)
    out = sampler.process(torch.zeros(1, 8))
    assert out.tolist() == [[0, -1.5, 0, -1.5, 0, -2.5, 0, 0]]


class BatchSizes:
    """Records the batch size of every forward pass (a pre-hook on the transformer)."""

    def __init__(self, model):
        self.sizes, self.shapes = [], []
        self._hook = model.transformer.register_forward_pre_hook(
            lambda module, args: (self.sizes.append(args[0].shape[0]), self.shapes.append(tuple(args[0].shape)))
            and None)

    def remove(self):
        self._hook.remove()


def alone_events(model, tokenizer, request):
    """Text and finish reason of one request run by itself through generate_tokens (no engine)."""
    pieces = list(model.stream_ids(tokenizer, request.input_ids, params=request.params,
                                   max_new_tokens=request.max_new_tokens, stop_ids=request.stop_ids))
    return "".join(d for d, _ in pieces), pieces[-1][1]


def run_staggered(engine, requests, waves):
    """Submit requests in waves; each wave goes in once the previous wave's requests have their first token.

    The worker is held before every forward pass and let through one pass at a time, so which requests share a
    step is decided here, not by how fast threads happen to run.
    """
    handles, results = {}, {}

    def consume(i):
        events = list(handles[i])
        results[i] = ("".join(e.text for e in events), events[-1].finish)

    threads = []
    gate = StepGate(engine.model)
    try:
        for wave in waves:
            for i in wave:
                handles[i] = engine.submit(requests[i])
                threads.append(threading.Thread(target=consume, args=(i,)))
                threads[-1].start()
            while any(handles[i].first_token_at is None for i in wave):
                gate.step(idle=lambda: all(h.done for h in handles.values()))
    finally:
        gate.remove()
    for t in threads:
        t.join(60)
    return [results[i] for i in range(len(requests))]


@pytest.fixture(params=["chatglm2-tiny", "chatglm3-tiny"])
def batch_engine(request):
    model, tokenizer = loaded(request.param)
    eng = Engine(model, tokenizer, max_queue=16, max_batch=4)
    yield eng
    eng.close()


@pytest.mark.slow
def test_batched_output_equals_each_request_alone(batch_engine):
    """Mixed prompt lengths, budgets, sampling settings and arrival times: every text is the text it gets alone."""
    eng = batch_engine
    tok = eng.tokenizer
    stops = tuple(tok.reply_stop_ids())
    texts = ["你好", "Tell me a long story about the sea and the mountains, please", "1 + 1 = ?", "天气怎么样",
             "hi", "Explain attention in transformers step by step", "写一首诗"]
    sampled = SamplingParams(do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    requests = [
        GenerationRequest(prompt(tok, texts[0]), GREEDY, 30, stops),
        GenerationRequest(prompt(tok, texts[1]), GREEDY, 12, stops),
        GenerationRequest(prompt(tok, texts[2]), sampled, 25, stops),
        GenerationRequest(prompt(tok, texts[3]), SamplingParams(repetition_penalty=1.3), 20, stops),
        GenerationRequest(prompt(tok, texts[4]), SamplingParams(presence_penalty=2.0), 40, ()),
        GenerationRequest(prompt(tok, texts[5]), SamplingParams(do_sample=True, top_k=5, seed=3), 18, stops),
        GenerationRequest(prompt(tok, texts[6]), GREEDY, 3, stops),
    ]
    expected = [alone_events(eng.model, tok, r) for r in requests]
    sizes = BatchSizes(eng.model)
    try:
        got = run_staggered(eng, requests, [[0, 1], [2], [3, 4, 5], [6]])
    finally:
        sizes.remove()
    assert got == expected
    assert max(sizes.sizes) == eng.max_batch  # requests really were decoded together
    assert eng.stats.running == 0 and eng.cache.rows == 0


@pytest.mark.slow
def test_cancelling_one_request_leaves_the_others_unchanged(batch_engine):
    eng, tok = batch_engine, batch_engine.tokenizer
    requests = [GenerationRequest(prompt(tok, t), GREEDY, 30, ()) for t in ["你好", "hello there", "天气"]]
    expected = [alone_events(eng.model, tok, r)[0] for r in requests]
    victim = eng.submit(GenerationRequest(prompt(tok, "cancel me"), GREEDY, 200))
    handles = [eng.submit(r) for r in requests]
    first = next(iter(victim))
    victim.cancel()
    rest = list(victim) if first.finish is None else []
    assert ([first] + rest)[-1].finish == "cancelled"
    assert [collect(h)[0] for h in handles] == expected


@pytest.mark.slow
def test_the_batch_cache_is_reused_not_grown(batch_engine):
    """Many requests of growing length pass through: the cache returns to its initial size when idle."""
    eng, tok = batch_engine, batch_engine.tokenizer
    initial = eng.cache.nbytes()
    for round_ in range(3):
        handles = [eng.submit(GenerationRequest(prompt(tok, "x" * (20 * i + round_)), GREEDY, 150 + 50 * i))
                   for i in range(6)]
        for h in handles:
            collect(h)
    deadline = time.monotonic() + 5
    while eng.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.cache.rows == 0 and eng.stats.running == 0 and eng.stats.queued == 0
    assert eng.cache.nbytes() == initial


@pytest.mark.slow
def test_long_prompts_are_read_in_chunks_between_decode_steps():
    """Prompts longer than prefill_chunk are read a chunk per step while the others keep decoding; every
    text is still the text alone, and a request cancelled while its prompt is being read frees everything."""
    model, tok = loaded("chatglm3-tiny")
    eng = Engine(model, tok, max_queue=16, max_batch=4, prefill_chunk=8)
    try:
        stops = tuple(tok.reply_stop_ids())
        texts = ["hi", "Tell me a long story about the sea and the mountains, please, with many details",
                 "你好", "Explain attention in transformers step by step, and then explain it again",
                 "A third long prompt that waits while another long prompt is being read in chunks"]
        requests = [GenerationRequest(prompt(tok, t), GREEDY, 20, stops) for t in texts]
        assert sum(len(r.input_ids) > 8 for r in requests) >= 3
        expected = [alone_events(model, tok, r) for r in requests]
        sizes = BatchSizes(model)
        try:
            got = run_staggered(eng, requests, [[0], [1, 2, 3, 4]])
        finally:
            sizes.remove()
        assert got == expected
        assert max(sizes.sizes) > 1 and (1, 8) in sizes.shapes  # batched decode steps and 8-token prompt chunks
        victim = eng.submit(GenerationRequest(prompt(tok, "x" * 60), GREEDY, 50))
        victim.cancel()
        assert list(victim)[-1].finish == "cancelled"
        assert collect(eng.submit(requests[1]))[0] == expected[1][0]
        deadline = time.monotonic() + 5
        while (eng.stats.running or eng.stats.queued) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.stats.running == 0 and eng.stats.queued == 0 and eng.cache.rows == 0
    finally:
        eng.close()


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm1-tiny"])
def test_a_fixed_cache_gives_the_same_text_and_never_moves(name):
    """cache_capacity: one allocation of fixed shape that every decode step attends over in full (masked), so a
    step can be captured (CUDA graphs) or compiled; the texts are those of the growing cache."""
    model, tok = loaded(name)
    stops = tuple(tok.reply_stop_ids())
    requests = [GenerationRequest(prompt(tok, t), SamplingParams(do_sample=True, seed=i, top_k=8), n, stops)
                for i, (t, n) in enumerate([("你好", 30), ("hello there, how are you", 12), ("天气", 40)])]
    eng = Engine(model, tok, max_batch=4, cache_capacity=96)
    widths = []  # of the decode steps' masks (a batched prompt pass masks its own padding)
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args: widths.append(args[2].shape[-1]) if args[0].shape[1] == 1 else None)
    try:
        storage = [t.data_ptr() for t in eng.cache.keys]
        handles = eng.submit_all(requests)
        got = [collect(h) for h in handles]
        assert [t.data_ptr() for t in eng.cache.keys] == storage and eng.cache.capacity == 96
        assert eng.context_length == 96 and widths and set(widths) == {96}  # every step masks the whole cache
    finally:
        hook.remove()
        eng.close()
    assert [(text, e.finish) for text, e in got] == [alone_events(model, tok, r) for r in requests]
    small = Engine(model, tok, cache_capacity=96)
    try:
        with pytest.raises(ValueError, match="context"):  # a prompt the fixed cache cannot hold is refused up front
            small.submit(GenerationRequest(list(range(5, 105)), GREEDY, 4))
    finally:
        small.close()
