"""The completion service answered by any OpenAI-compatible server (ours, vLLM, ...): `RemoteService`.

It gives the same interface as `model.service.LocalService` (`start`, `complete`, `close`, `model_name`,
`context_length`, `capabilities`, `max_queue`), so a front end runs unchanged against a model on another
machine. Only the standard library is used (http.client, threads, a queue).

Each completion is one `POST {api_base}/chat/completions` with `stream: true`: a reader thread parses the server-
sent events into `ReplyPart`s and one `Finish`; `cancel()` (from any thread) ends the iteration at once and shuts the
connection down, so the server sees the client leave and stops generating.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import socket
import ssl
import threading
import urllib.parse
import uuid

from .formats import ConversationError, Message
from .reply import ReplyPart
from .service import Capabilities, Completion, CompletionSettings, Finish, ServiceBusy, ServiceError, \
    ServiceUnavailable

__all__ = ["RemoteCompletion", "RemoteService", "SSEReader", "chat_request", "openai_messages", "sse_data"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds to open a connection (a down or unreachable server is told quickly)
DEFAULT_MAX_QUEUE = 32  # concurrent replies the web demos may keep open (the server queues or refuses beyond)
FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls"}


# ---- the request: messages and settings as OpenAI JSON -----------------------------------------------
def openai_messages(messages: list[Message]) -> list[dict]:
    """Messages in the OpenAI shape. Assistant tool calls get ids; each following tool message answers the next
    call id in turn (OpenAI servers want `tool_call_id`). ChatGLM3 metadata lines have no OpenAI field: dropped."""
    out, pending = [], []
    for m in messages:
        role = "tool" if m.role == "observation" else m.role
        if role == "assistant" and m.tool_calls:
            calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": c["name"], "arguments": c.get("arguments") or "{}"}} for c in m.tool_calls]
            pending = [c["id"] for c in calls]
            out.append({"role": "assistant", "content": m.content or None, "tool_calls": calls})
        elif role == "tool":
            call_id = pending.pop(0) if pending else f"call_{uuid.uuid4().hex[:24]}"
            out.append({"role": "tool", "content": m.content, "tool_call_id": call_id})
        else:
            out.append({"role": role, "content": m.content})
    return out


def chat_request(model: str, messages: list[Message], settings: CompletionSettings,
                 context_length: int | None = None) -> dict:
    """The streamed chat completion request body. Settings left None are not sent (the server's defaults apply).

    max_length (prompt and reply together) has no OpenAI field, and the prompt's length in tokens is only known to
    the server: at or above the server's context length it is no limit at all and is dropped; below it (or when the
    context length is unknown) it is not enforced remotely (use max_tokens)."""
    tools = list(settings.tools or [])
    for m in messages:  # a ChatGLM3 system message that carries its own tools offers them too
        tools += [t for t in m.tools or [] if t.get("name") not in {x.get("name") for x in tools}]
    body: dict = {"model": model, "messages": openai_messages(messages), "stream": True,
                  "stream_options": {"include_usage": True}}
    for key in ("temperature", "top_p", "top_k", "max_tokens", "seed"):
        value = getattr(settings, key)
        if value is not None:
            body[key] = value
    if settings.max_length is not None and (context_length is None or settings.max_length < context_length):
        log.info("max_length %s is not enforced by a remote server (its context length: %s); use max_tokens",
                 settings.max_length, context_length)
    if settings.repetition_penalty != 1.0:
        body["repetition_penalty"] = settings.repetition_penalty  # not OpenAI's, but ours and vLLM's
    if settings.presence_penalty:
        body["presence_penalty"] = settings.presence_penalty
    if settings.frequency_penalty:
        body["frequency_penalty"] = settings.frequency_penalty
    if settings.stop:
        body["stop"] = list(settings.stop)
    if tools:
        body["tools"] = [{"type": "function", "function": t} for t in tools]
    if settings.forced_tool:
        body["tool_choice"] = {"type": "function", "function": {"name": settings.forced_tool}}
    return body


# ---- the reply: server-sent events -> ReplyParts and a Finish ---------------------------------------
DONE = object()


def sse_data(line: str):
    """One line of an event stream: the decoded JSON of a `data:` line, DONE for `data: [DONE]`, None for
    anything else (blank lines, comments, `event:` / `id:` fields)."""
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data:
        return None
    if data == "[DONE]":
        return DONE
    return json.loads(data)


class SSEReader:
    """Feed event-stream lines (one choice: index 0); get ReplyParts and, at the end, one Finish.

    Content deltas come out as they arrive; tool calls are assembled from their deltas (by index) and come out
    whole ({"name", "arguments"}) once the choice finishes or the next call begins. An `error` object in the stream
    ends it with Finish("error"); a stream that ends before [DONE] without a finish reason is an error too."""

    def __init__(self):
        self.reason: str | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.calls: dict[int, dict] = {}  # index -> {"name", "arguments"} being assembled
        self.sent_calls = 0
        self.tool_calls = 0
        self.finish: Finish | None = None

    def feed(self, line: str) -> list:
        if self.finish is not None:
            return []
        try:
            event = sse_data(line)
        except json.JSONDecodeError:
            return self._end(Finish("error", error=f"the server sent an event that is not JSON: {line[:200]!r}"))
        if event is None:
            return []
        if event is DONE:
            return self.end()
        if not isinstance(event, dict):
            return []
        if event.get("error"):
            return self._flush_calls() + self._end(Finish("error", self.prompt_tokens, self.completion_tokens,
                                                          error_message(event)))
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens") or 0
            self.completion_tokens = usage.get("completion_tokens") or 0
        out: list = []
        for choice in event.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for call in delta.get("tool_calls") or []:
                out += self._call_delta(call)
            if delta.get("content"):
                out.append(ReplyPart(content=delta["content"]))
            if choice.get("finish_reason"):
                self.reason = choice["finish_reason"]
                out += self._flush_calls()
        return out

    def _call_delta(self, call: dict) -> list:
        index = call.get("index", len(self.calls))
        out = self._flush_calls(below=index) if index not in self.calls else []
        function = call.get("function") or {}
        entry = self.calls.setdefault(index, {"name": "", "arguments": ""})
        entry["name"] += function.get("name") or ""
        entry["arguments"] += function.get("arguments") or ""
        return out

    def _flush_calls(self, below: int | None = None) -> list:
        out = []
        for index in sorted(self.calls):
            if below is None or index < below:
                call = self.calls.pop(index)
                self.tool_calls += 1
                out.append(ReplyPart(tool_call={"name": call["name"], "arguments": call["arguments"] or "{}"}))
        return out

    def end(self) -> list:
        """The stream is over ([DONE] or the connection closed): the Finish."""
        if self.finish is not None:
            return []
        out = self._flush_calls()
        if self.reason is None:
            return out + self._end(Finish("error", self.prompt_tokens, self.completion_tokens,
                                          "the server ended the stream before the reply finished"))
        reason = "tool_calls" if self.tool_calls else FINISH_REASONS.get(self.reason, "stop")
        return out + self._end(Finish(reason, self.prompt_tokens, self.completion_tokens))

    def _end(self, finish: Finish) -> list:
        self.finish = finish
        return [finish]


def error_message(body) -> str:
    """The message of an OpenAI error body ({"error": {"message": ...}}), or the body itself, shortened."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(body.get("detail"), str):
            return body["detail"]
    return str(body)[:500]


