"""The LLM judge (RLAIF): scores responses on a rubric through any OpenAI-compatible endpoint.

The judge is the reward of the RL stage and a metric of the gate, so it must be trustworthy, fast
and hard to game. The pure half (prompts, fencing, schemas, parsing) lives in `judge.prompt`; this
module is the I/O half.

What comes from the `openai` SDK (`AsyncOpenAI`): the HTTP calls, timeouts, retries with exponential
backoff and jitter on transport errors, timeouts, 408/409/429 and 5xx, honouring `Retry-After`, and
typed errors (`APIStatusError`, `APIConnectionError`, `APITimeoutError`, ...). None of that is written
here (the SDK backs off from 0.5 s up to 8 s).

What is kept by hand, because the SDK does not do it:
  - a circuit breaker: after `breaker_threshold` consecutive failed attempts the endpoint is not
    called for `breaker_cooldown_seconds`, then tried once again (half-open). It sits in the SDK's HTTP client (`_GuardedClient`)
    so that it sees every attempt, retries included, and raises an `OpenAIError` there, which the SDK
    re-raises without retrying: a dead endpoint stops the retry loop instead of being slept through;
    the same place counts calls and retries (the SDK numbers its attempts in a request header);
  - structured output with a fallback: a JSON-schema `response_format` first, the tolerant parser
    when the server rejects it (a 400 that names `response_format`);
  - the per-item failure policy: a request the server refuses (400/413/422, e.g. a prompt longer
    than the context) fails that item alone; an answer that cannot be parsed is asked again, then
    recorded as failed with `score=None`; nothing downstream ever sees a made-up score;
  - the SQL cache keyed by (judge model, rubric, prompt, response), the budget (`budget_items`),
    token accounting in `JudgeStats` and the concurrency limit.

One `LlmJudge` serves a whole night, several stages each calling `run_sync(judge.score(...))`, i.e.
a new event loop per call. An SDK client (and its connection pool) is bound to the loop it first ran
on, so one is built at the start of each top-level call on the running loop and closed at its end;
the budget, the stats, the breaker and the structured-output switch live on the instance and carry
over from call to call.

Without `api_key` no Authorization header is sent (the SDK would otherwise read OPENAI_API_KEY and
send it to whatever endpoint the judge points at).

Failure policy: an endpoint that cannot be reached, refuses the key, or keeps failing raises
`JudgeUnavailable` (the stage fails with one line); it never turns into zero scores.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import httpx2
import openai
import orjson
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from sqlalchemy import Engine

from pipeline.judge.prompt import (
    JudgeParseError,
    build_compact_messages,
    build_group_messages,
    build_pointwise_messages,
    compact_schema,
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
ITEM_STATUS = frozenset({400, 413, 422})  # the request itself is the problem: fail the item, not the stage
RETRY_COUNT_HEADER = "x-stainless-retry-count"  # the SDK numbers its attempts of one call: 0, 1, 2, ...
NO_KEY = "none"  # the SDK insists on a key; without one the Authorization header is left out instead
PROMPT_STYLES = ("full", "compact")  # judge.prompt: see `judge.prompt` (the module) for both


class JudgeUnavailable(UserError):
    """The judge endpoint cannot be reached or keeps failing: the stage cannot go on."""


class ItemRejected(Exception):
    """The endpoint refused this one request (e.g. the prompt is longer than the judge's context)."""


class CircuitOpen(openai.OpenAIError):
    """Raised under the SDK, which re-raises an `OpenAIError` as it is instead of retrying."""


@dataclass(frozen=True)
class JudgeSettings:
    base_url: str  # OpenAI-compatible server, e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str  # judge model name on that server
    api_key: str | None = None
    concurrency: int = 8  # requests in flight at once
    timeout_seconds: float = 60.0
    max_retries: int = 4  # per request, by the SDK: transport errors, timeouts, 408/409/429, 5xx
    parse_retries: int = 1  # asks again when an answer cannot be parsed
    budget_items: int = 5000  # items judged (not cache hits) per judge instance, i.e. per night
    temperature: float = 0.0
    max_tokens: int = 512
    swap_orders: bool = False  # group mode: also score the reversed order and average
    breaker_threshold: int = 5  # consecutive failed requests that open the circuit
    breaker_cooldown_seconds: float = 20.0  # then one request is let through again
    seed: int = 0  # shuffles candidate order in group mode
    prompt: str = "full"  # prompt style: full (instructions + rubric text) or compact (small judges)

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_STYLES:
            raise ValueError(f"judge prompt style {self.prompt!r} is not one of {', '.join(PROMPT_STYLES)}")


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


# -- HTTP: the SDK, plus a breaker under it ----------------------------------------------------------


@dataclass
class _Breaker:
    """Counts consecutive failed attempts; once `threshold` is reached the endpoint is not called
    until `cooldown_seconds` have passed, then one attempt is let through (half-open): a success
    closes the circuit, a failure opens it for another cooldown. So a stage retried later in the
    night (Prefect waits 5 s, then 30 s) tries the endpoint again instead of failing at once."""

    threshold: int
    cooldown_seconds: float = 20.0
    failures: int = 0
    opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        if self.failures < self.threshold or self.opened_at is None:
            return False
        return time.monotonic() - self.opened_at < self.cooldown_seconds

    def check(self) -> None:
        if self.is_open:
            raise CircuitOpen(f"{self.failures} consecutive requests failed (circuit open)")

    def record(self, failed: bool) -> None:
        self.failures = self.failures + 1 if failed else 0
        if failed and self.failures >= self.threshold:
            self.opened_at = time.monotonic()
        elif not failed:
            self.opened_at = None


def _endpoint_failed(status: int) -> bool:
    """The statuses the SDK retries: the endpoint, not the request, is the problem."""
    return status in (408, 409, 429) or status >= 500


class _GuardedClient(httpx2.AsyncClient):
    """The SDK's HTTP client, with a count and a breaker check on every attempt the SDK sends.

    At `send`, not in a transport, so that proxies from the environment and body read timeouts are
    covered too. `CircuitOpen` is an `OpenAIError`: the SDK lets it through instead of retrying.
    """

    def __init__(self, breaker: _Breaker, stats: JudgeStats, timeout: float) -> None:
        super().__init__(timeout=timeout, limits=openai.DEFAULT_CONNECTION_LIMITS, follow_redirects=True)
        self._breaker = breaker
        self._stats = stats

    async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        self._breaker.check()
        self._stats.calls += 1
        if attempts(request) > 1:
            self._stats.retries += 1
        try:
            response = await super().send(request, **kwargs)
        except httpx2.TransportError:
            self._breaker.record(failed=True)
            self._breaker.check()
            raise
        self._breaker.record(failed=_endpoint_failed(response.status_code))
        if self._breaker.is_open:
            await response.aclose()
            self._breaker.check()
        return response


@dataclass
class _Connection:
    loop: asyncio.AbstractEventLoop
    client: openai.AsyncOpenAI
    users: int = 0


class ChatEndpoint:
    """Chat completions through the SDK, one SDK client per event loop; state that outlives loops."""

    def __init__(self, settings: JudgeSettings, stats: JudgeStats) -> None:
        self.settings = settings
        self.stats = stats
        self.base_url = api_root(settings.base_url)
        self.url = f"{self.base_url}/chat/completions"
        self.structured_output = True  # switched off once when the server refuses response_format
        self._breaker = _Breaker(settings.breaker_threshold, settings.breaker_cooldown_seconds)
        self._headers = {} if settings.api_key else {"Authorization": openai.omit}
        self._connection: _Connection | None = None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """An SDK client for the running loop, opened by the outermost call and closed when it ends."""
        loop = asyncio.get_running_loop()
        if self._connection is None or self._connection.loop is not loop:
            self._connection = _Connection(loop, self._new_client())
        connection = self._connection
        connection.users += 1
        try:
            yield
        finally:
            connection.users -= 1
            if connection.users == 0:
                if self._connection is connection:
                    self._connection = None
                await connection.client.close()

    def _new_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self.settings.api_key or NO_KEY,
            max_retries=self.settings.max_retries,
            timeout=self.settings.timeout_seconds,
            http_client=_GuardedClient(self._breaker, self.stats, self.settings.timeout_seconds),
        )

    async def complete(self, messages: Conversation, schema: dict[str, Any], temperature: float) -> ChatReply:
        structured = self.structured_output
        try:
            completion = await self._create(messages, schema if structured else None, temperature)
        except openai.BadRequestError as error:
            if not (structured and "response_format" in error.response.text):
                raise self._failure(error) from None
            if self.structured_output:
                logger.warning("judge endpoint refuses response_format; using the tolerant parser instead")
            self.structured_output = False
            return await self.complete(messages, schema, temperature)
        except openai.OpenAIError as error:
            raise self._failure(error) from None
        except json.JSONDecodeError as error:
            raise _not_a_completion(error.doc) from None
        return _reply(completion)

    async def _create(
        self, messages: Conversation, schema: dict[str, Any] | None, temperature: float
    ) -> ChatCompletion:
        assert self._connection is not None, "complete() outside session()"
        return await self._connection.client.chat.completions.create(
            model=self.settings.model,
            messages=cast(list[ChatCompletionMessageParam], messages),
            temperature=temperature,
            max_tokens=self.settings.max_tokens,
            response_format=openai.omit if schema is None else _json_schema_format(schema),
            extra_headers=self._headers,
        )

    def _failure(self, error: openai.OpenAIError) -> Exception:
        """The SDK's error as one line: `ItemRejected` for this item alone, else `JudgeUnavailable`."""
        where = f"judge {self.settings.model} at {self.url}"
        if isinstance(error, CircuitOpen):
            return JudgeUnavailable(f"{where} is unavailable: {error}")
        if isinstance(error, openai.APIStatusError):
            return _status_failure(where, error)
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__
            problem = (
                f"{type(cause).__name__}: {brief(str(cause)) or 'no answer'}" if cause else error.message
            )
            return JudgeUnavailable(f"{where} failed after {attempts(error.request)} attempts: {problem}")
        return JudgeUnavailable(f"{where} failed: {brief(str(error))}")


