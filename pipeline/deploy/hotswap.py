"""Deploy a track's adapter version onto every vLLM endpoint so that no client ever sees an error.

Clients call the stable name `<track>`; `<track>@v<N>` pins a version. A deploy (or a rollback, the
same procedure toward an older version) runs these steps on each endpoint in turn:

    inspect  what the endpoint serves now (its adapter list), to know what to switch back to
    load     the new version under its pinned name (a second name: nothing that serves changes)
    probe    greedy replies of the pinned name to fixed probe prompts: the version's fingerprint
    switch   the stable name now points at the new directory (vLLM `load_inplace`: no gap, no 404)
    reset    drop the prefix cache where the server allows it
    verify   the stable name answers the probes exactly as the pinned name does

then `prune` unloads pinned versions beyond `keep_versions` (never the serving one nor the previous
one, so a rollback needs no load from disk) and `record` writes one `deployments` row per endpoint.
The adapter's sha256 is checked (`checksum`) before any endpoint is touched.

All or nothing: if a step fails on any endpoint, every endpoint already touched is switched back to
the directory its stable name served before, the error names the endpoint and the step, failed rows
are recorded, and the caller (who moves the registry alias only after success) moves nothing.

Why verify with retries: vLLM applies a LoRA's weights per engine step from the most recently
scheduled request of that adapter id; a request that resolved the stable name just before the switch
can still be admitted afterwards and, for a few steps, carry the previous weights. A verification
that matches the pinned fingerprint once in-flight requests drained is the signal; a mismatch that
persists (wrong weights, stale cache) fails the swap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pipeline.adapters import AdapterInvalid, AdapterVersion, verify_adapter
from pipeline.deploy.vllm_client import Chat, ServedAdapter, ServerRequestFailed, VllmClient
from pipeline.results import Swap
from storage.errors import UserError
from storage.models import Deployment

__all__ = [
    "PROBE_PROMPTS",
    "EndpointClient",
    "SwapFailed",
    "deploy",
    "fingerprint",
    "pinned_version",
    "serving_versions",
    "version_serving",
    "versions_to_unload",
]

logger = logging.getLogger(__name__)

# Short, fixed and varied: greedy replies to these identify an adapter's weights.
PROBE_PROMPTS: tuple[Chat, ...] = (
    [{"role": "user", "content": "Hi, my router keeps disconnecting."}],
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "user", "content": "Summarize the ticket in one sentence."}],
)
PROBE_MAX_TOKENS = 16  # enough tokens for versions to diverge, few enough to keep a swap fast
VERIFY_ATTEMPTS = 10  # tries for the stable name to match the pinned fingerprint
VERIFY_PAUSE_SECONDS = 0.1  # between tries: lets requests admitted before the switch drain

_PINNED = re.compile(r"^(?P<track>.+)@v(?P<version>\d+)$")


class EndpointClient(Protocol):
    """What a deploy needs from one serving endpoint (`VllmClient` is the real one)."""

    base_url: str

    def adapters(self) -> Mapping[str, ServedAdapter]: ...

    def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def reset_prefix_cache_outcome(self) -> str: ...

    def chat(
        self,
        model: str,
        messages: Chat,
        *,
        max_tokens: int = 48,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str: ...

    def close(self) -> None: ...


class SwapFailed(UserError):
    """A deploy step failed on an endpoint; every endpoint serves what it served before."""

    def __init__(self, endpoint: str, step: str, reason: str) -> None:
        super().__init__(f"{endpoint}: {step}: {reason}")
        self.endpoint = endpoint
        self.step = step
        self.reason = reason


# --------------------------------------------------------------------------- pure logic


def pinned_version(name: str, track: str) -> int | None:
    """N for a served name `<track>@v<N>`, None for any other name."""
    match = _PINNED.match(name)
    if match is None or match["track"] != track:
        return None
    return int(match["version"])


def version_serving(adapters: Mapping[str, ServedAdapter], track: str) -> int | None:
    """The version the stable name serves: the pinned name loaded from the same directory.

    None when the stable name is not loaded or no pinned name shares its directory.
    """
    stable = adapters.get(track)
    if stable is None or stable.path is None:
        return None
    versions = [
        version
        for name, adapter in adapters.items()
        if (version := pinned_version(name, track)) is not None and adapter.path == stable.path
    ]
    return max(versions, default=None)


def versions_to_unload(
    loaded_names: Iterable[str], track: str, *, keep_versions: int, protected: Iterable[int | None]
) -> list[str]:
    """Pinned names of `track` beyond the newest `keep_versions`, except `protected` versions."""
    keep = set(protected)
    versions = sorted(
        (version for name in loaded_names if (version := pinned_version(name, track)) is not None),
        reverse=True,
    )
    return [f"{track}@v{version}" for version in versions[keep_versions:] if version not in keep]


def fingerprint(replies: Sequence[str]) -> str:
    """sha256 of greedy replies, in probe order."""
    return hashlib.sha256(json.dumps(list(replies), ensure_ascii=False).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- one endpoint


class _StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason


@dataclass
class _EndpointSwap:
    """Progress of the deploy on one endpoint: what to switch back to and what was done (mutable)."""

    endpoint: str
    client: EndpointClient
    previous_path: str | None = None  # the directory the stable name served before
    previous_version: int | None = None
    loaded_pinned: bool = False  # this deploy loaded the pinned name (unload it on switch-back)
    switch_attempted: bool = False
    fingerprint: str = ""
    prefix_cache: str = "not tried"
    verify_attempts: int = 0
    unloaded: list[str] = field(default_factory=list)
    step_ms: dict[str, float] = field(default_factory=dict)


def _run_step(swap: _EndpointSwap, step: str, action: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        return action()
    except UserError as error:  # ServerUnavailable, ServerRequestFailed: one line naming the endpoint
        raise _StepFailed(step, _without_endpoint(str(error), swap.endpoint)) from None
    finally:
        swap.step_ms[step] = round((time.perf_counter() - start) * 1000, 2)


def _without_endpoint(message: str, endpoint: str) -> str:
    prefix = f"{endpoint.rstrip('/')}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _probe(client: EndpointClient, model: str, prompts: Sequence[Chat]) -> str:
    """The fingerprint of `model`'s greedy replies; the prompts go out together (the server batches)."""
    with ThreadPoolExecutor(max_workers=max(1, len(prompts))) as pool:
        replies = list(
            pool.map(
                lambda chat: client.chat(model, chat, max_tokens=PROBE_MAX_TOKENS, temperature=0.0), prompts
            )
        )
    return fingerprint(replies)


