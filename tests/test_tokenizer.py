"""Tokenizer against the reference outputs in golden/tokenizer_cases.json, plus the streaming detokenizer."""

import json
import os

import pytest

from conftest import GOLDEN
from model import ChatGLMTokenizer, StreamDecoder

with open(os.path.join(GOLDEN, "tokenizer_cases.json"), encoding="utf-8") as f:
    CASES = json.load(f)
VOCAB = os.path.join(GOLDEN, "tiny_tokenizer", "tokenizer.model")
FAMILIES = ["chatglm2", "chatglm3"]


def tok(family):
    return ChatGLMTokenizer(VOCAB, family=family)


@pytest.mark.parametrize("family", FAMILIES)
def test_vocabulary_and_specials(family):
    c, t = CASES[family], tok(family)
    assert t.vocab_size == c["vocab_size"]
    assert t.eos_token_id == c["eos_token_id"] and t.pad_token_id == c["pad_token_id"]
    assert {k: t.get_command(k) for k in c["special_tokens"]} == c["special_tokens"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("index", range(len(CASES["chatglm2"]["strings"])))
def test_strings(family, index):
    case, t = CASES[family]["strings"][index], tok(family)
    text = case["text"]
    assert t.tokenize(text) == case["tokenize"]
    assert t.encode(text) == case["encode"]
    assert t.encode(text, add_special_tokens=False) == case["encode_no_special"]
    assert t(text)["input_ids"] == case["encode"]
    assert t.decode(case["encode"]) == case["decode_encode"]
    assert t.decode(case["encode_no_special"]) == case["decode_encode_no_special"]
    assert t.decode(case["encode"], skip_special_tokens=True) == case["decode_skip_special"]
    assert t.convert_ids_to_tokens(case["encode"]) == case["convert_ids_to_tokens"]
    if family == "chatglm3":
        assert t.encode(text, encode_special_tokens=True) == case["encode_with_encode_special_tokens"]
        assert t.tokenize(text, encode_special_tokens=True) == case["tokenize_with_encode_special_tokens"]


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_ids(family):
    t = tok(family)
    for case in CASES[family]["decode_ids"]:
        assert t.decode(case["ids"]) == case["decode"]
        assert t.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special"]
        assert t.convert_ids_to_tokens(case["ids"]) == case["convert_ids_to_tokens"]


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding(family):
    c, t = CASES[family], tok(family)
    batch = c["batch_padding"]
    out = t(batch["texts"], padding=True)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert out[key] == batch[key]
    tensors = t(batch["texts"], padding=True, return_tensors="pt")
    assert tensors["input_ids"].tolist() == batch["input_ids"]
    fixed = c["batch_padding_max_length_16"]
    texts = [t.decode([i for i in ids if i != t.pad_token_id][2:]) for ids in fixed["input_ids"]]
    out = t(texts, padding="max_length", max_length=16)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert out[key] == fixed[key]


def test_different_lengths_need_padding():
    with pytest.raises(ValueError, match="padding"):
        tok("chatglm2")(["a", "a longer text"], return_tensors="pt")


def test_chatglm2_prompts():
    t = tok("chatglm2")
    for case in CASES["chatglm2"]["build_prompt"]:
        prompt = t.build_prompt(case["query"], case["history"])
        assert prompt == case["prompt"]
        out = t([prompt])
        assert out["input_ids"][0] == case["input_ids"] and out["position_ids"][0] == case["position_ids"]
    for case in CASES["chatglm2"]["build_stream_inputs"]:
        if case["history"]:
            ids = t.build_continuation_ids(case["query"], case["history"])
        else:
            ids = t.build_inputs(case["query"], case["history"])["input_ids"][0].tolist()
        assert ids == case["input_ids"]


def test_chatglm3_prompts():
    t = tok("chatglm3")
    for case in CASES["chatglm3"]["build_chat_input"]:
        out = t.build_chat_input(case["query"], case["history"], case["role"])
        assert out["input_ids"][0].tolist() == case["input_ids"], case["name"]
        assert out["attention_mask"][0].tolist() == case["attention_mask"]
        assert out["position_ids"][0].tolist() == case["position_ids"]
        assert t.decode(case["input_ids"]) == case["decode"]
    for case in CASES["chatglm3"]["build_single_message"]:
        assert t.build_single_message(case["role"], case["metadata"], case["message"]) == case["ids"]
    with pytest.raises(ValueError, match="role"):
        t.build_single_message("root", "", "hi")


def test_typed_role_strings_stay_text():
    """Section 9: user text that spells a role token is not turned into the control id."""
    t = tok("chatglm3")
    ids = t.build_chat_ids("<|assistant|>hi", [], "user")
    assert ids.count(t.get_command("<|assistant|>")) == 1 and ids[-1] == t.get_command("<|assistant|>")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("index", range(len(CASES["chatglm2"]["strings"])))
def test_stream_decoder_joins_to_decode(family, index):
    t = tok(family)
    ids = CASES[family]["strings"][index]["encode_no_special"] + [243, 162]  # ends in half an emoji
    decoder = StreamDecoder(t)
    deltas = [decoder.put(i) for i in ids]
    for d in deltas:
        assert "\ufffd" not in d[-1:], "a delta ended in half a character"
    assert "".join(deltas) + decoder.flush() == t.decode(ids)


def test_stream_decoder_holds_back_partial_utf8():
    t = tok("chatglm2")
    decoder = StreamDecoder(t)
    emoji = [243, 162, 148, 142]  # 👋 as four byte pieces
    assert [decoder.put(i) for i in emoji] == ["", "", "", "👋"]
    assert decoder.put(692) == " 你好"


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny", "chatglm1-tiny"])
def test_lone_surrogates_encode_as_the_replacement_character(name):
    """A str may hold lone surrogates (JSON "\\ud800", undecodable terminal input); they read as U+FFFD."""
    from conftest import loaded

    model, t = loaded(name)
    assert t.encode("a\ud800b") == t.encode("a\ufffdb")
    assert t.tokenize("x\udcff") == t.tokenize("x\ufffd")
    assert t.encode("\ud83d\ude00") == t.encode("\ufffd\ufffd")  # unpaired halves: two characters
    reply, history = model.chat(t, "hi \udc80", history=[], do_sample=False, max_new_tokens=3)
    assert isinstance(reply, str)


# ---- the transformers surface training tools use -------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_takes_a_text_pair_as_the_original(family):
    t = tok(family)
    assert t.encode("你好", "世界") == t.encode("你好") + t.encode("世界", add_special_tokens=False) + [t.eos_token_id]
    assert t.encode("你好", "世界") == t("你好", "世界")["input_ids"]
    with pytest.raises(TypeError, match="keyword"):  # encode(text, False) used to drop the pair silently
        t.encode("你好", False)


def test_chatglm1_encode_pairs_and_image_tokens():
    from model.tokenizer_v1 import ChatGLM1Tokenizer

    with open(os.path.join(GOLDEN, "tokenizer_cases_v1.json"), encoding="utf-8") as f:
        cases = json.load(f)["chatglm1"]
    t = ChatGLM1Tokenizer.from_pretrained(os.path.join(GOLDEN, "models", "chatglm1-tiny"))
    for case in cases["text_pairs"]:
        assert t.encode(case["text"], case["text_pair"]) == case["encode"]
    # With image tokens (the released vocabulary has 20000) a word after them keeps its space, as the original's
    # single SentencePiece decode: [0, 1, 63, ...] -> '<image_0><image_1><image_63> 你好 world'.
    images = ChatGLM1Tokenizer(t.vocab_file, num_image_tokens=100)
    words = images.encode("你好 world", add_special_tokens=False)
    assert images.decode([0, 1, 63] + words) == "<image_0><image_1><image_63> 你好 world"
    assert images.decode(words) == "你好 world"


@pytest.mark.parametrize("family", FAMILIES)
def test_pad_equals_padding_in_call(family):
    t = tok(family)
    texts = ["你好", "a somewhat longer text"]
    ids = [t.encode(x) for x in texts]
    expected = t(texts, padding=True)
    for given in ({"input_ids": ids}, [{"input_ids": i} for i in ids], ids):
        padded = t.pad(given)
        assert {k: padded[k] for k in expected} == dict(expected)
    assert t.pad({"input_ids": ids}, return_tensors="pt")["input_ids"].tolist() == expected["input_ids"]


def test_pad_for_chatglm1_builds_its_positions_and_masks():
    from model.tokenizer_v1 import ChatGLM1Tokenizer

    t = ChatGLM1Tokenizer.from_pretrained(os.path.join(GOLDEN, "models", "chatglm1-tiny"))
    texts = ["你好", "a somewhat longer text"]
    expected = t(texts, padding=True)
    padded = t.pad({"input_ids": [t.encode(x) for x in texts]})
    assert {k: padded[k] for k in expected} == dict(expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_chat_template_is_the_familys_prompt(family):
    t = tok(family)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "what now?"}]
    ids = t.apply_chat_template(conversation)
    if family == "chatglm3":
        assert ids == t.build_chat_ids("what now?", [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "metadata": "", "content": "hello"}])
    else:
        assert ids == t.encode(t.build_prompt("what now?", [("hi", "hello")]))
    text = t.apply_chat_template(conversation, tokenize=False)  # the prompt text, what chat_template renders
    assert text == (t.decode(ids) if family == "chatglm3" else t.build_prompt("what now?", [("hi", "hello")]))
    batch = t.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
    assert batch["input_ids"].tolist() == [ids] and batch["attention_mask"].tolist() == [[1] * len(ids)]


