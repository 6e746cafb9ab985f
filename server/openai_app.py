"""OpenAI-compatible chat completions over the shared engine: create_app(engine, settings)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from model.service import Completion, CompletionSettings, ConversationError, Finish, Message

from .http import APIError, Settings, as_service, error_json, install_common, parts_until_disconnect, start
from .protocol import MAX_STOP, ChatCompletionRequest

logger = logging.getLogger(__name__)


def create_app(engine, settings: Settings | None = None) -> FastAPI:
    """The app over an engine (or a LocalService)."""
    settings = settings or Settings()
    service = as_service(engine)
    app = FastAPI(title="ChatGLM OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    install_common(app, settings)
    created = int(time.time())

    def model_card() -> dict:
        return {"id": service.model_name, "object": "model", "created": created, "owned_by": "chatglm",
                "context_length": service.context_length}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != service.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {service.model_name!r}",
                           type="invalid_request_error", param="model", code="model_not_found")
        return model_card()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(service.engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        # Tokenizing a long conversation takes a while: off the event loop, so other streams keep flowing.
        plan = await run_in_threadpool(plan_completion, service, body)
        completions = start(service, plan.messages, plan.settings, n=body.n, prompt_ids=plan.prompt_ids)
        if body.stream:
            return StreamingResponse(stream_chunks(service, plan, completions), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await asyncio.gather(*(collect_choice(i, c, request) for i, c in enumerate(completions)))
        finally:
            for c in completions:
                c.cancel()
        if any(c is None for c in choices):  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        completion = sum(c.pop("_tokens") for c in choices)
        return {"id": plan.id, "object": "chat.completion", "created": plan.created, "model": service.model_name,
                "choices": choices, "usage": usage(plan.prompt_tokens, completion),
                "system_fingerprint": None}

    return app


# ---- planning: request -> messages, settings and the prompt --------------------------------------------
class Plan:
    def __init__(self, body: ChatCompletionRequest, messages: list[Message], settings: CompletionSettings,
                 prompt_ids: list[int]):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.messages, self.settings, self.prompt_ids = messages, settings, prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)


def _messages(body: ChatCompletionRequest) -> list[Message]:
    out = []
    for i, m in enumerate(body.messages):
        role = {"developer": "system", "observation": "tool", "function": "tool"}.get(m.role, m.role)
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls or []]
        if role != "assistant" and calls:
            raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls",
                           param=f"messages.{i}.tool_calls")
        if role != "assistant" and m.content is None:
            raise APIError(400, f"messages[{i}]: a {m.role} message needs content", param=f"messages.{i}.content")
        out.append(Message(role=role, content=m.text(), tool_calls=calls))
    return out


def _tools(body: ChatCompletionRequest) -> tuple[list[dict], str | None]:
    """Tools offered in the prompt, and the tool the reply must call (tool_choice)."""
    tools = [t.function.model_dump() for t in body.tools or []]
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    choice = body.tool_choice
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return [], None
    if not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if choice == "required":
        if len(tools) != 1:
            raise APIError(400, "tool_choice 'required' is supported with exactly one tool; name the function "
                                "to call instead", param="tool_choice")
        return tools, names[0]
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                       param="tool_choice")
    return tools, choice.function.name


def plan_completion(service, body: ChatCompletionRequest) -> Plan:
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "only response_format 'text' is supported", param="response_format")
    stops = body.stop_list()
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise APIError(400, f"stop: give at most {MAX_STOP} non-empty strings", param="stop")
    tools, forced = _tools(body)
    settings = CompletionSettings(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        max_tokens=body.max_completion_tokens or body.max_tokens, seed=body.seed,
        repetition_penalty=body.repetition_penalty or 1.0, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, stop=stops, tools=tools or None, forced_tool=forced)
    messages = _messages(body)
    try:
        prompt_ids = service.prompt_ids(messages, settings)
    except ConversationError as e:
        code = "context_length_exceeded" if e.param in ("messages", "max_tokens") and "context" in str(e) else None
        raise APIError(400, str(e), param=e.param, code=code) from e
    return Plan(body, messages, settings, prompt_ids)


# ---- running one choice ------------------------------------------------------------------------------
async def collect_choice(index: int, completion: Completion, request: Request) -> dict | None:
    content, calls = "", []
    async for item in parts_until_disconnect(completion, request):
        if not isinstance(item, Finish):
            if item.tool_call is not None:
                calls.append(tool_call_json(item.tool_call))
            content += item.content
        elif item.reason == "cancelled":
            return None
        elif item.reason == "error":
            raise APIError(500, f"generation failed: {item.error}", type="server_error")
        else:
            message = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                message["tool_calls"] = calls
            return {"index": index, "message": message, "logprobs": None, "finish_reason": item.reason,
                    "_tokens": item.completion_tokens}
    return None


def tool_call_json(call: dict, index: int | None = None) -> dict:
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call["name"], "arguments": call["arguments"]}}
    if index is not None:
        out = {"index": index, **out}
    return out


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def stream_chunks(service, plan: Plan, completions: list[Completion]):
    """Server-sent events: a role delta, content / tool-call deltas, a finish chunk per choice, usage, [DONE]."""

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        body = {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created,
                "model": service.model_name, "system_fingerprint": None, "choices": choices}
        if plan.include_usage:
            body["usage"] = usage_
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, completion: Completion):
        try:
            async for item in completion:
                await merged.put((index, item))
        except Exception as e:  # the service failed mid-stream: the client gets an error event, not a quiet end
            logger.exception("a streamed completion failed")
            await merged.put((index, Finish("error", error=f"{type(e).__name__}: {e}")))
        finally:
            await merged.put((index, None))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(completions)]
    try:
        for i in range(len(completions)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        open_choices, completion, tool_counts = len(completions), 0, [0] * len(completions)
        while open_choices:
            index, item = await merged.get()
            if item is None:
                open_choices -= 1
            elif not isinstance(item, Finish):
                if item.tool_call is not None:
                    call = tool_call_json(item.tool_call, tool_counts[index])
                    tool_counts[index] += 1
                    yield chunk([{"index": index, "delta": {"tool_calls": [call]}, "logprobs": None,
                                  "finish_reason": None}])
                if item.content:
                    yield chunk([{"index": index, "delta": {"content": item.content}, "logprobs": None,
                                  "finish_reason": None}])
            elif item.reason == "error":
                yield f"data: {json.dumps(error_json(f'generation failed: {item.error}', 'server_error'))}\n\n"
            elif item.reason != "cancelled":
                completion += item.completion_tokens
                yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": item.reason}])
        if plan.include_usage:
            yield chunk([], usage(plan.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away and the response was cancelled
        for c in completions:
            c.cancel()
        for t in tasks:
            t.cancel()


# ---- metrics -----------------------------------------------------------------------------------------
def prometheus_text(engine) -> str:
    s = engine.stats
    ttft = sorted(s.ttft_seconds)
    lines = [
        "# HELP chatglm_queue_depth Requests waiting for the engine.", "# TYPE chatglm_queue_depth gauge",
        f"chatglm_queue_depth {s.queued}",
        "# HELP chatglm_running_sequences Sequences being generated.", "# TYPE chatglm_running_sequences gauge",
        f"chatglm_running_sequences {s.running}",
        "# HELP chatglm_max_batch Sequences that may be decoded together.", "# TYPE chatglm_max_batch gauge",
        f"chatglm_max_batch {engine.max_batch}",
        "# HELP chatglm_kv_cache_bytes Memory held by the batch KV cache.", "# TYPE chatglm_kv_cache_bytes gauge",
        f"chatglm_kv_cache_bytes {engine.cache.nbytes()}",
        "# HELP chatglm_requests_total Requests accepted.", "# TYPE chatglm_requests_total counter",
        f"chatglm_requests_total {s.requests_total}",
        "# HELP chatglm_prompt_tokens_total Prompt tokens read.", "# TYPE chatglm_prompt_tokens_total counter",
        f"chatglm_prompt_tokens_total {s.prompt_tokens}",
        "# HELP chatglm_generated_tokens_total Tokens generated.", "# TYPE chatglm_generated_tokens_total counter",
        f"chatglm_generated_tokens_total {s.tokens_generated}",
        "# HELP chatglm_time_to_first_token_seconds Time to first token over recent requests.",
        "# TYPE chatglm_time_to_first_token_seconds summary",
    ]
    for q in (0.5, 0.95):
        value = ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
        lines.append(f'chatglm_time_to_first_token_seconds{{quantile="{q}"}} {value}')
    lines += [f"chatglm_time_to_first_token_seconds_sum {sum(ttft)}",
              f"chatglm_time_to_first_token_seconds_count {len(ttft)}"]
    return "\n".join(lines) + "\n"