def _swap_endpoint(swap: _EndpointSwap, adapter: AdapterVersion, prompts: Sequence[Chat]) -> None:
    """load, probe, switch, reset, verify on one endpoint; raises `_StepFailed`."""
    client, track, pinned, path = swap.client, adapter.track, adapter.pinned_name, str(adapter.path)
    before: Mapping[str, ServedAdapter] = _run_step(swap, "inspect", client.adapters)
    swap.previous_path = before[track].path if track in before else None
    swap.previous_version = version_serving(before, track)

    def load() -> None:
        if pinned in before:
            if before[pinned].path != path:
                raise _StepFailed(
                    "load", f"{pinned} is already loaded from {before[pinned].path}, not {path}"
                )
            return
        swap.loaded_pinned = True
        client.load_adapter(pinned, path)

    _run_step(swap, "load", load)
    swap.fingerprint = _run_step(swap, "probe", lambda: _probe(client, pinned, prompts))

    def switch() -> None:
        if swap.previous_path == path:
            return  # already serving this directory (a re-run after a crash): nothing to replace
        swap.switch_attempted = True
        client.load_adapter(track, path, inplace=track in before)

    _run_step(swap, "switch", switch)
    swap.prefix_cache = _run_step(swap, "reset", client.reset_prefix_cache_outcome)
    _run_step(swap, "verify", lambda: _verify(swap, track, prompts))


def _verify(swap: _EndpointSwap, track: str, prompts: Sequence[Chat]) -> None:
    served = ""
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        swap.verify_attempts = attempt
        served = _probe(swap.client, track, prompts)
        if served == swap.fingerprint:
            return
        time.sleep(VERIFY_PAUSE_SECONDS)
        swap.prefix_cache = swap.client.reset_prefix_cache_outcome()
    raise _StepFailed(
        "verify",
        f"{track!r} answers the probes with fingerprint {served[:12]} but the new version gives "
        f"{swap.fingerprint[:12]} (after {VERIFY_ATTEMPTS} tries)",
    )


