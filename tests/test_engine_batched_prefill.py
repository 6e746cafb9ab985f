"""Short prompts that wait together are read in one left-padded forward pass (issue 19): every request still
gets exactly the text it gets alone, in every family, with a P-Tuning prefix and in the fixed-cache mode; a
cancelled waiting request is not read; a failing batched pass fails only its own requests."""

import pytest

from conftest import loaded
from serving import StepGate
from model import load_model
from model.engine import Engine, GenerationRequest
from model.generation import SamplingParams
from test_engine import alone_events, prompt
from test_v1_ptuning import BASE as V1_BASE, write_checkpoint

GREEDY = SamplingParams()
TEXTS = ["你好", "Tell me a long story about the sea and the mountains", "1 + 1 = ?",
         "hi there, how are you today?", "What is the weather like, and tomorrow?"]


@pytest.fixture(scope="module")
def v1_prefixed(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v1-ptuning") / "checkpoint-1")
    write_checkpoint(path, seed=1)
    return load_model(V1_BASE, ptuning=path, device="cpu", dtype="float32")


def model_for(name, request):
    return request.getfixturevalue("v1_prefixed") if name == "chatglm1-tiny-ptuning" else loaded(name)


def mixed_requests(tok, n_tokens=12):
    """Prompts of different lengths; greedy, a penalty, and seeded sampling."""
    stops = tuple(tok.reply_stop_ids())
    params = [GREEDY, GREEDY, SamplingParams(do_sample=True, temperature=0.9, top_p=0.8, seed=7),
              SamplingParams(repetition_penalty=1.3), SamplingParams(do_sample=True, top_k=5, seed=3)]
    requests = [GenerationRequest(prompt(tok, t), p, n_tokens, stops) for t, p in zip(TEXTS, params)]
    assert len({len(r.input_ids) for r in requests}) == len(requests)  # every row of the pass is padded but one
    return requests


class PromptPasses:
    """The (batch, tokens) shape of every forward pass that reads prompts (decode steps feed one token)."""

    def __init__(self, model):
        self.shapes = []
        self._hook = model.transformer.register_forward_pre_hook(
            lambda module, args: self.shapes.append(tuple(args[0].shape)) if args[0].shape[1] > 1 else None)

    def remove(self):
        self._hook.remove()


def submitted_together(eng, requests, blocker_tokens=1, before=lambda eng, handles: None):
    """Submit `requests` while the worker is held inside the prefill of a blocker request, so they all wait in
    the queue when it next admits: they arrive in the same admit step, whatever the threads' timing. Returns
    the blocker's text and finish, theirs, the prompt passes' shapes (the blocker's first) and their handles."""
    model, tok = eng.model, eng.tokenizer
    passes = PromptPasses(model)
    gate = StepGate(model)
    try:
        blocker = eng.submit(GenerationRequest(prompt(tok, "x"), GREEDY, blocker_tokens))
        gate.wait_held()
        handles = eng.submit_all(requests)
        before(eng, handles)
    finally:
        gate.remove()
    results = [collect(h) for h in handles]
    blocker_result = collect(blocker)
    passes.remove()
    return blocker_result, results, passes.shapes, handles


def collect(handle):
    events = list(handle)
    handle.last = events[-1]
    return "".join(e.text for e in events), events[-1].finish


def settled(eng):
    return eng.stats.running == 0 and eng.stats.queued == 0 and eng.cache.rows == 0


class Together:
    """The mixed requests submitted together to a new engine (max_batch 8 and room for all five prompts in one
    pass unless told): .requests, .expected (each one's text and finish alone), .got, .shapes (of the prompt
    passes, the blocker's first), .lengths."""

    def __init__(self, model, tok, n_tokens=12, before=lambda eng, handles: None, check=lambda eng: None,
                 **options):
        self.requests = mixed_requests(tok, n_tokens)
        self.lengths = [len(r.input_ids) for r in self.requests]
        self.expected = [alone_events(model, tok, r) for r in self.requests]
        eng = Engine(model, tok, **({"max_batch": 8, "prefill_batch_tokens": 1024} | options))
        try:
            _, self.got, self.shapes, _ = submitted_together(eng, self.requests, before=before)
            assert settled(eng)
            check(eng)
        finally:
            eng.close()


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny", "chatglm1-tiny", "chatglm2-tiny-ptuning-p4",
                                  "chatglm1-tiny-ptuning"])
def test_prompts_waiting_together_are_read_in_one_pass_with_the_text_each_gets_alone(name, request):
    run = Together(*model_for(name, request))
    assert run.got == run.expected
    assert run.shapes[1:] == [(5, max(run.lengths))]  # the blocker alone, then all five in one pass, not five


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm1-tiny", "chatglm2-tiny-ptuning-p4"])
def test_a_fixed_cache_takes_the_batched_rows_without_moving(name):
    storage = []

    def unmoved(eng):
        assert [t.data_ptr() for t in eng.cache.keys] == storage and eng.cache.capacity == 96

    run = Together(*loaded(name), 20, cache_capacity=96, check=unmoved,
                   before=lambda eng, handles: storage.extend(t.data_ptr() for t in eng.cache.keys))
    assert run.got == run.expected and len(run.shapes) == 2


