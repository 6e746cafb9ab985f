"""The reply parser every path shares: generated text in, content deltas and ChatGLM3 tool calls out.

One incremental parser per reply. Front ends read its content deltas and tool calls; the original whole-text
post-processing (`process_response`) is the same parser run over the whole text.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from dataclasses import dataclass

ASSISTANT_MARK = "<|assistant|>"
PUNCTUATION_MARKS = ",!:;?"  # rewritten by ChatGLM-6B's post-processing, depending on the next character
_NAME_CHARS = re.compile(r"[\w.\-]*", re.ASCII)  # what a metadata (tool name) line may hold

TRAINING_TIME = ("[[训练时间]]", "2023年")


_CJK = "\u4e00-\u9fff"
_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))


def widen_punctuation(text: str) -> str:
    """The original's rewrite, mark by mark: after a CJK character, then before one. Each character's result
    depends only on its two neighbours and the length never changes, which lets a stream rewrite as it goes."""
    for ascii_mark, wide in _PUNCTUATION:
        mark = re.escape(ascii_mark)
        text = re.sub(f"([{_CJK}]){mark}", lambda m: m.group(1) + wide, text)
        text = re.sub(f"{mark}([{_CJK}])", lambda m: wide + m.group(1), text)
    return text


def parse_tool_call(code: str) -> dict | None:
    """Keyword arguments of a `tool_call(a=1, b='x')` expression, read as literals (never executed)."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"
            and not node.args and all(kw.arg for kw in node.keywords)):
        return None
    try:
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None


# ---- the reply ---------------------------------------------------------------------------------------
@dataclass
class ReplyPart:
    content: str = ""  # text to show
    tool_call: dict | None = None  # {"name", "arguments" (JSON text)}


class ReplyParser:
    """Feed generated text deltas; get content deltas and finished tool calls back.

    - The reply is stripped of surrounding whitespace ("[[训练时间]]" becomes "2023年", as the original does).
    - Stop strings end the reply; their text is not returned (`stopped` tells the caller to stop generating).
    - ChatGLM3: every segment (the reply's start and each `<|assistant|>`) opens with a metadata line; a tool's
      name there (when tools were offered) makes the segment a tool call, which is returned once complete,
      with its `tool_call(...)` keyword arguments as JSON. A metadata line must look like a name; text that
      does not is content (the original would take any first line for a name).
    """

    def __init__(self, *, segments: bool = False, widen: bool = False, stop: list[str] | None = None,
                 tool_names: list[str] | None = None, forced_tool: str | None = None):
        self.v3 = segments  # ChatGLM3: the reply is segments, each opening with a metadata line
        self.v1 = widen  # ChatGLM-6B: ASCII punctuation next to CJK text becomes full-width
        self.content = ""  # every content delta returned so far, joined
        self.segments: list[str] = [""]  # ChatGLM3: the raw text of each segment (split at <|assistant|>)
        self._mark_tail = ""  # ... and a possible start of <|assistant|> not yet placed
        self.raw = ""  # ChatGLM-6B: the content so far, before its punctuation rewrite
        self.sent = 0  # ... and how much of it has been returned
        self.stop = [s for s in (stop or []) if s]
        self.tool_names = set(tool_names or [])
        self.state = "content"
        self.meta = ""
        self.tool_name = ""
        self.tool_text = ""
        self.pending = ""  # content not yet safe to emit (maybe whitespace at the end, maybe a marker's start)
        self.started = False  # content emitted yet (leading whitespace is dropped)
        self.stopped = False
        self.tool_calls: list[dict] = []
        if forced_tool:
            self.state, self.tool_name = "tool", forced_tool
        elif self.v3:
            self.state = "meta"

    def _markers(self) -> list[str]:
        return self.stop + [TRAINING_TIME[0]] + ([ASSISTANT_MARK] if self.v3 else [])

    def feed(self, text: str) -> list[ReplyPart]:
        if self.stopped:
            return []
        if self.v3:
            self._track_segments(text)
        out: list[ReplyPart] = []
        while text and not self.stopped:
            if self.state == "meta":
                text = self._feed_meta(text, out)
            elif self.state == "tool":
                text = self._feed_tool(text, out)
            else:
                text = self._feed_content(text, out)
        return out

    def finish(self) -> list[ReplyPart]:
        """Everything held back, at the end of generation."""
        out: list[ReplyPart] = []
        if self.stopped:
            return out
        self.segments[-1] += self._mark_tail
        self._mark_tail = ""
        if self.state == "meta" and self.meta:
            meta, self.meta, self.state = self.meta, "", "content"
            self._feed_content(meta, out)
        if self.state == "tool":
            self._end_tool(out)
        self._emit(self.pending.rstrip(), out)
        self.pending = ""
        self._release(out, final=True)
        return out

    def _track_segments(self, text: str) -> None:
        pieces = (self._mark_tail + text).split(ASSISTANT_MARK)
        for i, piece in enumerate(pieces):
            if i:
                self.segments.append("")
            hold = _overlap(piece, ASSISTANT_MARK) if i == len(pieces) - 1 else 0
            self.segments[-1] += piece[:len(piece) - hold]
            self._mark_tail = piece[len(piece) - hold:]

    # ---- states -----------------------------------------------------------------------------------
    def _feed_meta(self, text: str, out: list[ReplyPart]) -> str:
        self.meta += text
        line, newline, rest = self.meta.partition("\n")
        if not _NAME_CHARS.fullmatch(line.strip()):
            text, self.meta, self.state = self.meta, "", "content"  # not a metadata line: it is content
            return text
        if not newline:
            return ""
        name, self.meta = line.strip(), ""
        if name and name in self.tool_names:
            self.state, self.tool_name, self.tool_text = "tool", name, ""
        else:
            self.state = "content"  # empty metadata, or a name that is not an offered tool: show the content
        return rest

    def _feed_tool(self, text: str, out: list[ReplyPart]) -> str:
        self.tool_text += text
        head, mark, rest = self.tool_text.partition(ASSISTANT_MARK)
        if not mark:
            return ""
        self.tool_text = head
        self._end_tool(out)
        self.state = "meta"
        return rest

    def _end_tool(self, out: list[ReplyPart]) -> None:
        lines = self.tool_text.strip().split("\n")
        code = "\n".join(lines[1:-1]) if len(lines) > 2 and lines[0].startswith("```") else "\n".join(lines)
        arguments = parse_tool_call(code)
        if arguments is None:  # not a call we can read: show what the model wrote
            self._feed_content(f"{self.tool_name}\n{self.tool_text}", out)
        else:
            call = {"name": self.tool_name, "arguments": json.dumps(arguments, ensure_ascii=False)}
            self.tool_calls.append(call)
            out.append(ReplyPart(tool_call=call))
        self.tool_text, self.tool_name, self.state = "", "", "content"

    def _feed_content(self, text: str, out: list[ReplyPart]) -> str:
        self.pending += text
        while True:
            hits = [(self.pending.find(m), m) for m in self._markers()]
            hits = [(i, m) for i, m in hits if i >= 0]
            if not hits:
                break
            i, mark = min(hits)
            before, after = self.pending[:i], self.pending[i + len(mark):]
            if mark in self.stop:
                self._emit(before.rstrip(), out)
                self.pending, self.stopped = "", True
                return ""
            if mark == ASSISTANT_MARK:
                self.pending = before
                self.state = "meta"
                return after
            self.pending = before + TRAINING_TIME[1] + after
        hold = max((_overlap(self.pending, m) for m in self._markers()), default=0)
        safe = self.pending[:len(self.pending) - hold]
        body = safe.rstrip()
        self._emit(body, out)
        self.pending = self.pending[len(body):]
        return ""

    def _emit(self, text: str, out: list[ReplyPart]) -> None:
        if not self.started:
            text = text.lstrip()
        if not text:
            return
        self.started = True
        if self.v1:
            self.raw += text
            self._release(out)
        else:
            self._add(text, out)

    def _release(self, out: list[ReplyPart], final: bool = False) -> None:
        """ChatGLM-6B: return the rewritten content, except a last mark whose next character is still unknown."""
        if not self.v1:
            return
        end = len(self.raw) if final or self.raw[-1:] not in PUNCTUATION_MARKS else len(self.raw) - 1
        if end > self.sent:
            start = max(0, self.sent - 1)  # one character of context before: the rewrite looks one back
            self._add(widen_punctuation(self.raw[start:end + 1])[self.sent - start:end - start], out)
            self.sent = end

    def _add(self, text: str, out: list[ReplyPart]) -> None:
        self.content += text
        if out and out[-1].tool_call is None:
            out[-1].content += text
        else:
            out.append(ReplyPart(content=text))


