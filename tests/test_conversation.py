"""Messages -> prompt ids, and the streaming reply parser: stop strings, stripping, ChatGLM3 tool calls."""

import json
import random

import pytest

from conftest import loaded
from model.reply import process_response_v3
from model.formats import (DEFAULT_TOOL_PROMPT, ConversationError, Message, build_prompt_ids, render_tool_call,
                           reply_parser)
from model.reply import ReplyParser

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def run(parser: ReplyParser, text: str, cuts: list[int]):
    """Feed text split at cuts; return (joined content, tool calls)."""
    parts, last = [], 0
    for cut in sorted(cuts) + [len(text)]:
        parts += parser.feed(text[last:cut])
        last = cut
    parts += parser.finish()
    content = "".join(p.content for p in parts if p.tool_call is None)
    return content, [p.tool_call for p in parts if p.tool_call is not None]


def all_splits(parser_factory, text, trials=60):
    """The same result whatever way the text arrives in pieces (one char at a time, random cuts, whole)."""
    results = {run(parser_factory(), text, [])[0:2].__repr__(),
               run(parser_factory(), text, list(range(1, len(text))))[0:2].__repr__()}
    rng = random.Random(0)
    for _ in range(trials):
        cuts = rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))) if len(text) > 1 else []
        results.add(repr(run(parser_factory(), text, cuts)))
    assert len(results) == 1, results
    return run(parser_factory(), text, [])


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_plain_reply_is_stripped_and_training_time_replaced(family):
    text = ("\n" if family == "chatglm3" else "") + "  你好，我是在[[训练时间]]训练的。  \n"
    content, calls = all_splits(lambda: reply_parser(family), text)
    assert content == "你好，我是在2023年训练的。" and calls == []


def test_inner_whitespace_is_kept_and_trailing_whitespace_waits():
    parser = reply_parser("chatglm2")
    assert [p.content for p in parser.feed("a  ")] == ["a"]
    assert [p.content for p in parser.feed(" b\n")] == ["   b"]
    assert parser.finish() == []


@pytest.mark.parametrize("stop", [["STOP"], ["x", "。"], ["<|assistant|>"]])
def test_stop_strings_end_the_reply_and_are_not_returned(stop):
    text = "first part STOP second。 third x"
    expected = text
    for s in stop:
        i = expected.find(s)
        if i >= 0:
            expected = expected[:i]
    content, _ = all_splits(lambda: reply_parser("chatglm2", stop=stop), text)
    assert content == expected.strip()
    parser = reply_parser("chatglm2", stop=stop)
    run(parser, text, [3])
    assert parser.stopped == any(s in text for s in stop)


def test_partial_stop_string_is_held_back_then_released():
    parser = reply_parser("chatglm2", stop=["END"])
    assert [p.content for p in parser.feed("abc EN")] == ["abc"]
    assert [p.content for p in parser.feed("d? no, ENx")] == [" ENd? no, ENx"]
    assert not parser.stopped
    assert [p.content for p in parser.feed(" E")] == []
    assert parser.feed("ND more") == [] and parser.stopped


def test_tool_call_is_parsed_to_json_arguments():
    text = "get_weather\n```python\ntool_call(city='北京', days=3, detail={'wind': True})\n```"
    content, calls = all_splits(lambda: reply_parser("chatglm3", tool_names=["get_weather"]), text)
    assert content == ""
    assert calls == [{"name": "get_weather",
                      "arguments": json.dumps({"city": "北京", "days": 3, "detail": {"wind": True}},
                                              ensure_ascii=False)}]


def test_tool_call_agrees_with_the_original_post_processing():
    text = "get_weather\n```python\ntool_call(city='Paris')\n```"
    history = [{"role": "system", "content": "x", "tools": [TOOL]}]
    original, _ = process_response_v3(text, history)
    _, calls = run(reply_parser("chatglm3", tool_names=["get_weather"]), text, [5])
    assert json.loads(calls[0]["arguments"]) == original["parameters"] and calls[0]["name"] == original["name"]


