"""chat / stream_chat against the original's recorded strings.

ChatGLM2 matches the reference exactly (the reference repeats its last string after the stop token; streams are
compared without consecutive repeats). ChatGLM3 differs on purpose where spec section 9 says so:
- the reference drops the last generated token when generation stops on length: its reply is then a strict
  prefix of ours; when it stops on a stop id the replies are equal;
- the reference stream lags one token and never yields a text ending in an incomplete character, so its final
  streamed text can be shorter than its own chat() reply; ours ends on exactly the chat() reply;
- with a reused KV cache ours appends only the new turn (no second [gMASK] sop), so turn 2 of
  stream_chat_with_past is checked by the cache invariant in test_invariants.py instead of the reference text.
"""

import pytest

from conftest import PTUNING_MODELS, as_lists, dedup, golden_case, loaded

CHATGLM2 = ["chatglm2-tiny"] + PTUNING_MODELS  # the P-Tuning model: chatglm2-tiny with a prefix


def chat_case(name):
    return golden_case(name)["runs"]["float32"]["chat"]


def greedy24(name):
    return chat_case(name)["gen_kwargs"]


@pytest.mark.parametrize("name", CHATGLM2)
@pytest.mark.parametrize("turn", [0, 1])
@pytest.mark.slow
def test_chatglm2_chat(name, turn):
    model, tokenizer = loaded(name)
    case = chat_case(name)["chat"][turn]
    response, history = model.chat(tokenizer, case["query"], case["history_in"], **greedy24(name))
    assert response == case["response"]
    assert as_lists(history) == case["history_out"]


@pytest.mark.parametrize("name", CHATGLM2)
@pytest.mark.parametrize("turn", [0, 1])
@pytest.mark.slow
def test_chatglm2_stream_chat(name, turn):
    model, tokenizer = loaded(name)
    case = chat_case(name)["stream_chat"][turn]
    items = list(model.stream_chat(tokenizer, case["query"], case["history_in"], **greedy24(name)))
    assert dedup([r for r, _ in items]) == dedup(case["stream"])
    assert as_lists(items[-1][1]) == case["history_out"]


@pytest.mark.parametrize("name", CHATGLM2)
@pytest.mark.slow
def test_chatglm2_stream_chat_with_past(name):
    model, tokenizer = loaded(name)
    past = None
    for case in chat_case(name)["stream_chat_with_past"]:
        items = list(model.stream_chat(tokenizer, case["query"], case["history_in"], past_key_values=past,
                                       return_past_key_values=True, **greedy24(name)))
        ours, ref = dedup([r for r, _, _ in items]), dedup(case["stream"])
        # Spec section 9: a reply that ends (on length) in an incomplete character is never yielded by the
        # reference, whose last text and cache are then one token short; our last text is the chat() reply.
        held_back = name in PTUNING_MODELS and ours[-1].endswith("\ufffd") and ours[:-1] == ref
        assert ours == ref or held_back  # (the base model's case has no such ending: exact as before)
        assert as_lists(items[-1 - held_back][1]) == case["history_out"]
        past = items[-1][2]
        assert past[0][0].shape[0] == case["past_len_after"] + held_back


@pytest.mark.slow
def test_chatglm3_chat():
    model, tokenizer = loaded("chatglm3-tiny")
    first, second = chat_case("chatglm3-tiny")["chat"]
    # Turn 1 stopped on <|user|>: identical to the reference.
    response, history = model.chat(tokenizer, first["query"], first["history_in"], **greedy24("chatglm3-tiny"))
    assert response == first["response"] and history == first["history_out"]
    # Turn 2 stopped on length: the reference dropped the last token, we keep it.
    response, history = model.chat(tokenizer, second["query"], second["history_in"], **greedy24("chatglm3-tiny"))
    assert response != second["response"] and response.startswith(second["response"])
    assert history[:-1] == second["history_out"][:-1]
    assert history[-1]["content"].startswith(second["history_out"][-1]["content"])


@pytest.mark.parametrize("turn", [0, 1])
@pytest.mark.slow
def test_chatglm3_stream_chat(turn):
    model, tokenizer = loaded("chatglm3-tiny")
    case = chat_case("chatglm3-tiny")["stream_chat"][turn]
    kwargs = greedy24("chatglm3-tiny")
    items = list(model.stream_chat(tokenizer, case["query"], case["history_in"], **kwargs))
    ours = dedup([r for r, _ in items])
    # Every text the lagging reference yielded is one of ours, in order; ours ends on our chat() reply.
    it = iter(ours)
    assert all(any(s == o for o in it) for s in dedup(case["stream"]))
    response, history = model.chat(tokenizer, case["query"], case["history_in"], **kwargs)
    assert ours[-1] == response and items[-1][1] == history
    assert response.startswith(case["stream"][-1])


def test_chatglm3_stream_chat_with_past_first_turn():
    model, tokenizer = loaded("chatglm3-tiny")
    case = chat_case("chatglm3-tiny")["stream_chat_with_past"][0]
    items = list(model.stream_chat(tokenizer, case["query"], case["history_in"], return_past_key_values=True,
                                   **greedy24("chatglm3-tiny")))
    it = iter(dedup([r for r, _, _ in items]))
    assert all(any(s == o for o in it) for s in dedup(case["stream"]))
    # The reference's cache lags with its stream (one token short); ours holds every token fed to the model.
    assert items[-1][2][0][0].shape[0] == case["past_len_after"] + 1


def test_process_response():
    model2, _ = loaded("chatglm2-tiny")
    for case in golden_case("chatglm2-tiny")["runs"]["float32"]["process_response"]:
        assert model2.process_response(case["input"]) == case["output"]
    model3, _ = loaded("chatglm3-tiny")
    for case in golden_case("chatglm3-tiny")["runs"]["float32"]["process_response"]:
        content, history = model3.process_response(case["output_text"], case["history_in"])
        assert content == case["content"] and history == case["history_out"]


def test_tool_call_is_parsed_not_executed():
    model, _ = loaded("chatglm3-tiny")
    history = [{"role": "system", "content": "x", "tools": [{"name": "f"}]}]
    content, _ = model.process_response("f\n```python\ntool_call(x=__import__('os').getcwd())\n```", history)
    assert content == {"name": "f", "content": "```python\ntool_call(x=__import__('os').getcwd())\n```"}
    content, _ = model.process_response("f\n```python\ntool_call(a=[1, {'b': None}], c=-2.5)\n```", history)
    assert content == {"name": "f", "parameters": {"a": [1, {"b": None}], "c": -2.5}}
