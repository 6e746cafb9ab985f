"""OpenAI-compatible chat completions over the shared engine: create_app(engine, settings)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from model.conversation import ConversationError, Message, ReplyParser, build_prompt_ids
from model.engine import GenerationRequest, RequestHandle
from model.generation import SamplingParams

from .http import (APIError, Settings, error_json, events_until_disconnect, install_common, raise_for_engine_error,
                   submit)
from .protocol import MAX_STOP, ChatCompletionRequest, ChatMessage

DEFAULT_TEMPERATURE = 0.8  # ChatGLM's own defaults (the original chat() and demos)
DEFAULT_TOP_P = 0.8


def create_app(engine, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="ChatGLM OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    install_common(app, settings)
    created = int(time.time())

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "chatglm",
                "context_length": engine.context_length}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {engine.model_name!r}",
                           type="invalid_request_error", param="model", code="model_not_found")
        return model_card()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        # Tokenizing a long conversation takes a while: off the event loop, so other streams keep flowing.
        plan = await run_in_threadpool(plan_completion, engine, body)
        handles = submit(engine, plan.requests)
        if body.stream:
            return StreamingResponse(stream_chunks(engine, plan, handles), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await asyncio.gather(*(collect_choice(engine, i, h, plan, request) for i, h in enumerate(handles)))
        finally:
            for h in handles:
                h.cancel()
        if any(c is None for c in choices):  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        completion = sum(c.pop("_tokens") for c in choices)
        return {"id": plan.id, "object": "chat.completion", "created": plan.created, "model": engine.model_name,
                "choices": choices, "usage": usage(plan.prompt_tokens, completion),
                "system_fingerprint": None}

    return app


# ---- planning: request -> prompt ids and generation requests -----------------------------------------
class Plan:
    def __init__(self, body: ChatCompletionRequest, prompt_ids: list[int], requests: list[GenerationRequest],
                 tool_names: list[str], forced_tool: str | None):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.body = body
        self.prompt_tokens = len(prompt_ids)
        self.requests = requests
        self.tool_names = tool_names
        self.forced_tool = forced_tool
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def parser(self, engine) -> ReplyParser:
        return ReplyParser(engine.family, stop=self.body.stop_list(), tool_names=self.tool_names,
                           forced_tool=self.forced_tool)


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


def plan_completion(engine, body: ChatCompletionRequest) -> Plan:
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "only response_format 'text' is supported", param="response_format")
    stops = body.stop_list()
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise APIError(400, f"stop: give at most {MAX_STOP} non-empty strings", param="stop")
    tools, forced = _tools(body)
    try:
        prompt_ids = build_prompt_ids(engine.tokenizer, _messages(body), tools or None, forced)
    except ConversationError as e:
        raise APIError(400, str(e), param=e.param) from e
    limit, prompt = engine.context_length, len(prompt_ids)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if prompt >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens; the messages take {prompt} "
                            f"tokens. Shorten the conversation.", param="messages", code="context_length_exceeded")
    if max_tokens is not None and prompt + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens; you asked for {prompt + max_tokens}"
                            f" ({prompt} in the messages, {max_tokens} in the completion). Lower max_tokens or "
                            f"shorten the conversation.", param="max_tokens", code="context_length_exceeded")
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    top_p = DEFAULT_TOP_P if body.top_p is None else body.top_p
    greedy = temperature == 0 or top_p == 0
    stop_ids = engine.tokenizer.reply_stop_ids()
    requests = []
    for i in range(body.n):
        seed = None if body.seed is None else (body.seed + i) % 2**64
        params = SamplingParams(do_sample=not greedy, temperature=temperature if not greedy else 1.0,
                                top_p=top_p if not greedy else 1.0, top_k=body.top_k or 0,
                                repetition_penalty=body.repetition_penalty or 1.0, seed=seed)
        requests.append(GenerationRequest(list(prompt_ids), params, max_tokens or limit - prompt, tuple(stop_ids),
                                          presence_penalty=body.presence_penalty,
                                          frequency_penalty=body.frequency_penalty))
    return Plan(body, prompt_ids, requests, [t["name"] for t in tools], forced)


# ---- running one choice ------------------------------------------------------------------------------
async def choice_parts(handle: RequestHandle, parser: ReplyParser, events):
    """Yield ("content", text) / ("tool_call", call) and finally ("finish", reason, completion tokens)."""
    async for event in events:
        raise_for_engine_error(event)
        parts = parser.feed(event.text)
        if parser.stopped:
            handle.cancel()  # a stop string matched: no need to generate further
        if event.finish is not None:
            parts += parser.finish()
        for part in parts:
            if part.tool_call is not None:
                yield ("tool_call", part.tool_call)
            elif part.content:
                yield ("content", part.content)
        if event.finish is not None:
            if event.finish == "cancelled" and not parser.stopped:
                yield ("cancelled", None, event.completion_tokens)
                return
            reason = "tool_calls" if parser.tool_calls else ("stop" if parser.stopped else event.finish)
            yield ("finish", reason, event.completion_tokens)
            return


async def collect_choice(engine, index: int, handle: RequestHandle, plan: Plan, request: Request) -> dict | None:
    content, calls = "", []
    async for part in choice_parts(handle, plan.parser(engine), events_until_disconnect(handle, request)):
        if part[0] == "content":
            content += part[1]
        elif part[0] == "tool_call":
            calls.append(tool_call_json(part[1]))
        elif part[0] == "cancelled":
            return None
        else:
            message = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                message["tool_calls"] = calls
            return {"index": index, "message": message, "logprobs": None, "finish_reason": part[1],
                    "_tokens": part[2]}
    return None


def tool_call_json(call: dict, index: int | None = None) -> dict:
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
           "function": {"name": call["name"], "arguments": call["arguments"]}}
    if index is not None:
        out = {"index": index, **out}
    return out


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def stream_chunks(engine, plan: Plan, handles: list[RequestHandle]):
    """Server-sent events: a role delta, content / tool-call deltas, a finish chunk per choice, usage, [DONE]."""

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        body = {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created,
                "model": engine.model_name, "system_fingerprint": None, "choices": choices}
        if plan.include_usage:
            body["usage"] = usage_
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle):
        try:
            async for part in choice_parts(handle, plan.parser(engine), handle):
                await merged.put((index, part))
        except APIError as e:
            await merged.put((index, ("error", e.message)))
        finally:
            await merged.put((index, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for i in range(len(handles)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        open_choices, completion, tool_counts = len(handles), 0, [0] * len(handles)
        while open_choices:
            index, part = await merged.get()
            if part is None:
                open_choices -= 1
                continue
            kind = part[0]
            if kind == "content":
                yield chunk([{"index": index, "delta": {"content": part[1]}, "logprobs": None,
                              "finish_reason": None}])
            elif kind == "tool_call":
                call = tool_call_json(part[1], tool_counts[index])
                tool_counts[index] += 1
                yield chunk([{"index": index, "delta": {"tool_calls": [call]}, "logprobs": None,
                              "finish_reason": None}])
            elif kind == "finish":
                completion += part[2]
                yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": part[1]}])
            elif kind == "error":
                yield f"data: {json.dumps(error_json(part[1], 'server_error'))}\n\n"
        if plan.include_usage:
            yield chunk([], usage(plan.prompt_tokens, completion))
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away and the response was cancelled
        for h in handles:
            h.cancel()
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