def _overlap(text: str, marker: str) -> int:
    """Length of the longest end of text that is a proper start of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ---- the original whole-text post-processing, as the parser over the whole text -------------------------
def parse(text: str, **traits) -> ReplyParser:
    """A parser that has read the whole of text."""
    parser = ReplyParser(**traits)
    parser.feed(text)
    parser.finish()
    return parser


def process_response_v2(text: str) -> str:
    """ChatGLM2: the reply stripped, "[[训练时间]]" -> "2023年"."""
    return parse(text).content


def process_response_v1(text: str) -> str:
    """ChatGLM-6B: as ChatGLM2, then ASCII , ! : ; ? next to a CJK character become their full-width forms."""
    return parse(text, widen=True).content


def original_v3_turns(segments: list[str], tools_offered: bool) -> tuple[str | dict, list[dict]]:
    """The original ChatGLM3 reading of a reply's segments: (response, the assistant turns for the history).

    A segment's first line is its metadata (any text, as the original takes it). With metadata the response is
    {"name", "parameters"} when tools were offered and the segment is a readable tool_call(...) in a code block,
    else {"name", "content"}; without, the stripped content.
    """
    response: str | dict = ""
    turns = []
    for segment in segments:
        metadata, content = segment.split("\n", maxsplit=1) if "\n" in segment else ("", segment)
        if not metadata.strip():
            content = content.strip()
            turns.append({"role": "assistant", "metadata": metadata, "content": content})
            response = content.replace(*TRAINING_TIME)
            continue
        turns.append({"role": "assistant", "metadata": metadata, "content": content})
        if tools_offered:
            parameters = parse_tool_call("\n".join(content.split("\n")[1:-1]))
            if parameters is not None:
                response = {"name": metadata.strip(), "parameters": parameters}
                continue
        response = {"name": metadata.strip(), "content": content}
    return response, turns


def tools_offered(history: list[dict]) -> bool:
    return bool(history) and history[0].get("role") == "system" and "tools" in history[0]


def process_response_v3(output: str, history: list[dict]) -> tuple[str | dict, list[dict]]:
    """ChatGLM3: split the reply into assistant turns; a turn with metadata is a tool call (or tool content)."""
    response, turns = original_v3_turns(parse(output, segments=True).segments, tools_offered(history))
    return response, copy.deepcopy(history) + turns
