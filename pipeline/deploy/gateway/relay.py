"""Sending a request to a vLLM endpoint and relaying the answer back, whole or as a stream.

`open_upstream` picks an endpoint from the pool and sends; when the endpoint fails before any byte of
an answer came back (refused, reset, dropped), the request is sent once more to another endpoint:
nothing reached the client yet, so a retry is invisible to it (this holds for streams too, whose
first byte is the status line). An endpoint that cannot be connected to leaves the pool at once. One
that dropped the connection (a keep-alive connection it closed as the request went out, or one cut
while it was busy loading an adapter) is sent the request once more itself, on a fresh connection,
when there is no other endpoint to try: a gateway in front of one server must not turn that race into
a 502 (seen under load during a deploy).

`StreamRelay` passes an SSE stream through as it comes, with each chunk's `id` set to the interaction
id, and keeps what was actually sent (an event counts once the server has handed it to the client's
connection). However the stream ends (done, the endpoint failed, or the client went away) `end`
runs exactly once: it closes the upstream response, which makes vLLM abort a generation nobody
reads, and hands the reply to the logger, flagged `disconnected` when the client left early.
Hand-written on httpx and Starlette: a proxy library would own the request path that the capture,
the id rewriting and the in-flight counts need to sit on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

import anyio
import httpx
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pipeline.deploy.gateway.endpoint_pool import Endpoint, EndpointPool
from pipeline.deploy.gateway.openai_wire import (
    GatewayError,
    Reply,
    SseEvent,
    SseRewriter,
    error_body,
    fold_event,
)

__all__ = ["RelayedStream", "StreamRelay", "Upstream", "open_upstream", "read_whole"]

logger = logging.getLogger(__name__)

# Failures that mean the endpoint itself is gone, not just slow: take it out of the pool at once.
_ENDPOINT_DOWN = (httpx.ConnectError, httpx.ConnectTimeout)
# The connection was dropped before an answer, the endpoint may be fine: a fresh connection may answer.
_DROPPED = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


@dataclass
class Upstream:
    """An endpoint's answer whose status and headers have arrived; the body is still to be read."""

    pool: EndpointPool
    endpoint: Endpoint
    adapter: str
    response: httpx.Response
    retried_from: tuple[str, ...]  # endpoints that failed before this one
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.response.aclose()
        finally:
            self.pool.end(self.endpoint, self.adapter)


async def open_upstream(
    client: httpx.AsyncClient,
    pool: EndpointPool,
    path: str,
    payload: bytes,
    *,
    adapter: str,
    headers: Mapping[str, str],
) -> Upstream:
    """Send to a healthy endpoint, once more to another if the first fails before answering."""
    failed: list[str] = []
    dropped: Endpoint | None = None  # the endpoint that dropped the last try's connection
    for _ in range(2):
        endpoint = pool.pick(exclude=failed)
        if endpoint is None and dropped is not None and dropped.healthy:
            endpoint = dropped  # no other endpoint to try: the same one, on a fresh connection
        if endpoint is None:
            break
        pool.begin(endpoint, adapter)
        try:
            request = client.build_request("POST", endpoint.url + path, content=payload, headers=headers)
            response = await client.send(request, stream=True)
        except httpx.TransportError as error:
            pool.end(endpoint, adapter)
            failed.append(endpoint.url)
            logger.warning("%s%s failed before answering: %s", endpoint.url, path, type(error).__name__)
            if isinstance(error, _ENDPOINT_DOWN):
                pool.take_out(endpoint, type(error).__name__)
            dropped = endpoint if isinstance(error, _DROPPED) else None
            continue
        except BaseException:
            pool.end(endpoint, adapter)
            raise
        return Upstream(pool, endpoint, adapter, response, tuple(failed))
    if not failed:
        raise GatewayError(
            503, "No serving endpoint is healthy; try again shortly.", code="no_healthy_endpoint"
        )
    raise GatewayError(
        502, f"The serving endpoints tried ({len(failed)}) did not answer.", code="upstream_unreachable"
    )


async def read_whole(upstream: Upstream) -> bytes:
    """The whole body of a non-streamed answer; a failure mid-body is a 502."""
    try:
        return await upstream.response.aread()
    except httpx.HTTPError as error:
        raise GatewayError(
            502, f"The serving endpoint failed mid-answer ({type(error).__name__}).", code="upstream_error"
        ) from None
    finally:
        await upstream.close()


StreamEnd = Callable[[Reply, bool, "str | None"], None]  # (reply as sent, disconnected, upstream error)


class StreamRelay:
    """One streamed answer on its way to the client (see the module doc)."""

    def __init__(self, upstream: Upstream, rewriter: SseRewriter, on_end: StreamEnd) -> None:
        self.upstream = upstream
        self.reply = Reply()
        self._rewriter = rewriter
        self._on_end = on_end
        self._completed = False
        self._error: str | None = None
        self._ended = False
        self.body = self._relay()

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self.upstream.response.aiter_bytes():
                for event in self._rewriter.feed(chunk):
                    yield event.data
                    self._fold(event)
            for event in self._rewriter.flush():
                yield event.data
                self._fold(event)
        except httpx.HTTPError as error:
            self._error = f"{type(error).__name__}: {error}"[:300]
            logger.warning("%s failed mid-stream: %s", self.upstream.endpoint.url, self._error)
            message = "The serving endpoint failed mid-stream."
            self._completed = True  # ended by the endpoint, not by the client
            yield b"data: " + orjson.dumps(error_body(502, message, code="upstream_error")) + b"\n\n"
            return
        self._completed = True

    def _fold(self, event: SseEvent) -> None:
        fold_event(self.reply, event)
        if event.error is not None and self._error is None:
            self._error = event.error  # the stream ends normally after it, but the reply is cut short

    async def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        with anyio.CancelScope(shield=True):
            await self.body.aclose()
            await self.upstream.close()
        self._on_end(self.reply, not self._completed, self._error)


class RelayedStream(StreamingResponse):
    """A streaming response that ends its relay however the response ends (disconnects included)."""

    def __init__(self, relay: StreamRelay, headers: Mapping[str, str]) -> None:
        super().__init__(relay.body, media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.end()