def _prune(swap: _EndpointSwap, adapter: AdapterVersion, keep_versions: int) -> None:
    def prune() -> None:
        loaded = swap.client.adapters()
        protected = (adapter.version, swap.previous_version)
        for name in versions_to_unload(
            loaded, adapter.track, keep_versions=keep_versions, protected=protected
        ):
            swap.client.unload_adapter(name)
            swap.unloaded.append(name)

    _run_step(swap, "prune", prune)


def _switch_back(swap: _EndpointSwap, adapter: AdapterVersion) -> str | None:
    """Restore what the stable name served before; None, or why that failed too.

    Unloading the pinned name this deploy added is tidying: if that fails, nothing served changed.
    """
    problem = None
    if swap.switch_attempted:
        try:
            if swap.previous_path is None:
                _unload_if_loaded(swap.client, adapter.track)
            else:
                swap.client.load_adapter(adapter.track, swap.previous_path, inplace=True)
            swap.client.reset_prefix_cache_outcome()
            logger.warning("switched %s on %s back to %s", adapter.track, swap.endpoint, swap.previous_path)
        except UserError as error:
            logger.error("switch-back failed on %s: %s", swap.endpoint, error)
            problem = _without_endpoint(str(error), swap.endpoint)
    if swap.loaded_pinned:
        try:
            _unload_if_loaded(swap.client, adapter.pinned_name)
        except UserError as error:
            logger.warning("could not unload %s on %s: %s", adapter.pinned_name, swap.endpoint, error)
    return problem


def _unload_if_loaded(client: EndpointClient, name: str) -> None:
    try:
        client.unload_adapter(name)
    except ServerRequestFailed as error:
        if error.status_code != 404:
            raise


# --------------------------------------------------------------------------- SQL


def _row(swap: _EndpointSwap, adapter: AdapterVersion, action: str, status: str, **extra: Any) -> Deployment:
    detail: dict[str, Any] = {
        "path": str(adapter.path),
        "sha256": adapter.sha256,
        "fingerprint": swap.fingerprint or None,
        "previous_version": swap.previous_version,
        "previous_path": swap.previous_path,
        "prefix_cache": swap.prefix_cache,
        "verify_attempts": swap.verify_attempts,
        "unloaded": swap.unloaded,
        "step_ms": swap.step_ms,
        **extra,
    }
    return Deployment(
        track=adapter.track,
        version=str(adapter.version),
        adapter_name=adapter.pinned_name,
        endpoint=swap.endpoint,
        action=action,
        status=status,
        detail=detail,
    )


def _record(engine: sqlalchemy.Engine, rows: Sequence[Deployment]) -> None:
    with Session(engine) as session, session.begin():
        session.add_all(rows)


def _record_failure(engine: sqlalchemy.Engine, rows: Sequence[Deployment]) -> None:
    try:
        _record(engine, rows)
    except SQLAlchemyError as error:  # the swap error matters more than the bookkeeping one
        logger.error("could not record the failed deployment: %s", str(error).splitlines()[0])


# --------------------------------------------------------------------------- deploy


def deploy(
    adapter: AdapterVersion,
    endpoints: Sequence[str],
    *,
    engine: sqlalchemy.Engine,
    api_key: str | None = None,
    keep_versions: int = 2,
    action: str = "deploy",
    probe_prompts: Sequence[Chat] = PROBE_PROMPTS,
    client_factory: Callable[[str], EndpointClient] | None = None,
) -> Swap:
    """Serve `adapter` under its track's stable name on every endpoint, or on none (see the module doc).

    Raises `SwapFailed` naming the endpoint and step; every endpoint then serves what it served before.
    """
    if not endpoints:
        raise UserError("serving.endpoints: no endpoint to deploy to")
    if keep_versions < 2:
        raise UserError(f"serving.keep_versions: {keep_versions} < 2 (the previous version must stay loaded)")
    start = time.perf_counter()
    factory = client_factory or (lambda url: VllmClient(url, api_key=api_key))
    swaps = [_EndpointSwap(url, factory(url)) for url in endpoints]
    try:
        _checksum(adapter, swaps, engine, action)
        _apply_everywhere(adapter, swaps, engine, action, keep_versions, probe_prompts)
    finally:
        for swap in swaps:
            swap.client.close()
    seconds = time.perf_counter() - start
    logger.info("%s %s on %d endpoint(s) in %.3fs", action, adapter.pinned_name, len(swaps), seconds)
    return Swap(
        track=adapter.track,
        version=adapter.version,
        action=action,
        endpoints=[swap.endpoint for swap in swaps],
        seconds=seconds,
        fingerprint=swaps[0].fingerprint,
        previous={swap.endpoint: swap.previous_version for swap in swaps},
    )


