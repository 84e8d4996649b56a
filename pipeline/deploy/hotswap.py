"""Deploy a track's adapter version: load it on every vLLM endpoint, probe it, flip the route.

Clients call a track's stable name `<track>` through the gateway (`pipeline.deploy.gateway`), which
sends each request to the pinned adapter `<track>@v<N>` the track's route points at; `<track>@v<N>`
pins a version. vLLM itself never serves a stable name, so no adapter is ever reloaded in place (vLLM
keeps re-loading an adapter loaded with `load_inplace`, and its prefix cache is keyed by adapter, so
a pinned name also never meets another version's cached prefixes). A deploy, or a rollback (the same
procedure toward an older version):

    checksum  the adapter's sha256, before any endpoint is touched
    route     read what the track's route serves now (it becomes the previous version)
    inspect   each endpoint's adapter list
    load      the version under its pinned name on each endpoint (nothing that serves changes)
    probe     greedy replies of the pinned name to fixed prompts: it answers; its fingerprint
    flip      point the route at the pinned name and write one `deployments` row per endpoint, in
              one transaction, only if the route still points where `route` read it (a concurrent
              deploy or rollback of the track fails this one): every gateway follows within a second
    prune     unload pinned versions beyond `keep_versions` that no request can still reach (below);
              after the flip, so it never unloads what the route serves, and a failure is a warning

All or nothing up to the flip: if a step fails on any endpoint, the pinned names this deploy loaded are unloaded
again, the route is not flipped (every gateway keeps sending the stable name to the version it
served), failed rows are recorded, the error names the endpoint and the step, and the caller (who
moves the registry alias only after success) moves nothing. The previous version stays loaded, so a
rollback to it is a flip with nothing to load.

Pruning never touches the new version nor the route's current one (the next `previous`). Any other
pinned version left the stable name at the route's last flip at the latest, and is unloaded (beyond
the newest `keep_versions`) only once that flip is `unload_grace_seconds` old; before that the next
deploy prunes it. A grace period rather than in-flight counts, because deploys run in other
processes than the gateways (the CLI, the Prefect worker) and gateways are stateless replicas a
deploy does not know the addresses of: one replica's count would say nothing of the others. vLLM
0.32's unload only drops the name from its table (a request it admitted finishes on the weights it
holds), so what the grace covers is a request a gateway resolved to the old name just before it saw
the flip. A deploy run inside a gateway process may pass `in_flight` (`Gateway.in_flight`) and then
also keeps every version with requests in flight. A client pinning a version that was unloaded gets
vLLM's 404, as for any version not served.
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
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pipeline.adapters import AdapterInvalid, AdapterVersion, verify_adapter
from pipeline.deploy.vllm_client import Chat, ServedAdapter, ServerRequestFailed, VllmClient
from pipeline.results import Swap
from storage.errors import UserError
from storage.models import Deployment, Route
from storage.routes import RouteMoved, flip_route, read_routes

__all__ = [
    "PROBE_PROMPTS",
    "EndpointClient",
    "SwapFailed",
    "deploy",
    "fingerprint",
    "pinned_version",
    "prune_due",
    "versions_to_unload",
]

logger = logging.getLogger(__name__)

# Short, fixed and varied: greedy replies to these identify an adapter's weights.
PROBE_PROMPTS: tuple[Chat, ...] = (
    [{"role": "user", "content": "Hi, my router keeps disconnecting."}],
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "user", "content": "Summarize the ticket in one sentence."}],
)
# enough tokens for versions to diverge, few enough to keep a deploy fast: decoding the probes is most
# of a deploy (measured: 16 tokens, 305 ms of a 382 ms deploy under load on 2 CPU cores)
PROBE_MAX_TOKENS = 8
ALL_ENDPOINTS = "all endpoints"  # the failed endpoint of a step that is not any one endpoint's

_PINNED = re.compile(r"^(?P<track>.+)@v(?P<version>\d+)$")


class EndpointClient(Protocol):
    """What a deploy needs from one serving endpoint (`VllmClient` is the real one)."""

    base_url: str

    def adapters(self) -> Mapping[str, ServedAdapter]: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

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
    """A deploy step failed on an endpoint; the route still serves what it served before."""

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


def prune_due(last_flip: datetime | None, now: datetime, grace_seconds: float) -> bool:
    """Whether versions that left the stable name at `last_flip` (None: never routed) may be unloaded."""
    return last_flip is None or (now - last_flip).total_seconds() >= grace_seconds


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
class _EndpointDeploy:
    """Progress of the deploy on one endpoint: what it loaded and did (mutable)."""

    endpoint: str
    client: EndpointClient
    loaded_pinned: bool = False  # this deploy loaded the pinned name (unload it if the deploy fails)
    fingerprint: str = ""
    unloaded: list[str] = field(default_factory=list)
    kept_in_flight: list[str] = field(default_factory=list)
    prune_error: str | None = None  # why pruning failed after the flip (the deploy stands)
    step_ms: dict[str, float] = field(default_factory=dict)


def _run_step(endpoint: _EndpointDeploy, step: str, action: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        return action()
    except UserError as error:  # ServerUnavailable, ServerRequestFailed: one line naming the endpoint
        raise _StepFailed(step, _without_endpoint(str(error), endpoint.endpoint)) from None
    finally:
        endpoint.step_ms[step] = round((time.perf_counter() - start) * 1000, 2)


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


def _load_and_probe(endpoint: _EndpointDeploy, adapter: AdapterVersion, prompts: Sequence[Chat]) -> None:
    """inspect, load, probe on one endpoint; raises `_StepFailed`."""
    client, pinned, path = endpoint.client, adapter.pinned_name, str(adapter.path)
    before: Mapping[str, ServedAdapter] = _run_step(endpoint, "inspect", client.adapters)

    def load() -> None:
        if pinned in before:
            if before[pinned].path != path:
                raise _StepFailed(
                    "load", f"{pinned} is already loaded from {before[pinned].path}, not {path}"
                )
            return  # resident already (the previous version of a rollback, or a re-run)
        endpoint.loaded_pinned = True
        client.load_adapter(pinned, path)

    _run_step(endpoint, "load", load)
    endpoint.fingerprint = _run_step(endpoint, "probe", lambda: _probe(client, pinned, prompts))


@dataclass(frozen=True)
class _Pruning:
    """What a deploy may unload: nothing before the grace, never `protected`, nothing in flight."""

    keep_versions: int
    protected: tuple[int | None, ...]
    due: bool
    in_flight: Callable[[str], int] | None


def _prune(endpoint: _EndpointDeploy, track: str, pruning: _Pruning) -> None:
    def prune() -> None:
        loaded = endpoint.client.adapters()
        names = versions_to_unload(
            loaded, track, keep_versions=pruning.keep_versions, protected=pruning.protected
        )
        for name in names:
            if pruning.in_flight is not None and pruning.in_flight(name) > 0:
                endpoint.kept_in_flight.append(name)
                continue
            _unload_if_loaded(endpoint.client, name)  # another deploy may have unloaded it already
            endpoint.unloaded.append(name)

    if not pruning.due:
        return
    try:  # tidying after the flip: a failure is a warning, the next deploy prunes again
        _run_step(endpoint, "prune", prune)
    except _StepFailed as failure:
        endpoint.prune_error = failure.reason
        logger.warning("%s: prune: %s (the next deploy prunes again)", endpoint.endpoint, failure.reason)


def _withdraw(endpoint: _EndpointDeploy, adapter: AdapterVersion) -> bool:
    """Unload the pinned name this deploy loaded (tidying: the route never pointed at it); True if done."""
    if not endpoint.loaded_pinned:
        return True
    try:
        _unload_if_loaded(endpoint.client, adapter.pinned_name)
    except UserError as error:
        logger.warning("could not unload %s on %s: %s", adapter.pinned_name, endpoint.endpoint, error)
        return False
    return True


def _unload_if_loaded(client: EndpointClient, name: str) -> None:
    try:
        client.unload_adapter(name)
    except ServerRequestFailed as error:
        if error.status_code != 404:
            raise


# --------------------------------------------------------------------------- SQL


def _row(
    endpoint: _EndpointDeploy,
    adapter: AdapterVersion,
    action: str,
    status: str,
    previous: int | None,
    **extra: Any,
) -> Deployment:
    detail: dict[str, Any] = {
        "path": str(adapter.path),
        "sha256": adapter.sha256,
        "fingerprint": endpoint.fingerprint or None,
        "previous_version": previous,
        "unloaded": endpoint.unloaded,
        "kept_in_flight": endpoint.kept_in_flight,
        "step_ms": endpoint.step_ms,
        **extra,
    }
    return Deployment(
        track=adapter.track,
        version=str(adapter.version),
        adapter_name=adapter.pinned_name,
        endpoint=endpoint.endpoint,
        action=action,
        status=status,
        detail=detail,
    )


def _record_failure(engine: sqlalchemy.Engine, rows: Sequence[Deployment]) -> None:
    try:
        with Session(engine) as session, session.begin():
            session.add_all(rows)
    except SQLAlchemyError as error:  # the deploy error matters more than the bookkeeping one
        logger.error("could not record the failed deployment: %s", _first_line(error))


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# --------------------------------------------------------------------------- deploy


def deploy(
    adapter: AdapterVersion,
    endpoints: Sequence[str],
    *,
    engine: sqlalchemy.Engine,
    api_key: str | None = None,
    keep_versions: int = 2,
    unload_grace_seconds: float = 60.0,
    in_flight: Callable[[str], int] | None = None,
    action: str = "deploy",
    probe_prompts: Sequence[Chat] = PROBE_PROMPTS,
    client_factory: Callable[[str], EndpointClient] | None = None,
) -> Swap:
    """Load `adapter` on every endpoint and flip its track's route to it, or change nothing that serves
    (see the module doc). Raises `SwapFailed` naming the endpoint and step."""
    if not endpoints:
        raise UserError("serving.endpoints: no endpoint to deploy to")
    if keep_versions < 2:
        raise UserError(f"serving.keep_versions: {keep_versions} < 2 (the previous version must stay loaded)")
    start = time.perf_counter()
    factory = client_factory or (lambda url: VllmClient(url, api_key=api_key))
    targets = [_EndpointDeploy(url, factory(url)) for url in endpoints]
    try:
        _checksum(adapter, targets, engine, action)
        route = _current_route(adapter, targets, engine, action)
        pruning = _Pruning(
            keep_versions,
            (adapter.version, _route_version(route, adapter.track)),
            prune_due(route.updated_at if route else None, datetime.now(UTC), unload_grace_seconds),
            in_flight,
        )
        _apply_everywhere(adapter, targets, engine, action, route, pruning, probe_prompts)
    finally:
        for target in targets:
            target.client.close()
    seconds = time.perf_counter() - start
    logger.info("%s %s on %d endpoint(s) in %.3fs", action, adapter.pinned_name, len(targets), seconds)
    previous = _route_version(route, adapter.track)
    return Swap(
        track=adapter.track,
        version=adapter.version,
        action=action,
        endpoints=[target.endpoint for target in targets],
        seconds=seconds,
        fingerprint=targets[0].fingerprint,
        previous={target.endpoint: previous for target in targets},
        unloaded=sorted({name for target in targets for name in target.unloaded}),
        prune="done" if pruning.due else "deferred",
    )


def _route_version(route: Route | None, track: str) -> int | None:
    return pinned_version(route.adapter_name, track) if route is not None else None


def _checksum(
    adapter: AdapterVersion, targets: Sequence[_EndpointDeploy], engine: sqlalchemy.Engine, action: str
) -> None:
    """The adapter must be whole and the recorded bytes before any endpoint sees it."""
    try:
        verify_adapter(adapter.path, adapter.sha256)
    except AdapterInvalid as error:
        rows = [
            _row(target, adapter, action, "failed", None, step="checksum", error=str(error))
            for target in targets
        ]
        _record_failure(engine, rows)
        raise SwapFailed(", ".join(target.endpoint for target in targets), "checksum", str(error)) from None


def _current_route(
    adapter: AdapterVersion, targets: Sequence[_EndpointDeploy], engine: sqlalchemy.Engine, action: str
) -> Route | None:
    try:
        return read_routes(engine).get(adapter.track)
    except SQLAlchemyError as error:
        reason = f"cannot read the route table: {_first_line(error)}"
        _record_failure(
            engine, [_row(t, adapter, action, "failed", None, step="route", error=reason) for t in targets]
        )
        raise SwapFailed(ALL_ENDPOINTS, "route", reason) from None


def _apply_everywhere(
    adapter: AdapterVersion,
    targets: Sequence[_EndpointDeploy],
    engine: sqlalchemy.Engine,
    action: str,
    route: Route | None,
    pruning: _Pruning,
    probe_prompts: Sequence[Chat],
) -> None:
    touched: list[_EndpointDeploy] = []
    current = targets[0]
    previous = _route_version(route, adapter.track)
    rows: list[Deployment] = []
    try:
        for current in targets:
            touched.append(current)
            logger.info("%s %s on %s", action, adapter.pinned_name, current.endpoint)
            _load_and_probe(current, adapter, probe_prompts)
        rows = [_row(target, adapter, action, "ok", previous) for target in targets]
        expected = route.adapter_name if route is not None else None
        try:
            flip_route(
                engine,
                adapter.track,
                str(adapter.version),
                adapter.pinned_name,
                expected=expected,
                deployments=rows,
            )
        except RouteMoved as moved:
            raise _StepFailed("flip", f"{moved}: nothing flipped; run it again") from None
        except SQLAlchemyError as error:
            # The commit may have happened before the error (a connection lost on COMMIT, or the
            # read after it failing): then the flip and its rows are in, and the deploy succeeded.
            if _routed_to(engine, adapter) is not True:
                raise _StepFailed("flip", f"cannot flip the route: {_first_line(error)}") from None
    except _StepFailed as failure:
        _fail(adapter, targets, touched, engine, action, previous, current, failure)
    except BaseException:  # a bug or Ctrl-C mid-deploy: tidy up unless the route flipped already
        if _routed_to(engine, adapter) is False:
            for target in reversed(touched):
                _withdraw(target, adapter)
        raise
    for target in targets:  # after the flip: what it unloads can no longer be what the route serves
        _prune(target, adapter.track, pruning)
    _record_pruning(engine, rows, targets)


def _record_pruning(
    engine: sqlalchemy.Engine, rows: Sequence[Deployment], targets: Sequence[_EndpointDeploy]
) -> None:
    """Add what each endpoint's pruning did to its `ok` row (written with the flip, before pruning)."""
    try:
        with Session(engine) as session, session.begin():
            for row, target in zip(rows, targets, strict=True):
                detail = {
                    **row.detail,
                    "unloaded": target.unloaded,
                    "kept_in_flight": target.kept_in_flight,
                    "step_ms": target.step_ms,
                    "prune_error": target.prune_error,
                }
                session.execute(
                    sqlalchemy.update(Deployment).where(Deployment.id == row.id).values(detail=detail)
                )
    except SQLAlchemyError as error:  # bookkeeping only: the deploy stands
        logger.warning("could not record the pruning of the deployment: %s", _first_line(error))


