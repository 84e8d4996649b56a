"""A fake vLLM endpoint for gateway tests: real HTTP on loopback, OpenAI chat and completions, SSE.

`FakeUpstream` answers like vLLM's OpenAI server where the gateway relies on it: `/health`,
`/v1/models`, `/v1/chat/completions` and `/v1/completions`, streamed (one SSE chunk per word, a
final chunk with the finish reason, usage when `stream_options.include_usage`, then `[DONE]`) or
whole, with `model` echoing the request. The reply names the endpoint and the model it was asked
for, `[<name>] <model> heard: <prompt>`, so a test can tell which endpoint and which version
answered. Its health can be switched off, a model unloaded (404), its stream slowed down or made to
report an engine error halfway, and it counts streams that were cut off by the client (the gateway
closing an abandoned stream). `LoopbackServer` runs any ASGI app
(the gateway too) under uvicorn in a thread on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class LoopbackServer:
    """An ASGI app served by uvicorn in a daemon thread on 127.0.0.1, on a port of its own."""

    def __init__(self, app: Any) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self._socket.close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


@dataclass
class UpstreamState:
    name: str
    healthy: bool = True
    chunk_delay: float = 0.0  # seconds between streamed chunks
    fail_after_chunks: int | None = None  # a stream reports an engine error (as vLLM does) after this many
    unloaded: set[str] = field(default_factory=set)  # model names answered 404, as vLLM does for them
    requests: list[dict[str, Any]] = field(default_factory=list)  # bodies received, in order
    cut_streams: int = 0  # streams whose client went away before the end
    lock: threading.Lock = field(default_factory=threading.Lock)


def reply_text(name: str, model: str, prompt: str) -> str:
    return f"[{name}] {model} heard: {prompt}"


def _prompt(body: dict[str, Any], kind: str) -> str:
    if kind == "completion":
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else json.dumps(prompt)
    users = [m.get("content") for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def _usage(prompt: str, reply: str) -> dict[str, int]:
    prompt_tokens, completion_tokens = len(prompt.split()), len(reply.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class FakeUpstream:
    """One fake vLLM endpoint; use as a context manager (`with FakeUpstream("a") as upstream:`)."""

    def __init__(self, name: str) -> None:
        self.state = UpstreamState(name)
        app = Starlette(
            routes=[
                Route("/health", self._health),
                Route("/v1/models", self._models),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completion, methods=["POST"]),
            ]
        )
        self.server = LoopbackServer(app)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def __enter__(self) -> FakeUpstream:
        self.server.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.stop()

    def models_asked(self) -> list[str]:
        with self.state.lock:
            return [body.get("model", "") for body in self.state.requests]

    async def _health(self, _request: Request) -> Response:
        return Response(status_code=200 if self.state.healthy else 503)

    async def _models(self, _request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "base", "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        return await self._answer(request, "chat")

    async def _completion(self, request: Request) -> Response:
        return await self._answer(request, "completion")

    async def _answer(self, request: Request, kind: str) -> Response:
        body = await request.json()
        with self.state.lock:
            self.state.requests.append(body)
        model = body["model"]
        if model in self.state.unloaded:
            error = {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "code": 404}
            return JSONResponse({"error": error}, status_code=404)
        prompt = _prompt(body, kind)
        reply = reply_text(self.state.name, model, prompt)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = self._events(kind, model, reply, _usage(prompt, reply) if include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(self._whole(kind, model, reply, _usage(prompt, reply)))

    def _whole(self, kind: str, model: str, reply: str, usage: dict[str, int]) -> dict[str, Any]:
        if kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": reply, "finish_reason": "stop", "logprobs": None}
            return {
                "id": "cmpl-up",
                "object": "text_completion",
                "created": 1,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        message = {"role": "assistant", "content": reply}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        return {
            "id": "chatcmpl-up",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }

    async def _events(
        self, kind: str, model: str, reply: str, usage: dict[str, int] | None
    ) -> AsyncIterator[bytes]:
        finished = False
        try:
            words = reply.split(" ")
            for index, word in enumerate(words):
                if index == self.state.fail_after_chunks:
                    yield _sse(
                        {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
                    )
                    yield b"data: [DONE]\n\n"
                    finished = True
                    return
                piece = word if index == len(words) - 1 else word + " "
                yield _sse(_chunk(kind, model, piece, None))
                await asyncio.sleep(self.state.chunk_delay)
            yield _sse(_chunk(kind, model, "", "stop"))
            if usage is not None:
                yield _sse(
                    {
                        "id": "up",
                        "object": "chunk",
                        "created": 1,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                with self.state.lock:
                    self.state.cut_streams += 1


def _chunk(kind: str, model: str, piece: str, finish_reason: str | None) -> dict[str, Any]:
    if kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": piece, "finish_reason": finish_reason, "logprobs": None}
        return {
            "id": "cmpl-up",
            "object": "text_completion",
            "created": 1,
            "model": model,
            "choices": [choice],
        }
    delta = {"role": "assistant", "content": piece} if piece else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [choice],
    }


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"
