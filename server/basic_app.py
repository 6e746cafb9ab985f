"""The original ChatGLM API: POST / {prompt, history, max_length, top_p, temperature} -> {response, history, ...}."""

from __future__ import annotations

import datetime

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.conversation import ConversationError, Message, ReplyParser, build_prompt_ids
from model.engine import GenerationRequest
from model.generation import SamplingParams

from .protocol import MAX_MESSAGES, checked_body
from .http import APIError, Settings, events_until_disconnect, install_common, raise_for_engine_error, submit


class Turn(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "tools" on a system message
    role: str
    content: str
    metadata: str = ""


class BasicRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    history: list[tuple[str, str] | Turn] = Field(default_factory=list)  # v2 pairs, or v3 role messages
    max_length: int | None = Field(default=None, ge=1)  # prompt + reply, in tokens (as the original)
    top_p: float = Field(default=0.7, gt=0.0, le=1.0)
    temperature: float = Field(default=0.95, ge=0.0, le=2.0)

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data):
        return checked_body(data, "history", MAX_MESSAGES)


def _v3_history(body: BasicRequest) -> list[dict]:
    """v3 role messages as the model's chat() takes them; [question, answer] pairs become user/assistant turns."""
    turns = []
    for i, item in enumerate(body.history):
        if isinstance(item, Turn):
            if item.role not in ("system", "user", "assistant", "observation"):
                raise APIError(400, f"history[{i}]: unknown role {item.role!r}", param=f"history.{i}.role")
            turns.append(item.model_dump(exclude_unset=True))
        else:
            turns += [{"role": "user", "content": item[0]},
                      {"role": "assistant", "metadata": "", "content": item[1]}]
    return turns


def prompt_ids(engine, body: BasicRequest) -> list[int]:
    if engine.family == "chatglm3":
        return engine.tokenizer.build_chat_ids(body.prompt, _v3_history(body))
    if any(isinstance(h, Turn) for h in body.history):
        raise APIError(400, "role-message history needs a ChatGLM3 checkpoint; send [question, answer] pairs",
                       param="history")
    messages = [Message(role, text) for q, a in body.history for role, text in (("user", q), ("assistant", a))]
    try:
        return build_prompt_ids(engine.tokenizer, messages + [Message("user", body.prompt)])
    except ConversationError as e:
        raise APIError(400, str(e), param="history") from e


def new_history(engine, body: BasicRequest, response: str) -> list:
    if engine.family == "chatglm3":
        return _v3_history(body) + [{"role": "user", "content": body.prompt},
                                    {"role": "assistant", "metadata": "", "content": response}]
    return [list(h) for h in body.history] + [[body.prompt, response]]


def create_app(engine, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="ChatGLM API", docs_url=None, redoc_url=None, openapi_url=None)
    install_common(app, settings)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name}

    @app.post("/")
    async def chat(body: BasicRequest, request: Request):
        ids = await run_in_threadpool(prompt_ids, engine, body)  # off the event loop: other streams keep flowing
        limit = min(body.max_length or engine.context_length, engine.context_length)
        if len(ids) >= limit:
            raise APIError(400, f"the prompt and history take {len(ids)} tokens, which leaves no room for a reply "
                                f"within max_length {limit}", param="max_length")
        greedy = body.temperature == 0
        params = SamplingParams(do_sample=not greedy, temperature=body.temperature if not greedy else 1.0,
                                top_p=body.top_p)
        (handle,) = submit(engine, [GenerationRequest(ids, params, limit - len(ids),
                                                      tuple(engine.tokenizer.reply_stop_ids()))])
        parser = ReplyParser(engine.family)
        response = ""
        async for event in events_until_disconnect(handle, request):
            raise_for_engine_error(event)
            parts = parser.feed(event.text) + (parser.finish() if event.finish else [])
            response += "".join(p.content for p in parts)
            if event.finish == "cancelled":
                return None  # the client left
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return {"response": response, "history": new_history(engine, body, response), "status": 200,
                "time": now}

    return app
