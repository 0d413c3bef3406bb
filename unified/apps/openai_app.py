"""The OpenAI-compatible HTTP API over one UnifiedPipeline (FastAPI), served by `cola serve`
(unified/apps/serve.py):

    GET  /v1/models
    POST /v1/completions           prompt continuation; stream: true sends one SSE chunk a block
    POST /v1/chat/completions      text messages are continued; a user message with an
                                   image_url part (a data: URL) is captioned / questioned
    POST /v1/images/generations    prompt -> n images, b64_json PNGs (size "WxH", default the model's)
    GET  /health                   liveness and batching counters (no key needed)

Requests are checked in unified/apps/schemas.py and run in batches by unified/apps/batcher.py.
Every error is answered in the OpenAI format {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from unified.apps.batcher import Batcher, Job, RowUpdate
from unified.apps.errors import ApiError, error_response
from unified.apps.schemas import (
    ChatRequest,
    CompletionRequest,
    ImageRequest,
    ServeContext,
    chat_job,
    completion_job,
    image_job,
)

log = logging.getLogger("cola.serve")


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: the bearer key on /v1 routes (401) and the body size limit (413),
    checked from Content-Length and counted while a chunked body streams in."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                message = "invalid API key" if given else \
                    "no API key given: send the header Authorization: Bearer KEY"
                return await error_response(401, message, code="invalid_api_key")(
                    scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await _too_large(self.max_body)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"the request body is too large: at most {limit} bytes",
                          code="request_too_large")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|dict|list|none)(\[.*\])?$|.*\[.*\]$")


def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    # a union's errors name the member tried ("str", "list[str]"): the field is what counts
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_TAG.match(str(x))]
    param = ".".join(loc) or None
    others = {tuple(e.get("loc", ()))[:len(loc) + 1] for e in errors[1:]}
    others.discard(tuple(first.get("loc", ()))[:len(loc) + 1])
    more = f" (and {len(others)} more problems)" if others else ""
    return error_response(422, f"{param or 'body'}: {first.get('msg')}{more}", param=param,
                          code="invalid_value")


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message)


def _server_error(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}").response()


async def _events(request: Request | None, job: Job, batcher: Batcher) -> AsyncIterator[tuple]:
    """The job's events until "done"; ApiError for an "error". Polls `request` for a
    disconnect (non-streamed responses; a stream learns it by cancellation). Whatever ends
    the iteration, the job leaves the batcher."""
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), 0.5)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    log.info("client went away: request cancelled")
                    return
                if time.monotonic() > job.deadline + 30:  # the worker is stuck in one batch
                    raise ApiError(504, f"the request timed out after {job.timeout:g} s",
                                   code="timeout") from None
                continue
            if kind == "error":
                raise payload
            yield kind, payload
            if kind == "done":
                return
    finally:
        batcher.cancel(job)


class _Stream:
    """Deltas of each row's text: the text so far minus what was sent; a trailing partial
    UTF-8 character (U+FFFD) waits for the next block."""

    def __init__(self, rows: int):
        self.sent = [""] * rows

    def delta(self, u: RowUpdate) -> str:
        text = u.text if u.finish else u.text.rstrip("\ufffd")
        if not text.startswith(self.sent[u.row]):
            return ""
        d, self.sent[u.row] = text[len(self.sent[u.row]):], text
        return d


def _usage(job: Job, tokens: list[int]) -> dict:
    done = sum(tokens)
    return {"prompt_tokens": job.prompt_usage, "completion_tokens": done,
            "total_tokens": job.prompt_usage + done}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(pipe, *, model_id: str, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, window: float = 0.0, timeout: float = 300.0,
               max_body: int = 16 << 20) -> FastAPI:
    """The FastAPI app; its batcher's worker thread runs while the app is served."""
    ctx = ServeContext(pipe, model_id, timeout)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(pipe, max_batch=max_batch, max_queue=max_queue,
                                    window=window)
        yield
        app.state.batcher.close()

    app = FastAPI(title="Cola OpenAI-compatible API", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body)
    app.add_exception_handler(ApiError, lambda _r, e: e.response())
    app.add_exception_handler(_BodyTooLarge, lambda _r, _e: _too_large(max_body))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "cola"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **app.state.batcher.snapshot()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        if name != model_id:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves "
                                f"{model_id!r}", param="model", code="model_not_found")
        return card

    async def text_response(request: Request, job: Job, body, chat: bool):
        batcher: Batcher = app.state.batcher
        batcher.submit(job)  # 429 before any byte is sent
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_id, "seed": job.seeds[0]}
        last: dict[int, RowUpdate] = {}
        if not body.stream:
            async for kind, updates in _events(request, job, batcher):
                last.update({u.row: u for u in updates} if kind == "rows" else {})
            if len(last) < job.rows:  # the client went away
                return JSONResponse({}, status_code=499)
            rows = [last[r] for r in range(job.rows)]
            choices = [{"index": u.row, "finish_reason": u.finish, "logprobs": None,
                        **({"message": {"role": "assistant", "content": u.text}} if chat
                           else {"text": u.text})} for u in rows]
            return {**head, "choices": choices, "usage": _usage(job, [u.tokens for u in rows])}

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        head["object"] = "chat.completion.chunk" if chat else "text_completion"

        def chunk(row: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else \
                    ({"content": text} if text else {})
                choice = {"index": row, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": row, "text": text or "", "finish_reason": finish}
            return _sse({**head, "choices": [{**choice, "logprobs": None}]})

        async def stream() -> AsyncIterator[str]:
            deltas = _Stream(job.rows)
            if chat:
                for r in range(job.rows):
                    yield chunk(r, None, None, first=True)
            try:
                async for kind, updates in _events(None, job, batcher):
                    for u in updates if kind == "rows" else []:
                        last[u.row] = u
                        d = deltas.delta(u)
                        if d:
                            yield chunk(u.row, d, None)
                        if u.finish:
                            yield chunk(u.row, None, u.finish)
            except ApiError as e:
                yield _sse(e.body())
                return
            if include_usage:
                tokens = [u.tokens for u in last.values()]
                yield _sse({**head, "choices": [], "usage": _usage(job, tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await text_response(request, completion_job(body, ctx), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        job = await asyncio.to_thread(chat_job, body, ctx)  # decodes the image off the loop
        return await text_response(request, job, body, chat=True)

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest, request: Request):
        batcher: Batcher = app.state.batcher
        job = image_job(body, ctx)
        batcher.submit(job)
        pictures = []
        async for kind, payload in _events(request, job, batcher):
            pictures.extend(payload if kind == "images" else [])
        if len(pictures) < job.rows:
            return JSONResponse({}, status_code=499)
        data = await asyncio.to_thread(lambda: [{"b64_json": _png64(p), "revised_prompt": None}
                                                for p in pictures])
        return {"created": int(time.time()), "data": data, "seed": job.seeds[0]}

    return app


def _png64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
