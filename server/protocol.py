"""Request bodies of the OpenAI-compatible chat API (pydantic, only at the HTTP boundary)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.tokenizer import replace_lone_surrogates

MAX_STOP = 4  # as the OpenAI API
MAX_N = 8
MAX_MESSAGES = 4096  # every message costs a few tokens: more never fit a context, and would be validated for nothing


def replace_lone_surrogates_in(value):
    """JSON strings may hold lone UTF-16 surrogates ("\\ud800"), which no text can encode: U+FFFD in their place."""
    if isinstance(value, str):
        return replace_lone_surrogates(value)
    if isinstance(value, list):
        return [replace_lone_surrogates_in(v) for v in value]
    if isinstance(value, dict):
        return {replace_lone_surrogates_in(k): replace_lone_surrogates_in(v) for k, v in value.items()}
    return value


def checked_body(data, list_field: str, limit: int):
    """A request body before validation: lone surrogates replaced, and a list field over its limit refused early."""
    if isinstance(data, dict):
        items = data.get(list_field)
        if isinstance(items, list) and len(items) > limit:
            raise ValueError(f"{list_field}: at most {limit} items are accepted, got {len(items)}")
    return replace_lone_surrogates_in(data)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, store, ...)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = ""


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "observation", "function"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    parameters: dict = Field(default_factory=dict)


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: str = "text"


class ChatCompletionRequest(_Body):
    model: str | None = None  # any name is accepted; the loaded model answers
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceFunction, None] = None
    logprobs: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data):
        return checked_body(data, "messages", MAX_MESSAGES)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
