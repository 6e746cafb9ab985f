"""One chat format per family: messages -> prompt ids, stop ids, sampling defaults, the reply parser, capabilities.

Everything above the decode core asks the family's `ChatFormat` (`format_for(tokenizer.family)`) and never
tests a family's name. Adding a family = a tokenizer, an entry in FORMATS and, if new, the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .reply import ReplyParser, original_v3_turns, parse, process_response_v3, tools_offered

DEFAULT_TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


class ConversationError(ValueError):
    """The messages cannot be turned into a prompt for this model (the message says why)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Message:
    role: str  # system, user, assistant, tool (= observation)
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # assistant: [{"name", "arguments" (JSON text)}]
    metadata: str = ""  # ChatGLM3 assistant turn as the model wrote it: its metadata line (e.g. a tool's name)
    tools: list[dict] | None = None  # ChatGLM3 system message: the tools it offers


@dataclass(frozen=True)
class SamplingDefaults:
    """What a reply samples with when the caller does not say (the original chat()'s defaults)."""

    temperature: float
    top_p: float
    top_k: int = 50  # the original chat() samples through transformers' generate, whose top_k is 50


def render_tool_call(name: str, arguments: str) -> str:
    """An assistant tool call as ChatGLM3 writes it: a python block calling tool_call(**arguments)."""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise ConversationError(f"tool call arguments of {name!r} are not valid JSON: {e}") from e
    if not isinstance(args, dict):
        raise ConversationError(f"tool call arguments of {name!r} must be a JSON object")
    if not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise ConversationError(f"tool call arguments of {name!r} must have identifier keys")
    call = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"```python\ntool_call({call})\n```"