# ---- chat_template: the family's format as Jinja, rendered by transformers --------------------------------------
WEATHER = [{"name": "get_weather", "description": "天气 of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CONVERSATIONS = [  # (messages, tools)
    ([{"role": "user", "content": "hi"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what now?"}], None),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": ""},
      {"role": "system", "content": "S"}, {"role": "user", "content": "c\nd 你好"}], None),
    ([{"role": "assistant", "content": "first?"}, {"role": "user", "content": "x"}], None),  # refused
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], None),  # refused: not ready
    ([{"role": "user", "content": "x"}], WEATHER),  # tools: ChatGLM3 only
]
CHATGLM3_ONLY = [
    ([{"role": "system", "content": "You are X", "tools": WEATHER}, {"role": "user", "content": "weather?"},
      {"role": "assistant", "metadata": "get_weather", "content": "call"},
      {"role": "observation", "content": '{"t": 3}'}], None),
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": "ok"}, {"role": "tool", "content": "r"}], WEATHER),
    ([{"role": "user", "content": "x"}, {"role": "critic", "content": "y"}], None),  # refused
]


def rendered(t, messages, tools):
    """What transformers' chat templating (its Jinja environment) renders from the saved chat_template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=t.chat_template,
                                     add_generation_prompt=True)
    return texts[0]


def chatglm3_text_ids(t, text: str) -> list[int]:
    """Ids of a ChatGLM3 prompt text: [gMASK]sop, then per '<|role|> metadata\n content' the role token,
    metadata + newline and content each encoded (as build_single_message), then <|assistant|>."""
    import re

    assert text.startswith("[gMASK]sop") and text.endswith("<|assistant|>")
    ids = t.get_prefix_tokens()
    for role, body in re.findall(r"(<\|\w+\|>)( [^\n]*\n(?:(?!<\|\w+\|>).)*)", text[9:], flags=re.S):
        metadata, _, content = body[1:].partition("\n")
        ids += [t.get_command(role)] + t.sp.encode(metadata + "\n") + t.sp.encode(content[1:])
    return ids + [t.get_command("<|assistant|>")]


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2", "chatglm3"])
def test_chat_template_renders_what_apply_chat_template_gives(family):
    """The same text (ChatGLM-6B / ChatGLM2: encode(text) gives the ids; ChatGLM3: the text splits back into
    the ids), and the same refusals."""
    from jinja2 import TemplateError

    from model.formats import ConversationError

    t = ChatGLMTokenizer.from_pretrained(os.path.join(GOLDEN, "models", f"{family}-tiny"))
    cases = CONVERSATIONS + (CHATGLM3_ONLY if family == "chatglm3" else [])
    done = 0
    for messages, tools in cases:
        try:
            ours = t.apply_chat_template(messages, tools=tools, tokenize=False)
        except ConversationError:
            with pytest.raises(TemplateError):
                rendered(t, messages, tools)
            continue
        assert rendered(t, messages, tools) == ours, messages
        ids = t.apply_chat_template(messages, tools=tools)
        assert (chatglm3_text_ids(t, ours) if family == "chatglm3" else t.encode(ours)) == ids
        done += 1
    assert done == (7 if family == "chatglm3" else 3)  # every case that is not refused


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2", "chatglm3"])
def test_save_pretrained_writes_the_chat_template_and_reloading_keeps_it(family, tmp_path):
    t = ChatGLMTokenizer.from_pretrained(os.path.join(GOLDEN, "models", f"{family}-tiny"))
    t.save_pretrained(str(tmp_path))
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        saved = json.load(f)["chat_template"]
    assert saved == t.chat_template and "{%" in saved
    again = ChatGLMTokenizer.from_pretrained(str(tmp_path))
    assert again.family == family and again.chat_template == saved
    messages = CONVERSATIONS[1][0]
    assert again.apply_chat_template(messages) == t.apply_chat_template(messages)
    again.save_pretrained(str(tmp_path / "again"))
    with open(tmp_path / "again" / "tokenizer_config.json", encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == saved