def _routed_to(engine: sqlalchemy.Engine, adapter: AdapterVersion) -> bool | None:
    """Whether the route sends the track to this version now; None when the store cannot say."""
    try:
        route = read_routes(engine).get(adapter.track)
    except SQLAlchemyError:
        return None
    return route is not None and route.adapter_name == adapter.pinned_name


def _fail(
    adapter: AdapterVersion,
    targets: Sequence[_EndpointDeploy],
    touched: Sequence[_EndpointDeploy],
    engine: sqlalchemy.Engine,
    action: str,
    previous: int | None,
    failed: _EndpointDeploy,
    failure: _StepFailed,
) -> None:
    endpoint = ALL_ENDPOINTS if failure.step == "flip" else failed.endpoint
    logger.error(
        "%s %s failed: %s: %s: %s", action, adapter.pinned_name, endpoint, failure.step, failure.reason
    )
    # Never unload what the route points at (a redeploy of the routed version) or may point at.
    may_unload = _routed_to(engine, adapter) is False
    withdrawn = {target.endpoint: may_unload and _withdraw(target, adapter) for target in reversed(touched)}
    rows = [
        _row(
            target,
            adapter,
            action,
            "failed",
            previous,
            step=failure.step,
            failed_endpoint=endpoint,
            error=failure.reason,
            withdrawn=withdrawn.get(target.endpoint, True),
        )
        for target in targets
    ]
    _record_failure(engine, rows)
    raise SwapFailed(endpoint, failure.step, failure.reason)