def _json_schema_format(schema: dict[str, Any]) -> ResponseFormatJSONSchema:
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}


def _status_failure(where: str, error: openai.APIStatusError) -> Exception:
    status = error.status_code
    if status in ITEM_STATUS:
        return ItemRejected(f"judge refused the item (HTTP {status}): {brief(error_message(error))}")
    said = f"HTTP {status}: {brief(error.response.text)}"
    if attempts(error.request) > 1:
        return JudgeUnavailable(f"{where} failed after {attempts(error.request)} attempts: {said}")
    return JudgeUnavailable(f"{where} answered {said}")


def attempts(request: httpx2.Request) -> int:
    """How many attempts the SDK made, read from the last one's retry number."""
    return int(request.headers.get(RETRY_COUNT_HEADER, "0")) + 1


def api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else f"{root}/v1"


def _reply(completion: ChatCompletion) -> ChatReply:
    try:
        text = completion.choices[0].message.content or ""
    except (AttributeError, IndexError, TypeError):
        raise _not_a_completion(completion.to_json(indent=None)) from None
    usage = completion.usage
    prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
    return ChatReply(text, int(prompt_tokens), int(getattr(usage, "completion_tokens", 0) or 0))


def _not_a_completion(text: str) -> JudgeUnavailable:
    return JudgeUnavailable(f"judge answered something that is not a chat completion: {brief(text)}")


