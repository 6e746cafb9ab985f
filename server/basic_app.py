"""The original ChatGLM API: POST / {prompt, history, max_length, top_p, temperature} -> {response, history, ...}."""

from __future__ import annotations

import datetime

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.service import CompletionSettings, Finish, Message

from .http import APIError, Settings, as_service, install_common, parts_until_disconnect, start
from .protocol import MAX_MESSAGES, checked_body


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
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # None: the family's default
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)  # the same seed and settings: the same reply

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data):
        return checked_body(data, "history", MAX_MESSAGES)


def messages_of(service, body: BasicRequest) -> list[Message]:
    """The history ([question, answer] pairs or role messages) and the prompt as messages."""
    if not service.capabilities.has_system_role and any(isinstance(h, Turn) for h in body.history):
        raise APIError(400, f"role-message history needs a ChatGLM3 checkpoint; this model is "
                            f"{service.capabilities.display_name}: send [question, answer] pairs", param="history")
    messages = []
    for i, item in enumerate(body.history):
        if isinstance(item, Turn):
            if item.role not in ("system", "user", "assistant", "observation"):
                raise APIError(400, f"history[{i}]: unknown role {item.role!r}", param=f"history.{i}.role")
            messages.append(Message(item.role, item.content, metadata=item.metadata,
                                    tools=(item.model_extra or {}).get("tools")))
        else:
            messages += [Message("user", item[0]), Message("assistant", item[1])]
    return messages + [Message("user", body.prompt)]


def new_history(service, body: BasicRequest, response: str) -> list:
    """The history sent back: in the form the request used, or the family's own (role messages with a system
    turn; [question, answer] pairs without)."""
    if service.capabilities.has_system_role:
        turns = [item.model_dump(exclude_unset=True) if isinstance(item, Turn) else None for item in body.history]
        history = []
        for item, turn in zip(body.history, turns):
            history += [turn] if turn is not None else [{"role": "user", "content": item[0]},
                                                        {"role": "assistant", "metadata": "", "content": item[1]}]
        return history + [{"role": "user", "content": body.prompt},
                          {"role": "assistant", "metadata": "", "content": response}]
    return [list(h) for h in body.history] + [[body.prompt, response]]


def create_app(engine, settings: Settings | None = None) -> FastAPI:
    """The app over an engine (or a LocalService)."""
    settings = settings or Settings()
    service = as_service(engine)
    app = FastAPI(title="ChatGLM API", docs_url=None, redoc_url=None, openapi_url=None)
    install_common(app, settings)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name}

    @app.post("/")
    async def chat(body: BasicRequest, request: Request):
        messages = messages_of(service, body)
        reply = CompletionSettings(temperature=body.temperature, top_p=body.top_p, max_length=body.max_length,
                                   seed=body.seed)
        # The prompt is built off the event loop: other streams keep flowing.
        ids = await run_in_threadpool(prompt_ids, service, messages, reply)
        (completion,) = start(service, messages, reply, prompt_ids=ids)
        response = ""
        async for item in parts_until_disconnect(completion, request):
            if not isinstance(item, Finish):
                response += item.content
            elif item.reason == "cancelled":
                return None  # the client left
            elif item.reason == "error":
                raise APIError(500, f"generation failed: {item.error}", type="server_error")
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return {"response": response, "history": new_history(service, body, response), "status": 200,
                "time": now}

    return app


def prompt_ids(service, messages, reply) -> list[int]:
    try:
        return service.prompt_ids(messages, reply)
    except ValueError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None)) from e
