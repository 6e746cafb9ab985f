"""What both servers share: settings, the JSON error shape, API key, CORS, request-size cap, engine bridging."""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.service import Completion, ConversationError, LocalService, ServiceBusy, ServiceUnavailable

MiB = 1024 * 1024


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, `Authorization: Bearer <key>` is required
    cors_origins: list[str] = field(default_factory=list)  # none: browsers on other origins are refused
    max_request_bytes: int = 4 * MiB
    allowed_hosts: list[str] = field(default_factory=list)  # Host names answered besides the local ones; "*": any


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_json(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def error_json(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error shape, used by every error either server sends."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "the request body must be a JSON object (send it with Content-Type: application/json)", None
    return (f"{param}: {msg}" if param else msg), param


def install_common(app: FastAPI, settings: Settings) -> None:
    """Error handlers, API key check, CORS and the request-size cap, in that order of precedence."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for JSON too deep to decode
            message = "the request body could not be parsed as JSON (is it nested too deeply?)"
        return APIError(exc.status_code, message, type=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    if settings.api_key:
        expected = settings.api_key.encode()

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.method == "OPTIONS" or request.url.path == "/health":
                return await call_next(request)
            if not hmac.compare_digest(bearer_token(request.headers.get("authorization", "")), expected):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                type="invalid_request_error", code="invalid_api_key").response()
            return await call_next(request)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    hosts = accepted_hosts(settings.host, settings.allowed_hosts)
    if hosts is not None:
        app.add_middleware(HostCheck, hosts=hosts)


def bearer_token(header: str) -> bytes:
    """The credentials of an `Authorization: Bearer <token>` header (the scheme is case-insensitive, RFC 7235)."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def accepted_hosts(bound: str, allowed: list[str]) -> frozenset[str] | None:
    """Host header names the server answers; None: any.

    A server bound to this machine only answers local names (and those allowed), so a web page cannot reach it
    through a DNS name that rebinds to 127.0.0.1. Bound to every interface, clients may use any of the machine's
    names, so any is answered unless --allowed-hosts narrows it.
    """
    names = {h.strip().lower().strip("[]") for h in allowed if h.strip()}
    if "*" in names or (bound in WILDCARD_HOSTS and not names):
        return None
    extra = () if bound in WILDCARD_HOSTS else (bound.lower().strip("[]"),)
    return frozenset(names | set(LOCAL_HOSTS) | set(extra))


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: a request whose Host header is not an accepted name is answered 400 (DNS rebinding)."""

    def __init__(self, app, hosts: frozenset[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.hosts:
                return await _send_error(send, 400, f"this server does not answer for the host name {host!r}; "
                                                    "start it with --allowed-hosts NAME to accept it")
        return await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: a body over max_bytes (declared or actually sent) is answered with 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_big = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        if declared is not None:
            try:
                over = int(declared) > self.max_bytes
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if over:
                return await _send_error(send, 413, too_big)
            return await self.app(scope, receive, send)
        # No declared length (chunked upload): read the body here, up to the limit, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _send_error(send, 413, too_big)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps(error_json(message, "invalid_request_error")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---- service bridging ----------------------------------------------------------------------------------
def as_service(engine_or_service) -> LocalService:
    """Apps are built over an engine (tests, scripts) or a LocalService."""
    return engine_or_service if isinstance(engine_or_service, LocalService) else LocalService(engine_or_service)


def start(service: LocalService, messages, settings, **kwargs) -> list[Completion]:
    """Queue the choices of one call for the running event loop, all or none; a full queue becomes 503."""
    try:
        return service.start(messages, settings, loop=asyncio.get_running_loop(), **kwargs)
    except ServiceBusy as e:
        raise APIError(503, f"the server is busy: {e}", type="server_error", code="overloaded",
                       headers={"Retry-After": "1"}) from e
    except ServiceUnavailable as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from e
    except ConversationError as e:
        raise APIError(400, str(e), param=e.param) from e
    except ValueError as e:
        raise APIError(400, str(e)) from e


async def parts_until_disconnect(completion: Completion, request: Request):
    """The completion's items; if the client goes away the generation is cancelled (and iteration ends)."""

    async def watch():
        while True:
            if await request.is_disconnected():
                completion.cancel()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        async for item in completion:
            yield item
    finally:
        watcher.cancel()
        completion.cancel()  # no-op when finished; frees the slot when the consumer stopped early


def serve(create_app, description: str, argv=None) -> int:
    """The body of api.py / openai_api.py: flags -> completion service (model and engine) -> app -> uvicorn."""
    from model.flags import service_or_exit

    args = server_parser(description).parse_args(argv)
    import uvicorn

    service = service_or_exit(args)
    settings = Settings(host=args.host, port=args.port, api_key=args.api_key,
                        cors_origins=[o.strip() for o in args.cors_origins.split(",") if o.strip()],
                        max_request_bytes=args.max_request_bytes,
                        allowed_hosts=[h for h in args.allowed_hosts.split(",") if h.strip()])
    try:
        uvicorn.run(create_app(service, settings), host=args.host, port=args.port, log_level="info")
    finally:
        service.close()
    return 0


def server_parser(description: str):
    """The servers' flags (model.flags.build_parser's server group: --api-key is the key clients must send)."""
    from model.flags import build_parser

    return build_parser(description, server=True)