class RemoteCompletion(Completion):
    """One streamed reply from the server. Iterate it from one thread; cancel() from any."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self._conn, self._response = conn, response
        self._items: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self.reader = SSEReader()
        self._thread = threading.Thread(target=self._read, name="remote-completion", daemon=True)
        self._thread.start()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _read(self) -> None:
        reader = self.reader
        try:
            while reader.finish is None and not self._cancelled.is_set():
                line = self._response.readline()
                if not line:
                    break
                for item in reader.feed(line.decode("utf-8", errors="replace")):
                    if isinstance(item, Finish):
                        self.prompt_tokens = item.prompt_tokens
                    self._items.put(item)
            if not self._cancelled.is_set():
                for item in reader.end():
                    self._items.put(item)
        except Exception as e:  # noqa: BLE001 - a broken connection breaks http.client in many ways
            if not self._cancelled.is_set():
                self._items.put(Finish("error", reader.prompt_tokens, reader.completion_tokens,
                                       f"the connection to the server broke: {describe(e)}"))
        finally:
            self._items.put(None)
            with self._lock:  # only this thread closes; cancel() only shuts the socket down, under the same lock
                self._closed = True
                try:
                    self._response.close()
                except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is closed anyway
                    pass
                self._conn.close()

    def cancel(self) -> None:
        """End the reply now (from any thread): the iteration ends with Finish("cancelled"), and the socket is shut
        down, which unblocks the reader and tells the server the client has left."""
        self._cancelled.set()
        self._items.put(None)  # wakes the consumer at once
        with self._lock:
            sock = None if self._closed else self._conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __iter__(self):
        try:
            while True:
                item = self._items.get()
                if self._cancelled.is_set():
                    yield Finish("cancelled", self.reader.prompt_tokens, self.reader.completion_tokens)
                    return
                if item is None:
                    return
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            if self.reader.finish is None:
                self.cancel()  # the consumer stopped early: let the server stop too


# ---- the service -------------------------------------------------------------------------------------
class RemoteService:
    """Completions from an OpenAI-compatible server.

    api_base: the server's OpenAI base URL, `http(s)://HOST:PORT/v1` as OpenAI clients take it; a bare
    `http://HOST:PORT` (no path) means `http://HOST:PORT/v1`. api_key: sent as `Authorization: Bearer KEY`.
    model: the model id to request; None: the first id of GET /models. The model list is read here, once (a down
    server is told at once: ServiceUnavailable), and gives context_length when the server's card carries it.
    timeout: seconds to wait for the server's next bytes (a reply may pause that long before its first token).
    """

    def __init__(self, api_base: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        self.api_base = normalize_api_base(api_base)
        url = urllib.parse.urlsplit(self.api_base)
        self._https = url.scheme == "https"
        self._host, self._port, self._path = url.hostname, url.port, url.path.rstrip("/")
        self.api_key, self.timeout = api_key, timeout
        self.max_queue = DEFAULT_MAX_QUEUE
        self._closed = False
        self._open: set[RemoteCompletion] = set()
        self._open_lock = threading.Lock()
        cards = self._models(required=model is None)
        if model is None:
            if not cards:
                raise ServiceUnavailable(f"the server at {self.api_base} lists no models (GET {self.api_base}/models)"
                                         f"; pass the model id to use")
            model = cards[0]["id"]
        card = next((c for c in cards if c.get("id") == model), {})
        self.model_name: str = model
        length = card.get("context_length") or card.get("max_model_len")  # ours / vLLM's
        self.context_length: int | None = int(length) if isinstance(length, int) and length > 0 else None
        self.capabilities = Capabilities(display_name=model, has_system_role=True, supports_tools=True)

    # ---- HTTP ----
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, extra: dict | None = None) -> dict:
        headers = {"Accept": "application/json", "User-Agent": "chatglm-remote"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {**headers, **(extra or {})}

    def _request(self, method: str, path: str, body: dict | None = None, *, read_timeout: float | None = None):
        """(connection, response) with a 2xx status; any other status raised as the matching service error."""
        conn = self._connection(CONNECT_TIMEOUT)
        url = f"{self.api_base}{path}"
        try:
            conn.connect()
            conn.sock.settimeout(self.timeout if read_timeout is None else read_timeout)
            data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
            headers = self._headers({"Content-Type": "application/json"} if data is not None else None)
            if body is not None and body.get("stream"):
                headers["Accept"] = "text/event-stream"
            conn.request(method, f"{self._path}{path}", body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ServiceUnavailable(f"cannot reach the server at {url}: {describe(e)}; is it running, and are the "
                                     f"host and port right (--api-base)?") from None
        if 200 <= response.status < 300:
            return conn, response
        try:
            raw = response.read(1 << 20)
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            conn.close()
        raise status_error(response.status, raw, url)

    def _models(self, required: bool) -> list[dict]:
        try:
            conn, response = self._request("GET", "/models", read_timeout=min(self.timeout, 30.0))
        except ConversationError as e:  # 404 and the like: a server without a model list
            if required:
                raise ServiceUnavailable(f"the server at {self.api_base} has no model list (GET {self.api_base}"
                                         f"/models: {e}); is --api-base the server's OpenAI URL (usually ending in "
                                         f"/v1)? Else pass the model id to use") from None
            return []
        try:
            body = json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise ServiceUnavailable(f"the server at {self.api_base} sent no model list ({describe(e)}); is it an "
                                     f"OpenAI-compatible server?") from None
        finally:
            conn.close()
        data = body.get("data") if isinstance(body, dict) else None
        return [c for c in data or [] if isinstance(c, dict) and c.get("id")]

    # ---- the service interface ----
    def start(self, messages: list[Message], settings: CompletionSettings | None = None, *, n: int = 1,
              loop=None, prompt_ids: list[int] | None = None) -> list[Completion]:
        """n choices of a reply (all or none), each its own streamed request (choice i samples with seed + i).
        Synchronous only: iterate the completions, from any thread. Raises ConversationError (the server refused
        the request), ServiceBusy, ServiceUnavailable or ServiceError."""
        if loop is not None:
            raise TypeError("RemoteService completions are synchronous: iterate them (from a thread); loop must be "
                            "None")
        if prompt_ids is not None:
            raise TypeError("RemoteService sends messages, not token ids: prompt_ids is not supported")
        if self._closed:
            raise ServiceUnavailable("the remote service is closed")
        settings = settings or CompletionSettings()
        body = chat_request(self.model_name, messages, settings, self.context_length)
        completions: list[RemoteCompletion] = []
        try:
            for i in range(n):
                if settings.seed is not None and i:  # choice 0 sends the seed as given
                    body = {**body, "seed": (settings.seed + i) % 2**64}
                conn, response = self._request("POST", "/chat/completions", body)
                completion = RemoteCompletion(conn, response)
                completions.append(completion)
        except BaseException:
            for c in completions:
                c.cancel()
            raise
        with self._open_lock:
            self._open = {c for c in self._open if c.reader.finish is None and not c.cancelled}
            self._open.update(completions)
        return completions

    def complete(self, messages: list[Message], settings: CompletionSettings | None = None) -> Completion:
        """One reply (for a synchronous consumer)."""
        return self.start(messages, settings)[0]

    def close(self) -> None:
        """Cancel the replies still streaming; later starts raise ServiceUnavailable."""
        self._closed = True
        with self._open_lock:
            open_, self._open = self._open, set()
        for c in open_:
            c.cancel()


def normalize_api_base(api_base: str) -> str:
    """`http://host:port/v1` as given (no trailing slash); a URL without a path gets /v1; no scheme: http."""
    base = api_base.strip()
    if "://" not in base:
        base = f"http://{base}"
    url = urllib.parse.urlsplit(base)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"api_base must be an http(s) URL like http://HOST:8000/v1, got {api_base!r}")
    path = url.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((url.scheme, url.netloc, path, "", ""))


def describe(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return f"the host name does not resolve ({error.strerror or error})"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "no answer in time"
    return str(error) or type(error).__name__


def status_error(status: int, raw: bytes, url: str) -> Exception:
    """The service error for an HTTP error status and the server's error body."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", errors="replace").strip()
    message = error_message(body) if body else f"HTTP {status}"
    param = body["error"].get("param") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    if status in (401, 403):
        return ServiceError(f"the server at {url} refused the API key ({status}: {message}); pass the server's key "
                            f"with --api-key")
    if status in (429, 503):
        return ServiceBusy(f"the server is busy ({status}): {message}; try again shortly")
    if status in (400, 404, 413, 422):
        return ConversationError(message, param)
    return ServiceError(f"the server at {url} failed ({status}): {message}")