def test_unknown_name_or_no_tools_means_content():
    text = "interpreter\nprint(1)"
    assert run(reply_parser("chatglm3"), text, [2])[0] == "print(1)"
    assert run(reply_parser("chatglm3", tool_names=["other"]), text, [2])[0] == "print(1)"


def test_text_that_cannot_be_a_name_streams_at_once():
    parser = reply_parser("chatglm3", tool_names=["get_weather"])
    assert [p.content for p in parser.feed("Hello, wor")] == ["Hello, wor"]


def test_unreadable_tool_call_falls_back_to_content():
    text = "get_weather\nnot python at all"
    content, calls = run(reply_parser("chatglm3", tool_names=["get_weather"]), text, [])
    assert calls == [] and content == "get_weather\nnot python at all"


def test_content_then_tool_call_in_a_second_segment():
    text = "\nLet me look.<|assistant|>get_weather\n```python\ntool_call(city='Rome')\n```"
    content, calls = all_splits(lambda: reply_parser("chatglm3", tool_names=["get_weather"]), text)
    assert content == "Let me look." and [c["name"] for c in calls] == ["get_weather"]


def test_forced_tool_starts_inside_the_call():
    text = "```python\ntool_call(city='Oslo')\n```"
    _, calls = run(reply_parser("chatglm3", tool_names=["get_weather"], forced_tool="get_weather"), text, [4, 9])
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]


# ---- prompts -----------------------------------------------------------------------------------------
def tok(name):
    return loaded(name)[1]


def test_v3_prompt_equals_the_chat_prompt():
    t = tok("chatglm3-tiny")
    messages = [Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "hello"),
                Message("user", "what now?")]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
               {"role": "assistant", "metadata": "", "content": "hello"}]
    assert build_prompt_ids(t, messages) == t.build_chat_ids("what now?", history)


def test_v3_tools_go_into_the_system_message_and_results_are_observations():
    t = tok("chatglm3-tiny")
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    messages = [Message("user", "weather?"), Message("assistant", "", [call]), Message("tool", '{"temp": 20}')]
    history = [{"role": "system", "content": DEFAULT_TOOL_PROMPT, "tools": [TOOL]},
               {"role": "user", "content": "weather?"},
               {"role": "assistant", "metadata": "get_weather",
                "content": "```python\ntool_call(city='Paris')\n```"}]
    assert build_prompt_ids(t, messages, [TOOL]) == t.build_chat_ids('{"temp": 20}', history, "observation")


def test_v3_forced_tool_writes_its_name_after_the_assistant_token():
    t = tok("chatglm3-tiny")
    plain = build_prompt_ids(t, [Message("user", "x")], [TOOL])
    forced = build_prompt_ids(t, [Message("user", "x")], [TOOL], forced_tool="get_weather")
    assert forced[:len(plain)] == plain and t.decode(forced[len(plain):]).strip() == "get_weather"


def test_v2_prompt_equals_the_round_prompt_with_system_text_first():
    t = tok("chatglm2-tiny")
    messages = [Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "hello"),
                Message("user", "and?")]
    assert build_prompt_ids(t, messages) == t.encode(t.build_prompt("and?", [("Be brief.\nhi", "hello")]))


@pytest.mark.parametrize("messages, tools, needle", [
    ([Message("assistant", "hi")], None, "must follow a user"),
    ([Message("user", "a"), Message("assistant", "b")], None, "last message"),
    ([Message("user", "a")], [TOOL], "ChatGLM3"),
    ([], None, "empty"),
])
def test_v2_conversation_errors_say_what_is_wrong(messages, tools, needle):
    with pytest.raises(ConversationError, match=needle):
        build_prompt_ids(tok("chatglm2-tiny"), messages, tools)


def test_tool_call_rendering_needs_json_object_arguments():
    assert render_tool_call("f", '{"a": [1, "x"], "b": null}') == "```python\ntool_call(a=[1, 'x'], b=None)\n```"
    for bad in ("[1]", "{not json", '{"not an identifier": 1}'):
        with pytest.raises(ConversationError):
            render_tool_call("f", bad)
