"""The FastAPI app of `gavel serve`: OpenAI-compatible chat completions (whole or streamed as server-sent events)
through an `Engine`, one generation at a time, with bearer-token auth, request limits and Prometheus metrics."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gavel.errors import GavelError
from gavel.serve.engine import Completion, Delta, Engine, Job, ModelWorker, RequestError, Started, WholeReplies
from gavel.serve.metrics import CONTENT_TYPE, Metrics
from gavel.serve.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    ErrorBody,
    ErrorResponse,
    FinishReason,
    GavelEvent,
    GavelFired,
    GavelResult,
    Health,
    ModelCard,
    ModelList,
    Usage,
)
from gavel.serve.schema import Delta as DeltaBody

log = logging.getLogger("gavel.serve")
_END = object()   # a stream's job is over (after its Completion, an error, or a cancellation)
_ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/healthz", "/metrics")


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_queue: int | None = None, max_batch: int = 8) -> FastAPI:
    """The server app for one engine. With `api_key`, every /v1 route and /metrics want
    `Authorization: Bearer <api_key>`; request bodies over `max_body_bytes` get 413; with `max_queue`, a chat
    completion that finds that many already waiting or generating gets 503 (Retry-After) instead of queueing.
    Whole replies waiting together are generated in batches of up to `max_batch` (1: one at a time)."""
    worker_box: dict[str, ModelWorker] = {}
    replies_box: dict[str, WholeReplies] = {}
    metrics = Metrics()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker_box["worker"] = app.state.worker = ModelWorker()
        replies_box["replies"] = WholeReplies(engine, worker_box["worker"], max_batch)
        try:
            yield
        finally:   # uvicorn lets in-flight requests finish first; then the queue drains and the thread stops
            worker_box.pop("worker").shutdown()

    app = FastAPI(title="gavel serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    def worker() -> ModelWorker:
        return worker_box["worker"]

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if api_key is not None and (path.startswith("/v1/") or path == "/metrics") and not _authorized(request,
                                                                                                        api_key):
            response = error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                             "invalid_request_error", code="invalid_api_key")
        else:
            response = await call_next(request)
        metrics.request(path if path in _ENDPOINTS else "other", response.status_code)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.get("/healthz")
    async def healthz() -> Health:
        return Health(model=engine.name, guarded=engine.guarded, queued=worker().queued)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        metrics.queued = worker().queued
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=engine.name, created=started)])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        begun = time.perf_counter()
        parsed = await _read_request(request, max_body_bytes)
        if isinstance(parsed, Response):
            return parsed
        if parsed.model != engine.name:
            return error(404, f"The model '{parsed.model}' does not exist: this server serves '{engine.name}'.",
                         "invalid_request_error", param="model", code="model_not_found")
        try:
            engine.check_max_tokens(parsed.token_limit)
        except RequestError as e:
            return error(400, str(e), "invalid_request_error", param=e.param)
        if max_queue is not None and worker().queued >= max_queue:
            response = error(503, f"The server is busy: {worker().queued} requests are already waiting for the model "
                                  f"(gavel serve --max-queue {max_queue}); retry shortly.", "server_error",
                             code="server_overloaded")
            response.headers["Retry-After"] = "1"
            return response
        job = Job(parsed.conversation(), parsed.token_limit,
                  1.0 if parsed.temperature is None else parsed.temperature, parsed.seed)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if parsed.stream:
            usage = parsed.stream_options is not None and parsed.stream_options.include_usage
            return await _stream(job, ident, created, usage, begun)
        try:
            done = await _complete(request, job)
            if done is None:   # the client left while the request waited: nothing was generated
                return Response(status_code=499)
        except GavelError as e:   # a limit, or a conversation the chat template cannot take
            return error(400, str(e), "invalid_request_error", param=getattr(e, "param", None))
        except Exception:
            log.exception("chat completion failed")
            return error(500, "The server failed while generating; see its log.", "server_error")
        record(done, begun)
        body = ChatCompletion(id=ident, created=created, model=engine.name, usage=_usage(done),
                              choices=[Choice(message=AssistantMessage(content=done.text),
                                              finish_reason=done.finish_reason)],
                              gavel=_gavel(done))
        return Response(body.model_dump_json(), media_type="application/json")

    async def _complete(request: Request, job: Job):
        """The whole reply, generated on the model thread (in a batch with the whole replies waiting beside it);
        None when the client disconnected while the request was still queued (it is then skipped, not generated)."""
        cancelled = threading.Event()

        async def watch() -> None:   # the body is read: the next ASGI message is the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancelled.set()

        watcher = asyncio.ensure_future(watch())
        try:
            return await asyncio.wrap_future(replies_box["replies"].submit(job, cancelled))
        finally:
            watcher.cancel()

    async def _stream(job: Job, ident: str, created: int, include_usage: bool, begun: float) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:   # the event loop is gone (shutdown): nobody is listening
                cancelled.set()

        def run() -> None:
            try:
                if not cancelled.is_set():   # the client may have left while the request was queued
                    engine.stream(job, emit, cancelled)
            except BaseException as e:
                emit(e)
            finally:
                emit(_END)

        worker().submit(run)
        try:
            first = await queue.get()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        if isinstance(first, GavelError):
            return error(400, str(first), "invalid_request_error", param=getattr(first, "param", None))
        if not isinstance(first, Started):
            log.error("chat completion stream failed", exc_info=first if isinstance(first, BaseException) else None)
            return error(500, "The server failed while generating; see its log.", "server_error")

        def chunk(delta: DeltaBody, finish: FinishReason | None = None, **extra) -> str:
            body = ChatCompletionChunk(id=ident, created=created, model=engine.name,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)], **extra)
            return f"data: {body.model_dump_json()}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk(DeltaBody(role="assistant", content=""))
                shown = ""
                while (item := await queue.get()) is not _END:
                    if isinstance(item, Delta):
                        if item.text or item.fired:
                            fired = GavelFired(fired=list(item.fired), token_index=item.token_index)
                            yield chunk(DeltaBody(content=item.text), gavel=fired if item.fired else None)
                            shown += item.text
                    elif isinstance(item, Completion):
                        record(item, begun)
                        if item.blocked:   # the rule's reply follows what was shown before the block
                            yield chunk(DeltaBody(content=("\n" if shown else "") + item.text))
                        yield chunk(DeltaBody(), item.finish_reason, gavel=_gavel(item))
                        if include_usage:
                            body = ChatCompletionChunk(id=ident, created=created, model=engine.name, choices=[],
                                                       usage=_usage(item))
                            yield f"data: {body.model_dump_json()}\n\n"
                        yield "data: [DONE]\n\n"
                    elif isinstance(item, BaseException):
                        log.error("chat completion stream failed", exc_info=item)
                        failure = ErrorResponse(error=ErrorBody(message="The server failed while generating.",
                                                                type="server_error"))
                        yield f"data: {failure.model_dump_json()}\n\n"
            finally:   # a client that leaves mid-stream stops its generation at the next token
                cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def record(done: Completion, begun: float) -> None:
        metrics.completion(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                           finish_reason=done.finish_reason, verdict=done.verdict,
                           fires=[(e["rule"], e["action"]) for e in done.events],
                           seconds=time.perf_counter() - begun)

    return app


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _authorized(request: Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def _read_request(request: Request, limit: int) -> ChatCompletionRequest | Response:
    """The request body, at most `limit` bytes (413), parsed as JSON (400) and validated (400 naming the field)."""
    too_big = error(413, f"The request body is larger than this server accepts ({limit} bytes).",
                    "invalid_request_error", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            return too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return error(400, f"We could not parse the JSON body of your request ({e}).", "invalid_request_error")
    if not isinstance(data, dict):
        return error(400, "The request body must be a JSON object.", "invalid_request_error")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {where}"
        elif first["type"] == "missing":
            message = f"Missing required parameter: '{where}'."
        else:
            text = first["msg"].removeprefix("Value error, ")
            message = f"Invalid value for '{where}': {text}." if where else f"{text}."
        return error(400, message, "invalid_request_error", param=where or None,
                     code="unrecognized_argument" if first["type"] == "extra_forbidden" else "invalid_value")


def _usage(done: Completion) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)


def _gavel(done: Completion) -> GavelResult | None:
    if done.verdict is None:
        return None
    return GavelResult(verdict=done.verdict, blocked=done.blocked, failed=done.failed, generated=done.generated,
                       events=[GavelEvent(**e) for e in done.events])