# ---- chat templates (Jinja, as transformers renders tokenizer_config.json's chat_template) ------------------
# Each renders the prompt text of the family's format (ChatFormat.prompt_text) for transformers-style messages;
# what the family cannot express raises through transformers' raise_exception. The prompt always ends ready for
# the assistant's reply, whatever add_generation_prompt says (as apply_chat_template).
_QA_TURNS = r"""
{%- set ns = namespace(systems=[], query=none, rounds=[]) -%}
{%- if tools -%}{{- raise_exception('tool calling needs a ChatGLM3 checkpoint') -}}{%- endif -%}
{%- for m in messages -%}
  {%- set content = m['content'] or '' -%}
  {%- if m['tool_calls'] or m['tools'] or m['role'] in ['tool', 'observation'] -%}
    {{- raise_exception('tool calling needs a ChatGLM3 checkpoint') -}}
  {%- elif m['role'] == 'system' -%}
    {%- set ns.systems = ns.systems + [content] -%}
  {%- elif m['role'] == 'user' -%}
    {%- set ns.query = content if ns.query is none else ns.query ~ '\n' ~ content -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- if ns.query is none -%}{{- raise_exception('an assistant message must follow a user message') -}}{%- endif -%}
    {%- set ns.rounds = ns.rounds + [[ns.query, content]] -%}
    {%- set ns.query = none -%}
  {%- else -%}
    {{- raise_exception('unknown role ' ~ m['role']) -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.query is none -%}{{- raise_exception('the last message must be from the user') -}}{%- endif -%}
{%- set system = ns.systems | join('\n') -%}
{%- set opening = (system ~ '\n') if system else '' -%}
"""
CHATGLM1_TEMPLATE = _QA_TURNS + r"""
{%- if not ns.rounds -%}
  {{- opening ~ ns.query -}}
{%- else -%}
  {%- for r in ns.rounds -%}
    {{- '[Round ' ~ loop.index0 ~ ']\n问：' ~ (opening if loop.first else '') ~ r[0] ~ '\n答：' ~ r[1] ~ '\n' -}}
  {%- endfor -%}
  {{- '[Round ' ~ ns.rounds | length ~ ']\n问：' ~ ns.query ~ '\n答：' -}}
{%- endif -%}
"""
CHATGLM2_TEMPLATE = _QA_TURNS + r"""
{%- for r in ns.rounds -%}
  {{- '[Round ' ~ loop.index ~ ']\n\n问：' ~ (opening if loop.first else '') ~ r[0] ~ '\n\n答：' ~ r[1] ~ '\n\n' -}}
{%- endfor -%}
{{- '[Round ' ~ (ns.rounds | length + 1) ~ ']\n\n问：' ~ ('' if ns.rounds else opening) ~ ns.query ~ '\n\n答：' -}}
"""
# ChatGLM3: [gMASK]sop, then per turn '<|role|> metadata\n content' (the space before metadata and content is
# how the tokenizer's decode shows the pieces' leading '▁'), then <|assistant|>. Top-level tools go to the first
# system message (a default one when there is none), as JSON indented by 4.
CHATGLM3_TEMPLATE = r"""
{%- set ns = namespace(first_system=true) -%}
{%- set has_system = messages | selectattr('role', 'equalto', 'system') | list | length > 0 -%}
{{- '[gMASK]sop' -}}
{%- if tools and not has_system -%}
  {{- '<|system|> \n ' ~ '""" + DEFAULT_TOOL_PROMPT + r"""' ~ '\n' ~ (tools | tojson(indent=4)) -}}
{%- endif -%}
{%- if not messages or messages[-1]['role'] not in ['user', 'tool', 'observation'] -%}
  {{- raise_exception('the last message must be from the user or a tool') -}}
{%- endif -%}
{%- for m in messages -%}
  {%- set content = m['content'] or '' -%}
  {%- set metadata = '' -%}
  {%- if m['role'] == 'system' -%}
    {%- set offered = tools if (tools and ns.first_system) else m['tools'] -%}
    {%- set ns.first_system = false -%}
    {%- if offered -%}{%- set content = content ~ '\n' ~ (offered | tojson(indent=4)) -%}{%- endif -%}
    {%- set role = 'system' -%}
  {%- elif m['role'] == 'user' -%}
    {%- set role = 'user' -%}
  {%- elif m['role'] in ['tool', 'observation'] -%}
    {%- set role = 'observation' -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- if m['tool_calls'] -%}
      {{- raise_exception('assistant tool_calls are not rendered by this template; use apply_chat_template') -}}
    {%- endif -%}
    {%- set metadata = m['metadata'] or '' -%}
    {%- set role = 'assistant' -%}
  {%- else -%}
    {{- raise_exception('unknown role ' ~ m['role']) -}}
  {%- endif -%}
  {{- '<|' ~ role ~ '|> ' ~ metadata ~ '\n' ~ ((' ' ~ content) if content else '') -}}
{%- endfor -%}
{{- '<|assistant|>' -}}
"""


