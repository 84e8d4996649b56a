"""Who may call the gateway: `Authorization: Bearer <key>` checked against the hashed keys in the store.

With `require_keys` a missing or unknown key is a 401 and a track the key does not allow a 403, in
the OpenAI error format. Without it (the embedded, one-machine default) anyone is served as
anonymous, but a known key sent anyway still applies its tracks, consent default and storage rule;
OpenAI clients always send some key (often `EMPTY`), which is then simply unknown.

Lookups hit the store once per key per `key_cache_seconds` (unknown keys are cached too, so a
client sending a bad key cannot make every request query the store), concurrent lookups of the
same key share one query, and while the store is unreachable a key already looked up keeps its
last answer, so an outage of the store does not become an outage of the gateway. Hand-written:
a dictionary and a rule, over `storage.keys`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline.deploy.gateway.exchange import ANONYMOUS, Caller
from pipeline.deploy.gateway.openai_wire import GatewayError
from storage.keys import find_api_key, key_sha256

__all__ = ["Access", "bearer_token"]

MAX_CACHED_KEYS = 10_000


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when absent or of another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class _Cached:
    caller: Caller | None  # None: no live key with this hash
    at: float


class Access:
    def __init__(
        self, engine: Engine, *, require_keys: bool, cache_seconds: float, store_without_consent: bool = True
    ) -> None:
        self.engine = engine
        self.require_keys = require_keys
        self.cache_seconds = cache_seconds
        # False: traffic without consent is never stored, whatever a key allows
        self.store_without_consent = store_without_consent
        self.anonymous = replace(ANONYMOUS, store_traffic=store_without_consent)
        self._cache: dict[str, _Cached] = {}
        self._loading: dict[str, asyncio.Task[Caller | None]] = {}

    async def caller(self, authorization: str | None) -> Caller:
        """The caller a request's Authorization header names; raises 401 (or 503) `GatewayError`."""
        token = bearer_token(authorization)
        if not self.require_keys:
            return await self._optional_key(token)
        key = await self._lookup(token) if token is not None else None
        if key is not None:
            return key
        if token is None:
            raise GatewayError(
                401,
                "You didn't provide an API key: send `Authorization: Bearer <key>`.",
                code="invalid_api_key",
            )
        raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _optional_key(self, token: str | None) -> Caller:
        """Keys not required: a known key applies, anything else (or a store that cannot say) is anonymous."""
        if token is None:
            return self.anonymous
        try:
            return await self._lookup(token) or self.anonymous
        except GatewayError:
            return self.anonymous

    async def _lookup(self, token: str) -> Caller | None:
        digest = key_sha256(token)
        cached = self._cache.get(digest)
        if cached is not None and time.monotonic() - cached.at < self.cache_seconds:
            return cached.caller
        task = self._loading.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._load(token, digest, cached))
            self._loading[digest] = task
            task.add_done_callback(lambda _: self._loading.pop(digest, None))
        return await asyncio.shield(task)

    async def _load(self, token: str, digest: str, cached: _Cached | None) -> Caller | None:
        try:
            row = await anyio.to_thread.run_sync(find_api_key, self.engine, token)
        except SQLAlchemyError:
            if cached is not None:
                return cached.caller  # the store is down: the last answer stands
            raise GatewayError(503, "Cannot check the API key now: the store is unreachable.") from None
        caller = Caller.from_key(row) if row is not None else None
        if caller is not None and not self.store_without_consent:
            caller = replace(caller, store_traffic=False)
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[digest] = _Cached(caller, time.monotonic())
        return caller