def test_the_token_cap_splits_passes_and_none_reads_each_prompt_alone():
    model, tok = loaded("chatglm3-tiny")
    lengths = sorted(len(r.input_ids) for r in mixed_requests(tok))
    assert lengths == [7, 15, 25, 27, 38]
    capped = Together(model, tok, prefill_batch_tokens=128)
    assert capped.got == capped.expected
    assert capped.shapes[1:] == [(4, 27), (1, 38)]  # shortest first: 4 x 27 = 108 tokens fit 128, 5 x 38 do not
    alone = Together(model, tok, prefill_batch_tokens=None)
    assert alone.got == alone.expected
    assert sorted(alone.shapes[1:]) == [(1, n) for n in lengths]  # one pass per prompt, as before batching
    with pytest.raises(ValueError, match="prefill_batch_tokens"):
        Engine(model, tok, prefill_batch_tokens=0)
    default = Engine(model, tok)
    default.close()
    assert default.prefill_batch_tokens == 256


def test_max_batch_bounds_the_rows_read_together():
    run = Together(*loaded("chatglm2-tiny"), 4, max_batch=3)
    assert run.got == run.expected
    assert max(b for b, _ in run.shapes) <= 3 and sum(b for b, _ in run.shapes[1:]) == 5


def test_a_request_cancelled_while_waiting_is_not_read():
    run = Together(*loaded("chatglm2-tiny"), before=lambda eng, handles: handles[1].cancel())
    assert run.got[1] == ("", "cancelled")
    assert run.got[:1] + run.got[2:] == run.expected[:1] + run.expected[2:]
    rest = run.lengths[:1] + run.lengths[2:]
    assert run.shapes[1:] == [(4, max(rest))]  # four rows: the cancelled prompt (the longest) not read


def test_a_failing_batched_pass_fails_its_requests_only_and_the_engine_goes_on():
    model, tok = loaded("chatglm3-tiny")
    requests = mixed_requests(tok, 6)
    expected = [alone_events(model, tok, r) for r in requests]
    blocker_alone = alone_events(model, tok, GenerationRequest(prompt(tok, "x"), GREEDY, 8))
    failures = []

    def fail_once(module, args):
        if args[0].shape[0] > 1 and args[0].shape[1] > 1 and not failures:  # the first batched prompt pass
            failures.append(args[0].shape)
            raise RuntimeError("out of memory (injected)")

    hook = model.transformer.register_forward_pre_hook(fail_once)
    eng = Engine(model, tok, max_batch=8, prefill_batch_tokens=1024)
    try:
        # the blocker decodes (8 tokens) across the failing pass: it is not one of "those requests"
        blocker, got, _, handles = submitted_together(eng, requests, blocker_tokens=8)
        hook.remove()
        assert failures and blocker == blocker_alone
        assert got == [("", "error")] * len(requests)
        assert all(h.done and h.last.error == "RuntimeError: out of memory (injected)" for h in handles)
        assert settled(eng)
        _, again, shapes, _ = submitted_together(eng, requests)
        assert again == expected and shapes[1:] == [(len(requests), max(len(r.input_ids) for r in requests))]
        assert settled(eng)
    finally:
        hook.remove()
        eng.close()


def test_a_copy_failing_after_claiming_its_row_leaves_the_batch_cache_consistent():
    """The second row's copy into the batch cache fails after its row was claimed: the blocker, decoding in row
    0 meanwhile, keeps its text; the pass's requests fail; the rows line up again for the next requests."""
    model, tok = loaded("chatglm2-tiny")
    requests = mixed_requests(tok, 6)[:3]
    expected = [alone_events(model, tok, r) for r in requests]
    blocker_alone = alone_events(model, tok, GenerationRequest(prompt(tok, "x"), GREEDY, 8))
    eng = Engine(model, tok, max_batch=8, prefill_batch_tokens=1024)
    adopt, calls = eng.cache.adopt, []

    def adopt_then_fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            eng.cache.add_row()
            raise RuntimeError("copy failed (injected)")
        return adopt(*args, **kwargs)

    eng.cache.adopt = adopt_then_fail
    try:
        blocker, got, _, _ = submitted_together(eng, requests, blocker_tokens=8)
        assert len(calls) == 2 and blocker == blocker_alone
        assert got == [("", "error")] * len(requests) and settled(eng)
        _, again, _, _ = submitted_together(eng, requests, blocker_tokens=8)
        assert again == expected and settled(eng)
    finally:
        eng.close()