class ChatFormat:
    """A family's chat format. Subclasses fill in the prompt; the rest is shared."""

    family = ""
    display_name = "ChatGLM"
    defaults = SamplingDefaults(temperature=0.8, top_p=0.8)
    has_system_role = False  # a system message is its own turn (else it opens the first question)
    supports_tools = False  # tools, tool calls and tool results (observations)
    reuses_cache = True  # the next turn can be appended to a conversation's KV cache
    chunked_prefill = True  # the prompt is causal, so it can be read a chunk at a time
    segments = False  # the reply is segments with metadata lines (ChatGLM3)
    widen_punctuation = False  # ASCII , ! : ; ? next to CJK text become full-width (ChatGLM-6B)
    chat_template = ""  # Jinja source that renders prompt_text, saved in tokenizer_config.json

    # ---- prompts --------------------------------------------------------------------------------
    def prompt_ids(self, tokenizer, messages: list[Message], tools: list[dict] | None = None,
                   forced_tool: str | None = None) -> list[int]:
        """Prompt ids for a conversation ending in a user (or tool) message, ready for the assistant's reply.

        tools: function definitions ({"name", "description", "parameters"}) offered to the model;
        forced_tool: name of a tool the reply must call.
        """
        self.check(messages, tools, forced_tool)
        return self._prompt_ids(tokenizer, messages, tools, forced_tool)

    def prompt_text(self, tokenizer, messages: list[Message], tools: list[dict] | None = None) -> str:
        """The prompt as text, what the family's chat_template renders (families without roles: the original
        build_prompt text, whose encode() is prompt_ids; ChatGLM3: the ids as its decode() writes them)."""
        self.check(messages, tools)
        return self._prompt_text(tokenizer, messages, tools)

    def check(self, messages: list[Message], tools: list[dict] | None = None, forced_tool: str | None = None):
        """ConversationError for what this family cannot take."""
        if not messages:
            raise ConversationError("messages must not be empty", "messages")
        if not self.supports_tools and (tools or forced_tool or any(
                m.role in ("tool", "observation") or m.tool_calls or m.tools for m in messages)):
            raise ConversationError(f"tool calling needs a ChatGLM3 checkpoint; this model is {self.display_name}",
                                    "tools")

    def _prompt_ids(self, tokenizer, messages, tools, forced_tool) -> list[int]:
        return tokenizer.encode(self._prompt_text(tokenizer, messages, tools))

    def _prompt_text(self, tokenizer, messages, tools) -> str:
        return tokenizer.build_prompt(*question_answer_turns(messages))

    def turn_ids(self, tokenizer, query: str, history: list, role: str = "user", cached: bool = False) -> list[int]:
        """The original chat API: ids of query after history (in the family's history form). With cached, the
        history already sits in the KV cache and only the new turn is returned."""
        if cached and history:
            return tokenizer.build_continuation_ids(query, history)
        return tokenizer.encode(tokenizer.build_prompt(query, history))

    def stop_ids(self, tokenizer) -> list[int]:
        return list(tokenizer.reply_stop_ids())

    def system_messages(self, system: str) -> list[Message]:
        """A system prompt as the opening messages of a conversation (none when the family has no system turn)."""
        return [Message("system", system)] if system.strip() and self.has_system_role else []

    # ---- replies --------------------------------------------------------------------------------
    def parser(self, stop: list[str] | None = None, tool_names: list[str] | None = None,
               forced_tool: str | None = None) -> ReplyParser:
        return ReplyParser(segments=self.segments, widen=self.widen_punctuation, stop=stop,
                           tool_names=tool_names if self.supports_tools else None,
                           forced_tool=forced_tool if self.supports_tools else None)

    def chat_result(self, parser: ReplyParser, query: str, history: list, role: str = "user"):
        """The original chat API's (response, new history) for the reply the parser has read so far."""
        return parser.content, list(history) + [(query, parser.content)]

    def process_response(self, text: str, history: list | None = None):
        """The original whole-text post-processing (ChatGLM2 / ChatGLM-6B: the text only; ChatGLM3: with the
        history, returning (response, history))."""
        return parse(text, segments=self.segments, widen=self.widen_punctuation).content


