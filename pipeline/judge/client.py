"""The LLM judge (RLAIF): scores responses on a rubric through any OpenAI-compatible endpoint.

The judge is the reward of the RL stage and a metric of the gate, so it must be trustworthy, fast
and hard to game. The pure half (prompts, fencing, schemas, parsing) lives in `judge_prompt`; this
module is the I/O half: concurrent HTTP with timeouts, retries with exponential backoff and jitter,
a circuit breaker, structured output with a fallback for servers without it, a SQL cache keyed by
(judge model, rubric, prompt, response), a per-night budget and token accounting.

Failure policy: an unreachable judge raises `JudgeUnavailable` (the stage fails with one line); it
never turns into zero scores. An answer that cannot be parsed is asked again, then recorded as a
failed judgment with `score=None`; nothing downstream ever sees a made-up score.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx
import orjson
from sqlalchemy import Engine

from pipeline.judge.prompt import (
    JudgeParseError,
    build_group_messages,
    build_pointwise_messages,
    group_schema,
    judge_cache_key,
    parse_group,
    parse_pointwise,
    pointwise_schema,
    prompt_sha256,
    reversed_order,
    shuffled_order,
    text_sha256,
)
from pipeline.judge.rubrics import Rubric
from storage.errors import UserError
from storage.judgments import StoredJudgment, cached_judgments, store_judgments

logger = logging.getLogger(__name__)
Conversation = list[dict[str, str]]
T = TypeVar("T")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class JudgeUnavailable(UserError):
    """The judge endpoint cannot be reached or keeps failing: the stage cannot go on."""


class ItemRejected(Exception):
    """The endpoint refused this one request (e.g. the prompt is longer than the judge's context)."""


ITEM_STATUS = frozenset({400, 413, 422})  # the request itself is the problem: fail the item, not the stage


@dataclass(frozen=True)
class JudgeSettings:
    base_url: str  # OpenAI-compatible server, e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str  # judge model name on that server
    api_key: str | None = None
    concurrency: int = 8  # requests in flight at once
    timeout_seconds: float = 60.0
    max_retries: int = 4  # per request, on transport errors, 429 and 5xx
    parse_retries: int = 1  # asks again when an answer cannot be parsed
    budget_items: int = 5000  # items judged (not cache hits) per judge instance, i.e. per night
    temperature: float = 0.0
    max_tokens: int = 512
    swap_orders: bool = False  # group mode: also score the reversed order and average
    breaker_threshold: int = 5  # consecutive failed requests that open the circuit
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 20.0
    seed: int = 0  # shuffles candidate order in group mode


@dataclass(frozen=True)
class JudgeResult:
    """One judged item: `score` in [0, 1], or None with `error` when it failed or was skipped."""

    score: float | None
    raw_score: float | None = None
    rationale: str | None = None
    status: str = "ok"  # ok | failed | skipped (over budget)
    error: str | None = None
    cached: bool = False


@dataclass
class JudgeStats:
    calls: int = 0
    retries: int = 0
    cache_hits: int = 0
    judged: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {f"judge_{name}": float(value) for name, value in self.__dict__.items()}


@dataclass(frozen=True)
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int


class Judge(Protocol):
    """What the pipeline needs of a judge; `LlmJudge` is the real one, tests use fakes."""

    model: str
    stats: JudgeStats

    async def score(
        self, rubric: Rubric, conversations: Sequence[Conversation], responses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> list[JudgeResult]: ...  # fmt: skip

    async def score_groups(
        self, rubric: Rubric, conversations: Sequence[Conversation], candidates: Sequence[Sequence[str]],
        references: Sequence[str | None] | None = None,
    ) -> list[list[JudgeResult]]: ...  # fmt: skip


# -- HTTP --------------------------------------------------------------------------------------------


class ChatClient:
    """Chat completions with retries, backoff with jitter and a circuit breaker."""

    def __init__(self, settings: JudgeSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        root = settings.base_url.rstrip("/")
        self.url = f"{root}/chat/completions" if root.endswith("/v1") else f"{root}/v1/chat/completions"
        self._headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._sessions = 0
        self._consecutive_failures = 0
        self.structured_output = True  # switched off once when the server refuses response_format
        self.stats = JudgeStats()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """One HTTP connection pool per top-level call: a pool must not outlive its event loop."""
        if self._sessions == 0:
            self._http = httpx.AsyncClient(
                timeout=self.settings.timeout_seconds, headers=self._headers, transport=self._transport
            )
        self._sessions += 1
        try:
            yield
        finally:
            self._sessions -= 1
            if self._sessions == 0 and self._http is not None:
                await self._http.aclose()
                self._http = None

    async def complete(self, messages: Conversation, schema: dict[str, Any], temperature: float) -> ChatReply:
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": self.settings.max_tokens,
        }
        if self.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": schema, "strict": True},
            }
        response = await self._post_with_retries(body)
        if response.status_code == 400 and "response_format" in body and "response_format" in response.text:
            if self.structured_output:
                logger.warning("judge endpoint refuses response_format; using the tolerant parser instead")
            self.structured_output = False
            return await self.complete(messages, schema, temperature)
        if response.status_code in ITEM_STATUS:
            raise ItemRejected(
                f"judge refused the item (HTTP {response.status_code}): {_brief(_error_message(response))}"
            )
        if response.status_code != 200:
            raise JudgeUnavailable(
                f"judge {self.settings.model} at {self.url} answered HTTP {response.status_code}: {_brief(response.text)}"
            )
        return _reply(response)

    async def _post_with_retries(self, body: dict[str, Any]) -> httpx.Response:
        attempt = 0
        while True:
            self._check_breaker()
            self.stats.calls += 1
            assert self._http is not None, "complete() outside session()"
            try:
                response = await self._http.post(self.url, json=body)
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {_brief(str(error)) or 'no answer'}"
            else:
                if response.status_code not in RETRY_STATUS:
                    self._consecutive_failures = 0
                    return response
                problem = f"HTTP {response.status_code}"
            self._consecutive_failures += 1
            if attempt >= self.settings.max_retries:
                raise JudgeUnavailable(
                    f"judge {self.settings.model} at {self.url} failed after {attempt + 1} attempts: {problem}"
                )
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        ceiling = min(
            self.settings.backoff_max_seconds, self.settings.backoff_base_seconds * 2 ** (attempt - 1)
        )
        return random.uniform(0, ceiling)

    def _check_breaker(self) -> None:
        if self._consecutive_failures >= self.settings.breaker_threshold:
            raise JudgeUnavailable(
                f"judge {self.settings.model} at {self.url} is unavailable: "
                f"{self._consecutive_failures} consecutive requests failed (circuit open)"
            )


def _reply(response: httpx.Response) -> ChatReply:
    try:
        data = response.json()
        text = data["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeUnavailable(
            f"judge answered something that is not a chat completion: {_brief(response.text)}"
        ) from None
    usage = data.get("usage") or {}
    return ChatReply(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except ValueError:
        return response.text
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error or response.text)


def _brief(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- the judge ---------------------------------------------------------------------------------------


@dataclass
class _Budget:
    remaining: int

    def take(self, items: int = 1) -> bool:
        if self.remaining < items:
            return False
        self.remaining -= items
        return True


@dataclass
class LlmJudge:
    """An LLM judge over one OpenAI-compatible endpoint, with the SQL cache when `engine` is given."""

    settings: JudgeSettings
    engine: Engine | None = None
    transport: httpx.AsyncBaseTransport | None = None
    stats: JudgeStats = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.settings.model
        self._client = ChatClient(self.settings, transport=self.transport)
        self.stats = self._client.stats
        self._budget = _Budget(self.settings.budget_items)

    async def score(
        self,
        rubric: Rubric,
        conversations: Sequence[Conversation],
        responses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> list[JudgeResult]:
        """Pointwise: each response scored on the rubric's scale, normalised to [0, 1]."""
        references = references or [None] * len(responses)
        keys = [
            judge_cache_key(self.model, rubric, conv, resp, ref)
            for conv, resp, ref in zip(conversations, responses, references, strict=True)
        ]

        def judge_one(index: int) -> Awaitable[JudgeResult]:
            messages = build_pointwise_messages(
                rubric, conversations[index], responses[index], references[index]
            )
            return self._ask(messages, pointwise_schema(rubric), lambda text: [parse_pointwise(text, rubric)])

        async with self._client.session():
            verdicts = await self._cached_or_judged(keys, judge_one)
        self._store(rubric, keys, conversations, responses, verdicts)
        return verdicts

    async def score_groups(
        self,
        rubric: Rubric,
        conversations: Sequence[Conversation],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str | None] | None = None,
    ) -> list[list[JudgeResult]]:
        """Group mode: the K candidates of a prompt scored together, relative to each other.

        Candidate order is shuffled (and optionally also reversed and averaged) to cancel position
        bias; verdicts come back in the candidates' original order.
        """
        references = references or [None] * len(candidates)
        semaphore = asyncio.Semaphore(self.settings.concurrency)

        async def one(index: int) -> list[JudgeResult]:
            async with semaphore:
                return await self._score_group(
                    rubric, conversations[index], list(candidates[index]), references[index], index
                )

        async with self._client.session():
            return list(await asyncio.gather(*(one(index) for index in range(len(candidates)))))

    async def _score_group(
        self, rubric: Rubric, conversation: Conversation, group: list[str], reference: str | None, index: int
    ) -> list[JudgeResult]:
        context = hashlib.sha256(orjson.dumps(sorted(group))).hexdigest()[:16]
        keys = [
            text_sha256(f"group:{context}:{judge_cache_key(self.model, rubric, conversation, c, reference)}")
            for c in group
        ]
        cached = self._lookup(keys)
        if len(cached) == len(keys):
            self.stats.cache_hits += len(keys)
            return [_as_cached(cached[key]) for key in keys]
        if not self._budget.take(len(group)):
            self.stats.skipped += len(group)
            return [JudgeResult(None, status="skipped", error="judge budget exhausted")] * len(group)
        orders = [shuffled_order(len(group), self.settings.seed + index)]
        if self.settings.swap_orders:
            orders.append(reversed_order(orders[0]))
        passes = [await self._group_pass(rubric, conversation, group, reference, order) for order in orders]
        verdicts = _average_passes(passes)
        self._store(rubric, keys, [conversation] * len(group), group, verdicts)
        return verdicts

    async def _group_pass(
        self,
        rubric: Rubric,
        conversation: Conversation,
        group: list[str],
        reference: str | None,
        order: list[int],
    ) -> list[JudgeResult]:
        messages = build_group_messages(rubric, conversation, group, order, reference)
        schema = group_schema(rubric, len(group))
        return await self._ask_many(
            messages, schema, lambda text: parse_group(text, rubric, order), len(group)
        )

    async def _cached_or_judged(
        self, keys: list[str], judge_one: Callable[[int], Awaitable[JudgeResult]]
    ) -> list[JudgeResult]:
        cached = self._lookup(keys)
        self.stats.cache_hits += sum(1 for key in keys if key in cached)
        semaphore = asyncio.Semaphore(self.settings.concurrency)

        async def one(index: int) -> JudgeResult:
            if keys[index] in cached:
                return _as_cached(cached[keys[index]])
            if not self._budget.take():
                self.stats.skipped += 1
                return JudgeResult(None, status="skipped", error="judge budget exhausted")
            async with semaphore:
                return await judge_one(index)

        return list(await asyncio.gather(*(one(index) for index in range(len(keys)))))

    async def _ask(
        self, messages: Conversation, schema: dict[str, Any], parse: Callable[[str], list[Any]]
    ) -> JudgeResult:
        return (await self._ask_many(messages, schema, parse, 1))[0]

    async def _ask_many(
        self, messages: Conversation, schema: dict[str, Any], parse: Callable[[str], list[Any]], count: int
    ) -> list[JudgeResult]:
        """Ask, parse; ask again (warmer) when the answer cannot be parsed; then record a failure."""
        error = ""
        for attempt in range(self.settings.parse_retries + 1):
            temperature = self.settings.temperature if attempt == 0 else max(self.settings.temperature, 0.7)
            try:
                reply = await self._client.complete(messages, schema, temperature)
            except ItemRejected as rejected:
                error = str(rejected)
                break
            self.stats.prompt_tokens += reply.prompt_tokens
            self.stats.completion_tokens += reply.completion_tokens
            try:
                parsed = parse(reply.text)
            except JudgeParseError as problem:
                error = f"unparseable judge answer: {problem}"
                continue
            self.stats.judged += count
            return [JudgeResult(p.score, p.raw_score, p.rationale) for p in parsed]
        self.stats.failed += count
        return [JudgeResult(None, status="failed", error=error)] * count

    def _lookup(self, keys: list[str]) -> dict[str, StoredJudgment]:
        return cached_judgments(self.engine, keys) if self.engine is not None else {}

    def _store(
        self,
        rubric: Rubric,
        keys: Sequence[str],
        conversations: Sequence[Conversation],
        responses: Sequence[str],
        verdicts: Sequence[JudgeResult],
    ) -> None:
        if self.engine is None:
            return
        rows = [
            StoredJudgment(
                cache_key=key,
                judge_model=self.model,
                rubric_id=rubric.id,
                rubric_version=str(rubric.version),
                prompt_sha256=prompt_sha256(conv),
                response_sha256=text_sha256(resp),
                status=verdict.status,
                score=verdict.score,
                raw_score=verdict.raw_score,
                rationale=verdict.rationale,
                error=verdict.error,
            )
            for key, conv, resp, verdict in zip(keys, conversations, responses, verdicts, strict=True)
            if not verdict.cached and verdict.status in ("ok", "failed")
        ]
        store_judgments(self.engine, rows)


def _as_cached(stored: StoredJudgment) -> JudgeResult:
    return JudgeResult(stored.score, stored.raw_score, stored.rationale, cached=True)


def _average_passes(passes: list[list[JudgeResult]]) -> list[JudgeResult]:
    """Average each candidate's normalised score over the orders it was judged in."""
    if len(passes) == 1:
        return passes[0]
    averaged = []
    for verdicts in zip(*passes, strict=True):
        scores = [v.score for v in verdicts if v.score is not None]
        if not scores:
            averaged.append(verdicts[0])
            continue
        raws = [v.raw_score for v in verdicts if v.raw_score is not None]
        averaged.append(JudgeResult(sum(scores) / len(scores), sum(raws) / len(raws), verdicts[0].rationale))
    return averaged


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a judge coroutine from synchronous pipeline code (one event loop per call)."""
    return asyncio.run(coroutine)
