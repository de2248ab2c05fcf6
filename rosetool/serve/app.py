"""The HTTP routes: OpenAI's `/v1/models`, `/v1/completions`, `/v1/chat/completions`, plus
`/health` and `/metrics`. Every failure answers with an OpenAI-shaped error body.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rosetool.errors import RosetoolError
from rosetool.runtime import LLM
from rosetool.serve.chat_template import chat_prompt_ids
from rosetool.serve.engine_loop import EngineLoop
from rosetool.serve.generation import ClientGone, Generation
from rosetool.serve.guards import BodyLimit
from rosetool.serve.limits import ServeLimits
from rosetool.serve.metrics import ServerMetrics
from rosetool.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body
from rosetool.serve.responses import DONE, ChatCompletions, Completions, sse

log = logging.getLogger("rosetool.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class ServeState:
    llm: LLM
    model_name: str
    chat_template: str | None
    limits: ServeLimits = field(default_factory=ServeLimits)
    engine: EngineLoop = field(init=False)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    draining: bool = False   # set on SIGTERM: finish what runs, refuse what comes
    in_flight: int = 0       # requests being answered (the drain waits for them)

    def __post_init__(self) -> None:
        self.engine = EngineLoop(self.llm)


class RefuseWhileDraining:
    """503 for new requests once SIGTERM arrived (`/metrics` stays readable); a plain ASGI
    middleware, so streams and disconnects pass through untouched."""

    def __init__(self, app: Any, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.state.draining and scope["path"] != "/metrics":
            await _error(503, "the server is shutting down", "service_unavailable")(scope, receive, send)
            return
        counted = scope["type"] == "http" and scope["path"] != "/metrics"
        self.state.in_flight += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= counted


def create_app(state: ServeState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.draining = True
        await state.engine.stop()

    app = FastAPI(title="rosetool", lifespan=lifespan)
    app.state.serve = state

    app.add_middleware(BodyLimit, limits=state.limits)
    app.add_middleware(RefuseWhileDraining, state=state)   # added last: outermost, before any body is read

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.kind)

    @app.exception_handler(RosetoolError)
    async def bad_request(request: Request, exc: RosetoolError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":   # loc is ("body", character offset), not a field
            at = first.get("loc", ("body", "?"))[-1]
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            return _error(400, f"request body is not valid JSON: {reason} at character {at}", "invalid_request_error")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route, a body that is not UTF-8) in OpenAI's shape too."""
        detail = "request body is not UTF-8 JSON" if exc.detail == "There was an error parsing the body" \
            else str(exc.detail)
        return _error(exc.status_code, detail, "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(state.llm), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "rosetool", "max_model_len": state.llm.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        body.check()
        prompts = body.prompts()
        _check_length(state, "prompt", sum(len(p) for p in prompts if isinstance(p, str)))
        gen = Generation(state.engine, state.metrics, f"cmpl-{uuid.uuid4().hex}")
        max_tokens = _or_longest(state, body.max_tokens)
        await gen.start(prompts, body.n, partial(body.sampling_params, max_tokens, body.logprobs is not None))
        shape = Completions(gen, body.model, state.llm.tokenizer, body.logprobs is not None)
        return await _answer(gen, shape, body.stream, body.include_usage, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        body.check()
        if state.chat_template is None:
            raise ApiError(400, "this model has no chat template (tokenizer_config.json or chat_template.jinja); "
                                "start the server with --chat-template FILE or use /v1/completions",
                           "invalid_request_error")
        _check_length(state, "messages", _text_length(body.messages))
        prompt = partial(chat_prompt_ids, state.llm.tokenizer, state.chat_template, body.messages,
                         body.add_generation_prompt)
        gen = Generation(state.engine, state.metrics, f"chatcmpl-{uuid.uuid4().hex}")
        max_tokens = _or_longest(state, body.max_tokens if body.max_completion_tokens is None
                                 else body.max_completion_tokens)
        await gen.start([prompt], body.n, partial(body.sampling_params, max_tokens, body.logprobs))
        shape = ChatCompletions(gen, body.model, state.llm.tokenizer, body.logprobs)
        return await _answer(gen, shape, body.stream, body.include_usage, request)

    return app


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, status, param), status_code=status)


def _or_longest(state: ServeState, max_tokens: int | None) -> int:
    """No limit given: the engine stops the request at `max_model_len`, as vLLM does."""
    return state.llm.max_model_len if max_tokens is None else max_tokens


def _text_length(value: Any) -> int:
    """Characters of every string in a chat request's messages (contents, names, parts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_length(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_length(v) for v in value)
    return 0


def _check_length(state: ServeState, param: str, chars: int) -> None:
    """Before tokenising: a prompt of 50 MB would cost seconds and gigabytes only to be refused."""
    if chars > state.limits.max_prompt_chars:
        raise ApiError(400, f"{param} is {chars} characters; this server takes at most "
                            f"{state.limits.max_prompt_chars} (--max-prompt-chars)", "invalid_request_error")


def _check_model(state: ServeState, model: str) -> None:
    if model != state.model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{state.model_name}`",
                       "not_found_error")


async def _answer(gen: Generation, shape: Completions, stream: bool, include_usage: bool,
                  request: Request) -> Any:
    if stream:
        return StreamingResponse(_stream(gen, shape, include_usage), media_type="text/event-stream")
    try:
        async for _ in gen.events(request.is_disconnected):
            pass
    except ClientGone:
        log.info("%s: client disconnected, request aborted", gen.request_id)
        return _error(499, "client closed the connection", "invalid_request_error")
    except Exception as exc:   # an engine failure: the request fails, the server goes on
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")
    return shape.whole()


async def _stream(gen: Generation, shape: Completions, include_usage: bool) -> AsyncIterator[str]:
    for chunk in shape.first_chunks():
        yield chunk
    try:
        async for choice, delta, new_tokens in gen.events():
            yield shape.chunk(choice, delta, new_tokens)
    except Exception as exc:   # headers are sent: report in band, as OpenAI servers do
        yield sse(error_body(f"{type(exc).__name__}: {exc}", "server_error", 500))
    else:
        if include_usage:
            yield shape.usage_chunk()
    yield DONE