def question_answer_turns(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """Families without roles: question/answer rounds; system text opens the first question."""
    system = "\n".join(m.content for m in messages if m.role == "system")
    history: list[tuple[str, str]] = []
    query: str | None = None
    for m in messages:
        if m.role == "user":
            query = m.content if query is None else query + "\n" + m.content
        elif m.role == "assistant":
            if query is None:
                raise ConversationError("an assistant message must follow a user message", "messages")
            history.append((query, m.content))
            query = None
        elif m.role != "system":
            raise ConversationError(f"unknown role {m.role!r}", "messages")
    if query is None:
        raise ConversationError("the last message must be from the user", "messages")
    if system:
        if history:
            history[0] = (system + "\n" + history[0][0], history[0][1])
        else:
            query = system + "\n" + query
    return query, history


class ChatGLM1Format(ChatFormat):
    family = "chatglm1"
    chat_template = CHATGLM1_TEMPLATE
    display_name = "ChatGLM-6B"
    defaults = SamplingDefaults(temperature=0.95, top_p=0.7)
    reuses_cache = False  # its 2-D positions restart each prompt: a conversation is re-read every turn
    chunked_prefill = False  # the prompt attends to itself both ways: read whole
    widen_punctuation = True

    def turn_ids(self, tokenizer, query, history, role="user", cached=False):
        if cached:
            raise ValueError("ChatGLM-6B re-reads the whole conversation each turn: pass past_key_values=None")
        return tokenizer.encode(tokenizer.build_prompt(query, history))


class ChatGLM2Format(ChatFormat):
    family = "chatglm2"
    chat_template = CHATGLM2_TEMPLATE
    display_name = "ChatGLM2-6B"


class ChatGLM3Format(ChatFormat):
    family = "chatglm3"
    display_name = "ChatGLM3-6B"
    has_system_role = True
    supports_tools = True
    segments = True
    chat_template = CHATGLM3_TEMPLATE

    def _prompt_text(self, tokenizer, messages, tools):
        return tokenizer.decode(self._prompt_ids(tokenizer, messages, tools, None))

    def _prompt_ids(self, tokenizer, messages, tools, forced_tool):
        history: list[dict] = []
        for m in messages:
            if m.role == "system":
                history.append({"role": "system", "content": m.content, **({"tools": m.tools} if m.tools else {})})
            elif m.role == "user":
                history.append({"role": "user", "content": m.content})
            elif m.role in ("tool", "observation"):
                history.append({"role": "observation", "content": m.content})
            elif m.role == "assistant":
                if m.metadata or m.content or not m.tool_calls:
                    history.append({"role": "assistant", "metadata": m.metadata, "content": m.content})
                for call in m.tool_calls:
                    history.append({"role": "assistant", "metadata": call["name"],
                                    "content": render_tool_call(call["name"], call.get("arguments") or "")})
            else:
                raise ConversationError(f"unknown role {m.role!r}", "messages")
        if tools:
            system = next((h for h in history if h["role"] == "system"), None)
            if system is None:
                system = {"role": "system", "content": DEFAULT_TOOL_PROMPT}
                history.insert(0, system)
            system["tools"] = tools
        last = history.pop()
        if last["role"] not in ("user", "observation"):
            raise ConversationError("the last message must be from the user or a tool", "messages")
        ids = tokenizer.build_chat_ids(last["content"], history, last["role"])
        if forced_tool:
            ids += tokenizer.sp.encode(f"{forced_tool}\n")
        return ids

    def turn_ids(self, tokenizer, query, history, role="user", cached=False):
        # On a reused cache only the new turn is sent (the original re-sends [gMASK] sop).
        return tokenizer.build_chat_ids(query, [] if cached else history, role, prefix=not cached)

    def chat_result(self, parser, query, history, role="user"):
        response, turns = original_v3_turns(parser.segments, tools_offered(history))
        return response, list(history) + [{"role": role, "content": query}] + turns

    def process_response(self, text, history=None):
        return process_response_v3(text, history or [])


FORMATS: dict[str, ChatFormat] = {f.family: f for f in (ChatGLM1Format(), ChatGLM2Format(), ChatGLM3Format())}


def format_for(family: str) -> ChatFormat:
    """The chat format of a family (its tokenizer's `family`)."""
    try:
        return FORMATS[family]
    except KeyError:
        raise ValueError(f"no chat format for the family {family!r}; known: {', '.join(FORMATS)}") from None


def build_prompt_ids(tokenizer, messages: list[Message], tools: list[dict] | None = None,
                     forced_tool: str | None = None) -> list[int]:
    """format_for(tokenizer.family).prompt_ids(...)."""
    return format_for(tokenizer.family).prompt_ids(tokenizer, messages, tools, forced_tool)


def reply_parser(family: str, stop: list[str] | None = None, tool_names: list[str] | None = None,
                 forced_tool: str | None = None) -> ReplyParser:
    """format_for(family).parser(...)."""
    return format_for(family).parser(stop, tool_names, forced_tool)