def error_message(error: openai.APIStatusError) -> str:
    body = error.body  # the SDK has already unwrapped {"error": ...}
    if isinstance(body, dict):
        return str(cast(dict[str, Any], body).get("message", body))
    return str(body) if body else error.response.text


def brief(text: str, limit: int = 160) -> str:
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
    stats: JudgeStats = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.settings.model
        self.stats = JudgeStats()
        self._endpoint = ChatEndpoint(self.settings, self.stats)
        self._budget = _Budget(self.settings.budget_items)

    async def score(
        self,
        rubric: Rubric,
        conversations: Sequence[Conversation],
        responses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> list[JudgeResult]:
        """Pointwise: each response scored on the rubric's scale, normalised to [0, 1].

        With `settings.prompt == "compact"` the judge gets the compact prompt and schema (score only),
        and verdicts are cached under the compact style's keys.
        """
        references = references or [None] * len(responses)
        style = self.settings.prompt
        build = build_compact_messages if style == "compact" else build_pointwise_messages
        schema = compact_schema(rubric) if style == "compact" else pointwise_schema(rubric)
        keys = [
            judge_cache_key(self.model, rubric, conv, resp, ref, style=style)
            for conv, resp, ref in zip(conversations, responses, references, strict=True)
        ]

        def judge_one(index: int) -> Awaitable[JudgeResult]:
            messages = build(rubric, conversations[index], responses[index], references[index])
            return self._ask(messages, schema, lambda text: [parse_pointwise(text, rubric)])

        async with self._endpoint.session():
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

        With `settings.prompt == "compact"` each candidate is scored on its own instead, with the
        compact pointwise prompt: a small judge trained on one response at a time cannot compare
        candidates. The result has the same shape (one list per group, in the caller's order); the
        budget and the cache work per candidate as in `score()`, so a group may be partly skipped;
        identical candidates are judged once.
        """
        references = references or [None] * len(candidates)
        if self.settings.prompt == "compact":
            return await self._score_groups_pointwise(rubric, conversations, candidates, references)
        semaphore = asyncio.Semaphore(self.settings.concurrency)

        async def one(index: int) -> list[JudgeResult]:
            async with semaphore:
                return await self._score_group(
                    rubric, conversations[index], list(candidates[index]), references[index], index
                )

        async with self._endpoint.session():
            return list(await asyncio.gather(*(one(index) for index in range(len(candidates)))))

    async def _score_groups_pointwise(
        self,
        rubric: Rubric,
        conversations: Sequence[Conversation],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str | None],
    ) -> list[list[JudgeResult]]:
        """Every distinct candidate of every group through `score()` at once, then regrouped.

        Identical candidates (same conversation, response and reference: same cache key) are judged
        once and share the verdict, as sampled groups often repeat a reply.
        """
        index_of: dict[str, int] = {}
        flat_conversations: list[Conversation] = []
        flat_responses: list[str] = []
        flat_references: list[str | None] = []
        positions: list[list[int]] = []
        for conversation, group, reference in zip(conversations, candidates, references, strict=True):
            row = []
            for response in group:
                key = judge_cache_key(
                    self.model, rubric, conversation, response, reference, style=self.settings.prompt
                )
                if key not in index_of:
                    index_of[key] = len(flat_responses)
                    flat_conversations.append(conversation)
                    flat_responses.append(response)
                    flat_references.append(reference)
                row.append(index_of[key])
            positions.append(row)
        verdicts = await self.score(rubric, flat_conversations, flat_responses, flat_references)
        return [[verdicts[index] for index in row] for row in positions]

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
                reply = await self._endpoint.complete(messages, schema, temperature)
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
