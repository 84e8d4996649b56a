"""A small synchronous client for one vLLM OpenAI-compatible server: adapters, chat, health.

Deploys, gate evaluation and `overnight status` talk to running servers through this class only,
so there is one place that knows vLLM's admin endpoints (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`) and one place that turns transport failures into a
one-line `ServerUnavailable` naming the endpoint. It is thread-safe (httpx.Client is), so
`chat_many` fans out over a thread pool; the server batches concurrent requests itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from storage.errors import UserError

__all__ = ["Chat", "ServerRequestFailed", "ServerUnavailable", "VllmClient"]

logger = logging.getLogger(__name__)

Chat = list[dict[str, str]]


class ServerUnavailable(UserError):
    """The server cannot be reached (refused, timed out, DNS)."""


class ServerRequestFailed(UserError):
    """The server answered with an error status."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class ServedAdapter:
    name: str  # the name clients call
    path: str | None  # where the server loaded it from (vLLM reports it as the model's root)


class VllmClient:
    """One endpoint, e.g. `VllmClient("http://127.0.0.1:8000", api_key=None)`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_seconds: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0)),
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ requests

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServerUnavailable(f"{self.base_url}: {what}: timed out") from None
        except httpx.TransportError as error:
            raise ServerUnavailable(
                f"{self.base_url}: {what}: cannot reach the vLLM server ({type(error).__name__}: {error})"
            ) from None
        if response.status_code >= 400:
            raise ServerRequestFailed(
                f"{self.base_url}: {what}: HTTP {response.status_code}: {_error_text(response)}",
                response.status_code,
            )
        return response

    def healthy(self) -> bool:
        """True when `/health` answers 200 (never raises)."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[dict[str, Any]]:
        """`/v1/models` entries: the base model and every loaded adapter."""
        data = self._request("GET", "/v1/models", "list models").json()
        return list(data.get("data", []))

    def adapters(self) -> dict[str, ServedAdapter]:
        """Loaded LoRA adapters by name (entries of `/v1/models` that have a parent model)."""
        return {
            entry["id"]: ServedAdapter(entry["id"], entry.get("root"))
            for entry in self.models()
            if entry.get("parent")
        }

    def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT directory `path` under `name` (a name is never reloaded in place: a deploy
        loads a new pinned name and the gateway's route moves to it)."""
        body = {"lora_name": name, "lora_path": path}
        self._request("POST", "/v1/load_lora_adapter", f"load adapter {name!r}", json=body)

    def unload_adapter(self, name: str) -> None:
        self._request("POST", "/v1/unload_lora_adapter", f"unload adapter {name!r}", json={"lora_name": name})

    def chat(
        self,
        model: str,
        messages: Chat,
        *,
        max_tokens: int = 48,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str:
        """The assistant's reply text (greedy at temperature 0)."""
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        data = self._request("POST", "/v1/chat/completions", f"chat with {model!r}", json=body).json()
        return data["choices"][0]["message"].get("content") or ""

    def chat_many(
        self,
        model: str,
        prompts: Sequence[Chat],
        *,
        max_tokens: int = 48,
        temperature: float = 0.0,
        seed: int | None = None,
        concurrency: int = 16,
    ) -> list[str]:
        """Replies to every prompt in order, `concurrency` requests in flight (the server batches them).

        With `seed`, request i is seeded `seed * 1_000_003 + i`: one reproducible sample per prompt.
        """
        if not prompts:
            return []

        def one(index: int) -> str:
            request_seed = None if seed is None else seed * 1_000_003 + index
            return self.chat(
                model, list(prompts[index]), max_tokens=max_tokens, temperature=temperature, seed=request_seed
            )

        with ThreadPoolExecutor(max_workers=min(concurrency, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error", data.get("message", data.get("detail", data)))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:300]
    return str(data)[:300]
