"""The gateway's HTTP API: OpenAI-compatible serving in front of vLLM that logs every exchange.

Endpoints:
    POST /v1/chat/completions, /v1/completions   forwarded (streamed or not) to the track's version
    GET  /v1/models                              tracks the caller may call, their pinned versions, base
    POST /v1/feedback                            {interaction_id, thumb?, rating?, comment?}
    GET  /health                                 the process is up
    GET  /ready                                  an endpoint is healthy and exchanges can be logged

A request body is forwarded as it is, with `model` rewritten to the upstream name (`support` ->
`support@v3`). The answer's `model` is left as vLLM wrote it, the pinned version that answered, as
OpenAI answers `gpt-4o` with the dated snapshot that served it; `X-Overnight-Model` says the same.
The answer's `id` is the interaction id, also in `X-Overnight-Interaction-Id`: the id to give
feedback on. Only answers with a 2xx status are logged; vLLM's own errors pass through untouched.
Every error the gateway raises itself is an OpenAI error body with the matching status, never a
traceback. FastAPI on uvicorn because both are already in the dependency tree (Prefect, MLflow and
vLLM's own server use them) and give ASGI streaming and disconnect detection without new weight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio.to_thread
import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

from pipeline.config import GatewayConfig
from pipeline.deploy.gateway.access import Access
from pipeline.deploy.gateway.capture import Capture
from pipeline.deploy.gateway.endpoint_pool import EndpointPool
from pipeline.deploy.gateway.exchange import Exchange, Outcome, new_exchange
from pipeline.deploy.gateway.openai_wire import (
    GatewayError,
    Reply,
    SseRewriter,
    error_body,
    rewrite_completion,
)
from pipeline.deploy.gateway.relay import RelayedStream, StreamRelay, Upstream, open_upstream, read_whole
from pipeline.deploy.gateway.routing import RouteTable
from pipeline.deploy.gateway.spool import Spool
from storage.keys import InteractionOwner, interaction_owner
from storage.records import Feedback, describe_validation_error
from storage.writes import log_in_order

__all__ = ["INTERACTION_HEADER", "MODEL_HEADER", "Gateway", "create_app"]

logger = logging.getLogger(__name__)

INTERACTION_HEADER = "X-Overnight-Interaction-Id"
MODEL_HEADER = "X-Overnight-Model"
FEEDBACK_KEYS = frozenset({"interaction_id", "thumb", "rating", "comment"})
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


class Gateway:
    """The parts of one gateway process; the FastAPI app's handlers call its methods."""

    def __init__(
        self,
        engine: Engine,
        *,
        endpoints: Sequence[str],
        base_name: str,
        tracks: Sequence[str],
        settings: GatewayConfig,
        upstream_api_key: str | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        timeout = httpx.Timeout(
            settings.upstream_timeout_seconds, connect=min(10.0, settings.upstream_timeout_seconds)
        )
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self.pool = EndpointPool(endpoints, client=self.client)
        self.routes = RouteTable(engine, base_name=base_name, tracks=tracks)
        self.access = Access(
            engine,
            require_keys=settings.require_keys,
            cache_seconds=settings.key_cache_seconds,
            store_without_consent=settings.store_without_consent,
        )
        self.capture = Capture(
            partial(log_in_order, engine),
            Spool(settings.spool_dir),
            queue_size=settings.queue_size,
            batch_size=settings.batch_size,
            flush_seconds=settings.flush_seconds,
        )
        self.upstream_headers = {"Content-Type": "application/json"}
        if upstream_api_key:
            self.upstream_headers["Authorization"] = f"Bearer {upstream_api_key}"

    def in_flight(self, adapter_name: str) -> int:
        """Requests to `adapter_name` in flight on any endpoint (an old version unloads at zero)."""
        return self.pool.in_flight(adapter_name)

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        """Start the log writer and the background refreshes; on the way out (or a failed start) close
        the upstream client and flush the log, so nothing is left running or unwritten."""
        tasks: list[asyncio.Task[None]] = []
        self.capture.start()
        try:
            await anyio.to_thread.run_sync(self.routes.refresh)
            await self.pool.check()
            tasks = [
                asyncio.create_task(
                    every(self.settings.route_refresh_seconds, "route refresh", self._refresh_routes)
                ),
                asyncio.create_task(
                    every(self.settings.health_interval_seconds, "endpoint health check", self.pool.check)
                ),
            ]
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(asyncio.CancelledError):
                    await task
            await self.client.aclose()
            await anyio.to_thread.run_sync(self.capture.close)

    async def _refresh_routes(self) -> None:
        await anyio.to_thread.run_sync(self.routes.refresh)

    # -- completions --------------------------------------------------------------------------------------

    async def forward(self, request: Request, kind: str) -> Response:
        caller = await self.access.caller(request.headers.get("authorization"))  # before reading a byte
        body = await read_json(request, self.settings.max_request_bytes)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "`model` is required and must be a string.", param="model")
        refuse_prompt_logprobs(body)
        route = self.routes.resolve(model)
        if not caller.allows(route.track):
            raise GatewayError(
                403, f"This API key may not call `{model}`.", code="model_not_allowed", param="model"
            )
        exchange = new_exchange(kind, body, route, caller, request.headers, datetime.now(UTC))
        started = time.perf_counter()
        self.capture.expect(exchange)
        headers = {**self.upstream_headers, "X-Request-Id": exchange.request_id}
        payload = orjson.dumps({**body, "model": route.upstream})
        try:
            upstream = await open_upstream(
                self.client, self.pool, PATHS[kind], payload, adapter=route.upstream, headers=headers
            )
        except BaseException:
            self.capture.forget(exchange.interaction_id)
            raise
        reply_headers = {INTERACTION_HEADER: exchange.interaction_id, MODEL_HEADER: route.upstream}
        if exchange.stream and upstream.response.status_code == 200:
            return self._stream(exchange, upstream, started, reply_headers)
        return await self._whole(exchange, upstream, started, reply_headers)

    async def _whole(
        self, exchange: Exchange, upstream: Upstream, started: float, headers: dict[str, str]
    ) -> Response:
        try:
            raw = await read_whole(upstream)
        except BaseException:
            self.capture.forget(exchange.interaction_id)
            raise
        status = upstream.response.status_code
        media_type = upstream.response.headers.get("content-type", "application/json")
        if not 200 <= status < 300:  # vLLM's own error, passed through; nothing is logged, so no id
            self.capture.forget(exchange.interaction_id)
            return Response(raw, status, headers={MODEL_HEADER: headers[MODEL_HEADER]}, media_type=media_type)
        data, reply = rewrite_completion(raw, exchange.interaction_id, exchange.kind)
        self.capture.record(exchange, self._outcome(upstream, reply, started))
        return Response(data, status, headers=headers, media_type=media_type)

    def _stream(
        self, exchange: Exchange, upstream: Upstream, started: float, headers: dict[str, str]
    ) -> Response:
        def on_end(reply: Reply, disconnected: bool, error: str | None) -> None:
            outcome = self._outcome(upstream, reply, started, disconnected=disconnected, upstream_error=error)
            self.capture.record(exchange, outcome)

        rewriter = SseRewriter(exchange.interaction_id, exchange.kind)
        return RelayedStream(StreamRelay(upstream, rewriter, on_end), headers)

    def _outcome(self, upstream: Upstream, reply: Reply, started: float, **extra: Any) -> Outcome:
        latency_ms = (time.perf_counter() - started) * 1000
        return Outcome(reply, upstream.endpoint.url, latency_ms, retried_from=upstream.retried_from, **extra)

    # -- the rest of the API ------------------------------------------------------------------------------

    async def models(self, request: Request) -> dict[str, Any]:
        caller = await self.access.caller(request.headers.get("authorization"))
        return {"object": "list", "data": self.routes.models(caller.allows)}

    async def feedback(self, request: Request) -> dict[str, Any]:
        caller = await self.access.caller(request.headers.get("authorization"))
        body = await read_json(request, self.settings.max_request_bytes)
        interaction_id, feedback = parse_feedback(body)
        owner = await self._owner(interaction_id)
        if owner is None:
            raise GatewayError(
                404,
                f"No interaction with id `{interaction_id}` (an answer another gateway gave reaches "
                "the store within `gateway.flush_seconds`: retry if it was just made).",
                code="interaction_not_found",
                param="interaction_id",
            )
        if owner.key_name != caller.key_name:  # anonymous traffic (or traffic not from the gateway) too
            raise GatewayError(
                403, "This interaction was made with another API key.", code="not_your_interaction"
            )
        self.capture.feedback(interaction_id, feedback)
        return {"object": "feedback", "interaction_id": interaction_id, "status": "accepted"}

    async def _owner(self, interaction_id: str) -> InteractionOwner | None:
        pending = self.capture.owner(interaction_id)
        if pending is not None:
            return pending
        try:
            return await anyio.to_thread.run_sync(interaction_owner, self.engine, interaction_id)
        except SQLAlchemyError:
            raise GatewayError(503, "Cannot look up the interaction now: the store is unreachable.") from None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        routes = self.routes.state()
        ready = self.pool.healthy_count() > 0 and self.capture.can_log() and routes != "never read"
        return ready, {
            "ready": ready,
            "endpoints": self.pool.states(),
            "routes": routes,
            "store": "ok" if self.capture.store_ok else "unreachable (spooling)",
            "spool_writable": self.capture.spool.writable(),
            **self.capture.backlog(),
        }