def _checksum(
    adapter: AdapterVersion, swaps: Sequence[_EndpointSwap], engine: sqlalchemy.Engine, action: str
) -> None:
    """The adapter must be whole and the recorded bytes before any endpoint sees it."""
    try:
        verify_adapter(adapter.path, adapter.sha256)
    except AdapterInvalid as error:
        rows = [_row(swap, adapter, action, "failed", step="checksum", error=str(error)) for swap in swaps]
        _record_failure(engine, rows)
        raise SwapFailed(", ".join(swap.endpoint for swap in swaps), "checksum", str(error)) from None


def _apply_everywhere(
    adapter: AdapterVersion,
    swaps: Sequence[_EndpointSwap],
    engine: sqlalchemy.Engine,
    action: str,
    keep_versions: int,
    probe_prompts: Sequence[Chat],
) -> None:
    touched: list[_EndpointSwap] = []
    current = swaps[0]
    try:
        for current in swaps:
            touched.append(current)
            logger.info("%s %s on %s", action, adapter.pinned_name, current.endpoint)
            _swap_endpoint(current, adapter, probe_prompts)
        for current in swaps:
            _prune(current, adapter, keep_versions)
        try:
            _record(engine, [_row(swap, adapter, action, "ok") for swap in swaps])
        except SQLAlchemyError as error:
            raise _StepFailed(
                "record", f"cannot write the deployment rows: {str(error).splitlines()[0]}"
            ) from None
    except _StepFailed as failure:
        _fail(adapter, swaps, touched, engine, action, current, failure)
    except BaseException:  # a bug or Ctrl-C mid-swap: still leave every endpoint as it was
        for swap in reversed(touched):
            _switch_back(swap, adapter)
        raise


def _fail(
    adapter: AdapterVersion,
    swaps: Sequence[_EndpointSwap],
    touched: Sequence[_EndpointSwap],
    engine: sqlalchemy.Engine,
    action: str,
    failed: _EndpointSwap,
    failure: _StepFailed,
) -> None:
    endpoint = "all endpoints" if failure.step == "record" else failed.endpoint
    logger.error(
        "%s %s failed: %s: %s: %s", action, adapter.pinned_name, endpoint, failure.step, failure.reason
    )
    problems = {swap.endpoint: _switch_back(swap, adapter) for swap in reversed(touched)}
    rows = [
        _row(
            swap,
            adapter,
            action,
            "failed",
            step=failure.step,
            failed_endpoint=endpoint,
            error=failure.reason,
            switched_back=swap in touched and problems.get(swap.endpoint) is None,
            switch_back_error=problems.get(swap.endpoint),
        )
        for swap in swaps
    ]
    _record_failure(engine, rows)
    unrestored = [f"{url} ({problem})" for url, problem in problems.items() if problem is not None]
    suffix = f"; could not switch back: {', '.join(unrestored)}" if unrestored else ""
    raise SwapFailed(endpoint, failure.step, failure.reason + suffix)


# --------------------------------------------------------------------------- read-only


def serving_versions(
    endpoints: Sequence[str],
    track: str,
    *,
    api_key: str | None = None,
    client_factory: Callable[[str], EndpointClient] | None = None,
) -> dict[str, int | None]:
    """Per endpoint, the version the stable name `track` serves (None: not loaded or not pinned)."""
    factory = client_factory or (lambda url: VllmClient(url, api_key=api_key))
    versions: dict[str, int | None] = {}
    for url in endpoints:
        client = factory(url)
        try:
            versions[url] = version_serving(client.adapters(), track)
        finally:
            client.close()
    return versions