async def every(interval_seconds: float, what: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run `step` every `interval_seconds` until cancelled; a failure is logged and the next turn runs."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await step()
        except Exception:
            logger.exception("%s failed; trying again in %.1fs", what, interval_seconds)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object body; 413 past `limit` bytes, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise GatewayError(
            413, f"Request body too large: {declared} bytes (limit {limit}).", code="request_too_large"
        )
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise GatewayError(
                413, f"Request body too large (limit {limit} bytes).", code="request_too_large"
            )
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise GatewayError(400, f"The request body is not valid JSON: {error.msg}.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    return body


def refuse_prompt_logprobs(body: dict[str, Any]) -> None:
    """A 400 for a request asking for prompt log-probabilities (vLLM's `prompt_logprobs`, or `echo`
    with `logprobs` on completions): with LoRA adapters enabled, vLLM 0.32's CPU engine fails on them
    when they are batched with other requests, and a failed engine stops serving every track."""
    asked = body.get("prompt_logprobs") is not None or (body.get("echo") and body.get("logprobs"))
    if asked:
        raise GatewayError(
            400,
            "Prompt log-probabilities (`prompt_logprobs`, or `echo` with `logprobs`) are not served "
            "through this gateway: the serving engine cannot give them for adapters.",
            param="prompt_logprobs" if body.get("prompt_logprobs") is not None else "echo",
        )


def parse_feedback(body: dict[str, Any]) -> tuple[str, Feedback]:
    """(interaction id, feedback) of a `/v1/feedback` body; a 400 `GatewayError` says what is wrong."""
    unknown = sorted(set(body) - FEEDBACK_KEYS)
    if unknown:
        raise GatewayError(
            400, f"Unknown field `{unknown[0]}` (expected {', '.join(sorted(FEEDBACK_KEYS))})."
        )
    interaction_id = body.get("interaction_id")
    if not isinstance(interaction_id, str) or not interaction_id:
        raise GatewayError(400, "`interaction_id` is required (the completion's id).", param="interaction_id")
    try:
        feedback = Feedback.model_validate(
            {k: v for k, v in body.items() if k != "interaction_id" and v is not None}
        )
    except ValidationError as error:
        raise GatewayError(400, f"Invalid feedback: {describe_validation_error(error)}.") from None
    if feedback.is_empty():
        raise GatewayError(400, "Give a `thumb` (1 or -1), a `rating` (1-5) or a `comment`.")
    return interaction_id, feedback


def create_app(
    engine: Engine,
    *,
    endpoints: Sequence[str],
    base_name: str,
    tracks: Sequence[str],
    settings: GatewayConfig | None = None,
    upstream_api_key: str | None = None,
) -> FastAPI:
    """The gateway app for one process; `app.state.gateway` is its `Gateway` (routes, pool, capture)."""
    gateway = Gateway(
        engine,
        endpoints=endpoints,
        base_name=base_name,
        tracks=tracks,
        settings=settings or GatewayConfig(),
        upstream_api_key=upstream_api_key,
    )
    app = FastAPI(
        title="overnight gateway", lifespan=gateway.lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.gateway = gateway
    _add_routes(app, gateway)
    _add_error_handlers(app)
    return app


def _add_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.forward(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.forward(request, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return await gateway.models(request)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        return await gateway.feedback(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        is_ready, detail = gateway.readiness()
        return JSONResponse(detail, status_code=200 if is_ready else 503)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, error: GatewayError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error")
        return JSONResponse(error_body(500, "The gateway failed on this request."), status_code=500)
