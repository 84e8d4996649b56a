"""Deploys against fake endpoints: load and probe everywhere, then one route flip, or nothing moves.

`FakeEndpoint` behaves like vLLM's adapter API where a deploy relies on it: names map to adapter
directories, a name loads once, unknown names 404, and a chat reply is a function of the directory
the name serves. What the stable name serves is the route in the store (`storage.routes`), which
the gateway reads; vLLM never sees the stable name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import storage
from pipeline.adapters import AdapterVersion, adapter_sha256
from pipeline.deploy.hotswap import (
    PROBE_PROMPTS,
    SwapFailed,
    deploy,
    fingerprint,
    pinned_version,
    prune_due,
    versions_to_unload,
)
from pipeline.deploy.vllm_client import Chat, ServedAdapter, ServerRequestFailed, ServerUnavailable
from storage.models import Deployment, Route
from storage.routes import flip_route, read_routes

TRACK = "support"
A, B = "http://a:8000", "http://b:8000"


class FakeEndpoint:
    """A vLLM server's adapter table and deterministic per-directory replies; can fail on demand."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.served: dict[str, str] = {}  # name -> adapter directory
        self.fail_on: tuple[str, str | None] | None = None  # (method, name or None for any)
        self.down = False
        self.calls: list[tuple[str, str | None]] = []
        self.closed = False

    def _call(self, method: str, name: str | None = None) -> None:
        self.calls.append((method, name))
        if self.down:
            raise ServerUnavailable(f"{self.base_url}: {method}: cannot reach the vLLM server (ConnectError)")
        if self.fail_on is not None and self.fail_on[0] == method and self.fail_on[1] in (None, name):
            self.down = True  # it went down exactly here and stays down
            raise ServerUnavailable(f"{self.base_url}: {method}: cannot reach the vLLM server (ConnectError)")

    def adapters(self) -> Mapping[str, ServedAdapter]:
        self._call("adapters")
        return {name: ServedAdapter(name, path) for name, path in self.served.items()}

    def load_adapter(self, name: str, path: str) -> None:
        self._call("load_adapter", name)
        if name in self.served:
            raise ServerRequestFailed(f"{self.base_url}: load: HTTP 400: already loaded", 400)
        self.served[name] = path

    def unload_adapter(self, name: str) -> None:
        self._call("unload_adapter", name)
        if name not in self.served:
            raise ServerRequestFailed(f"{self.base_url}: unload: HTTP 404: not found", 404)
        del self.served[name]

    def chat(
        self,
        model: str,
        messages: Chat,
        *,
        max_tokens: int = 48,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str:
        self._call("chat", model)
        if model not in self.served:
            raise ServerRequestFailed(f"{self.base_url}: chat: HTTP 404: model {model} does not exist", 404)
        return reply_of(self.served[model], messages)

    def close(self) -> None:
        self.closed = True


def reply_of(path: str, messages: Chat) -> str:
    return f"{Path(path).name} says hi to {messages[-1]['content'][:8]}"


def make_adapter_dir(root: Path, version: int, track: str = TRACK) -> AdapterVersion:
    directory = root / track / f"v{version}"
    directory.mkdir(parents=True)
    config = {"base_model_name_or_path": "tiny", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    weights = {"lora_A": torch.full((2, 4), float(version)), "lora_B": torch.zeros(4, 2)}
    save_file(weights, str(directory / "adapter_model.safetensors"))
    return AdapterVersion(track, version, directory, adapter_sha256(directory))


@pytest.fixture
def versions(tmp_path: Path) -> dict[int, AdapterVersion]:
    return {n: make_adapter_dir(tmp_path / "adapters", n) for n in (1, 2, 3, 4)}


@pytest.fixture
def sql(tmp_path: Path) -> Engine:
    engine = storage.make_engine(f"sqlite:///{tmp_path / 'overnight.db'}")
    storage.upgrade(engine)
    return engine


@pytest.fixture
def fleet() -> dict[str, FakeEndpoint]:
    return {A: FakeEndpoint(A), B: FakeEndpoint(B)}


def serve(fleet: dict[str, FakeEndpoint], adapter: AdapterVersion, engine: Engine) -> None:
    """The state after `overnight serve`: the champion loaded under its pinned name, the route on it."""
    for endpoint in fleet.values():
        endpoint.served[adapter.pinned_name] = str(adapter.path)
    flip_route(engine, adapter.track, str(adapter.version), adapter.pinned_name)


def routed(engine: Engine) -> str | None:
    """The pinned name the gateway sends the stable name to."""
    route = read_routes(engine).get(TRACK)
    return route.adapter_name if route else None


def stable_reply(endpoint: FakeEndpoint, engine: Engine) -> str:
    """What a client calling the stable name through the gateway gets from `endpoint`."""
    name = routed(engine)
    assert name is not None
    return endpoint.chat(name, PROBE_PROMPTS[0])


def rows(engine: Engine) -> list[Deployment]:
    with Session(engine) as session:
        return list(session.scalars(select(Deployment).order_by(Deployment.id)))


def run_deploy(
    adapter: AdapterVersion, fleet: dict[str, FakeEndpoint], engine: Engine, **kwargs: object
) -> object:
    kwargs.setdefault("unload_grace_seconds", 0.0)
    return deploy(adapter, list(fleet), engine=engine, client_factory=fleet.__getitem__, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pure logic


def test_pinned_version_parses_only_this_tracks_pinned_names() -> None:
    assert pinned_version("support@v12", "support") == 12
    assert pinned_version("support", "support") is None
    assert pinned_version("math@v3", "support") is None
    assert pinned_version("support@vx", "support") is None
    assert pinned_version("team@support@v2", "team@support") == 2


def test_prune_is_due_once_the_last_flip_is_older_than_the_grace() -> None:
    now = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
    assert prune_due(None, now, 60.0)  # never routed: nothing can be in flight through the route
    assert not prune_due(now - timedelta(seconds=59), now, 60.0)
    assert prune_due(now - timedelta(seconds=60), now, 60.0)
    assert prune_due(now, now, 0.0)


def test_versions_to_unload_keeps_newest_and_protected() -> None:
    names = ["support@v1", "support@v2", "support@v3", "support@v4", "support", "math@v1"]
    assert versions_to_unload(names, "support", keep_versions=2, protected=(4, 3)) == [
        "support@v2",
        "support@v1",
    ]
    # A rollback to v1: v1 serves now and v4 served before; both stay although v1 is the oldest.
    assert versions_to_unload(names, "support", keep_versions=2, protected=(1, 4)) == ["support@v2"]
    assert versions_to_unload(names, "support", keep_versions=5, protected=()) == []


def test_fingerprint_depends_on_every_reply_and_their_order() -> None:
    assert fingerprint(["a", "b"]) == fingerprint(["a", "b"])
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"])
    assert fingerprint(["a", "b"]) != fingerprint(["a", "c"])


# --------------------------------------------------------------------------- deploy


def test_deploy_loads_every_endpoint_then_flips_the_route_and_records_ok_rows(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    serve(fleet, versions[1], sql)
    result = run_deploy(versions[2], fleet, sql)
    assert result.version == 2 and result.endpoints == [A, B]  # type: ignore[attr-defined]
    assert result.previous == {A: 1, B: 1}  # type: ignore[attr-defined]
    expected = fingerprint([reply_of(str(versions[2].path), chat) for chat in PROBE_PROMPTS])
    assert result.fingerprint == expected  # type: ignore[attr-defined]
    for endpoint in fleet.values():
        # The previous version stays loaded (instant rollback); vLLM never sees the stable name.
        assert set(endpoint.served) == {"support@v1", "support@v2"}
        assert not [call for call in endpoint.calls if call[1] == TRACK]
        assert endpoint.closed
    route = read_routes(sql)[TRACK]
    assert (route.version, route.adapter_name, route.previous_version) == ("2", "support@v2", "1")
    assert stable_reply(fleet[B], sql) == reply_of(str(versions[2].path), PROBE_PROMPTS[0])
    recorded = rows(sql)
    assert [(r.endpoint, r.version, r.action, r.status) for r in recorded] == [
        (A, "2", "deploy", "ok"),
        (B, "2", "deploy", "ok"),
    ]
    assert recorded[0].adapter_name == "support@v2"
    assert recorded[0].detail["fingerprint"] == expected
    assert recorded[0].detail["previous_version"] == 1
    assert set(recorded[0].detail["step_ms"]) == {"inspect", "load", "probe", "prune"}


def test_first_deploy_creates_the_route(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    result = run_deploy(versions[1], fleet, sql)
    assert result.previous == {A: None, B: None}  # type: ignore[attr-defined]
    assert fleet[A].served == {"support@v1": str(versions[1].path)}
    route = read_routes(sql)[TRACK]
    assert (route.adapter_name, route.previous_version) == ("support@v1", None)


def test_redeploying_the_serving_version_loads_nothing(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    serve(fleet, versions[2], sql)
    run_deploy(versions[2], fleet, sql)
    assert not [call for call in fleet[A].calls if call[0] in ("load_adapter", "unload_adapter")]
    assert [r.status for r in rows(sql)] == ["ok", "ok"]
    assert routed(sql) == "support@v2"


@pytest.mark.parametrize(
    ("fail_on", "step"),
    [
        (("adapters", None), "inspect"),
        (("load_adapter", "support@v2"), "load"),
        (("chat", "support@v2"), "probe"),
    ],
)
def test_failure_on_second_endpoint_leaves_the_route_and_unloads_what_was_loaded(
    versions: dict[int, AdapterVersion],
    fleet: dict[str, FakeEndpoint],
    sql: Engine,
    fail_on: tuple[str, str | None],
    step: str,
) -> None:
    serve(fleet, versions[1], sql)
    before = stable_reply(fleet[A], sql)
    fleet[B].fail_on = fail_on
    with pytest.raises(SwapFailed) as caught:
        run_deploy(versions[2], fleet, sql)
    assert caught.value.endpoint == B and caught.value.step == step
    assert str(caught.value).startswith(f"{B}: {step}: ")
    assert "\n" not in str(caught.value)
    # The route never moved, and A no longer holds the v2 it loaded for nothing.
    assert routed(sql) == "support@v1" and read_routes(sql)[TRACK].previous_version is None
    assert fleet[A].served == {"support@v1": str(versions[1].path)}
    assert stable_reply(fleet[A], sql) == before
    assert [(r.endpoint, r.status, r.detail["step"]) for r in rows(sql)] == [
        (A, "failed", step),
        (B, "failed", step),
    ]
    assert rows(sql)[0].detail["withdrawn"] is True


@pytest.mark.parametrize(
    ("fail_on", "step"),
    [(("load_adapter", "support@v2"), "load"), (("chat", "support@v2"), "probe")],
)
def test_failure_on_first_endpoint_never_touches_the_second(
    versions: dict[int, AdapterVersion],
    fleet: dict[str, FakeEndpoint],
    sql: Engine,
    fail_on: tuple[str, str | None],
    step: str,
) -> None:
    serve(fleet, versions[1], sql)
    fleet[A].fail_on = fail_on
    with pytest.raises(SwapFailed, match=f"^{A}: {step}: ") as caught:
        run_deploy(versions[2], fleet, sql)
    assert caught.value.endpoint == A
    assert fleet[B].calls == []
    assert routed(sql) == "support@v1"


def test_a_pinned_name_loaded_from_another_directory_is_refused(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    serve(fleet, versions[1], sql)
    fleet[B].served["support@v2"] = str(versions[3].path)  # someone loaded other weights under v2
    with pytest.raises(SwapFailed, match=f"^{B}: load: support@v2 is already loaded from "):
        run_deploy(versions[2], fleet, sql)
    assert routed(sql) == "support@v1"
    assert fleet[B].served["support@v2"] == str(versions[3].path)  # not ours: left alone


def test_a_failure_while_pruning_after_the_flip_leaves_the_deploy_standing(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    serve(fleet, versions[1], sql)
    for endpoint in fleet.values():
        endpoint.served["support@v2"] = str(versions[2].path)
        endpoint.served["support@v3"] = str(versions[3].path)
    fleet[B].fail_on = ("unload_adapter", "support@v2")  # B goes down while pruning
    result = run_deploy(versions[4], fleet, sql)
    assert result.version == 4 and routed(sql) == "support@v4"  # type: ignore[attr-defined]  # the flip came first and stands
    assert set(fleet[A].served) == {"support@v1", "support@v3", "support@v4"}  # A pruned v2
    assert result.unloaded == ["support@v2"]  # type: ignore[attr-defined]
    assert "cannot reach the vLLM server" in rows(sql)[-1].detail["prune_error"]


def test_pruning_never_unloads_what_the_route_serves_and_skips_what_is_gone(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    serve(fleet, versions[1], sql)
    run_deploy(versions[2], fleet, sql)
    del fleet[A].served["support@v1"]  # unloaded by hand meanwhile: its 404 is no failure
    run_deploy(versions[3], fleet, sql)
    assert routed(sql) == "support@v3"
    assert set(fleet[A].served) == {"support@v2", "support@v3"}


def test_a_route_moved_by_another_process_is_not_flipped_over(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    serve(fleet, versions[1], sql)
    run_deploy(versions[2], fleet, sql)
    original = fleet[B].chat

    def chat_while_a_rollback_flips(model: str, messages: Chat, **kwargs: object) -> str:
        if model == "support@v3" and routed(sql) != "support@v1":  # an operator's rollback, mid-deploy
            flip_route(sql, TRACK, "1", "support@v1")
        return original(model, messages, **kwargs)  # type: ignore[arg-type]

    fleet[B].chat = chat_while_a_rollback_flips  # type: ignore[method-assign]
    with pytest.raises(SwapFailed, match=r"^all endpoints: flip: the route of support moved") as caught:
        run_deploy(versions[3], fleet, sql)
    assert caught.value.step == "flip"
    assert routed(sql) == "support@v1"  # the rollback stands
    assert all("support@v3" not in endpoint.served for endpoint in fleet.values())  # withdrawn
    assert all({"support@v1", "support@v2"} <= set(endpoint.served) for endpoint in fleet.values())


def test_a_flip_that_cannot_be_written_unloads_the_new_version_everywhere(
    versions: dict[int, AdapterVersion],
    fleet: dict[str, FakeEndpoint],
    sql: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.exc import OperationalError

    serve(fleet, versions[1], sql)

    def refused(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("UPDATE routes", {}, Exception("database is locked"))

    monkeypatch.setattr("pipeline.deploy.hotswap.flip_route", refused)
    with pytest.raises(SwapFailed, match=r"^all endpoints: flip: cannot flip the route: ") as caught:
        run_deploy(versions[2], fleet, sql)
    assert caught.value.step == "flip"
    assert all(set(endpoint.served) == {"support@v1"} for endpoint in fleet.values())
    assert routed(sql) == "support@v1"
    assert [(r.status, r.detail["step"]) for r in rows(sql)] == [("failed", "flip")] * 2


def test_an_error_after_the_flip_committed_is_a_successful_deploy(
    versions: dict[int, AdapterVersion],
    fleet: dict[str, FakeEndpoint],
    sql: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.exc import OperationalError

    import pipeline.deploy.hotswap as hotswap

    serve(fleet, versions[1], sql)
    real_flip = hotswap.flip_route

    def flip_then_fail(*args: object, **kwargs: object) -> None:
        real_flip(*args, **kwargs)  # type: ignore[arg-type]
        raise OperationalError("SELECT routes", {}, Exception("connection lost"))

    monkeypatch.setattr(hotswap, "flip_route", flip_then_fail)
    result = run_deploy(versions[2], fleet, sql)
    assert result.version == 2  # type: ignore[attr-defined]
    assert routed(sql) == "support@v2"
    assert all("support@v2" in endpoint.served for endpoint in fleet.values())  # nothing withdrawn
    assert [r.status for r in rows(sql)] == ["ok", "ok"]


def test_a_failed_redeploy_never_unloads_the_routed_version(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    serve(fleet, versions[2], sql)
    del fleet[B].served["support@v2"]  # B restarted without it; a redeploy loads it there again
    fleet[B].fail_on = ("chat", "support@v2")
    with pytest.raises(SwapFailed, match=f"^{B}: probe: "):
        run_deploy(versions[2], fleet, sql)
    fleet[B].down = False
    assert routed(sql) == "support@v2"
    assert "support@v2" in fleet[A].served and "support@v2" in fleet[B].served


def test_corrupt_adapter_is_refused_before_any_endpoint_call(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    weights = versions[2].path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    with pytest.raises(SwapFailed, match=r"checksum: .*truncated safetensors") as caught:
        run_deploy(versions[2], fleet, sql)
    assert caught.value.step == "checksum"
    assert fleet[A].calls == [] and fleet[B].calls == []
    assert [(r.status, r.detail["step"]) for r in rows(sql)] == [("failed", "checksum")] * 2


def test_modified_adapter_fails_the_checksum(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    (versions[2].path / "README.md").write_text("added after registration")
    with pytest.raises(SwapFailed, match="sha256 mismatch"):
        run_deploy(versions[2], fleet, sql)
    assert fleet[A].calls == []


def test_a_store_without_the_schema_is_refused_before_any_endpoint_call(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], tmp_path: Path
) -> None:
    no_schema = storage.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(SwapFailed, match=r"^all endpoints: route: cannot read the route table: "):
        run_deploy(versions[2], fleet, no_schema)
    assert fleet[A].calls == [] and fleet[B].calls == []


def test_prune_keeps_newest_and_the_previous_version(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    for n in (1, 2, 3):
        run_deploy(versions[n], fleet, sql)
    assert set(fleet[A].served) == {"support@v2", "support@v3"}
    assert [r.detail["unloaded"] for r in rows(sql) if r.endpoint == A] == [[], [], ["support@v1"]]
    # Roll back to v2, then deploy v4: v4 and v3 are the newest two, and v2 stays as the previous one.
    run_deploy(versions[2], fleet, sql, action="rollback")
    run_deploy(versions[4], fleet, sql)
    assert set(fleet[A].served) == {"support@v2", "support@v3", "support@v4"}
    # Forward again to v3: v4 and v3 stay, v2 (neither newest nor previous) goes.
    result = run_deploy(versions[3], fleet, sql)
    assert set(fleet[A].served) == {"support@v3", "support@v4"}
    assert result.unloaded == ["support@v2"]  # type: ignore[attr-defined]
    assert [r.detail["unloaded"] for r in rows(sql) if r.endpoint == A][-1] == ["support@v2"]


def test_prune_waits_for_the_grace_after_the_last_flip(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    for n in (1, 2, 3):
        result = run_deploy(versions[n], fleet, sql, unload_grace_seconds=60.0)
    # v1 left the stable name at the flip to v2, a moment ago: a gateway may still be sending to it.
    assert result.prune == "deferred"  # type: ignore[attr-defined]
    assert set(fleet[A].served) == {"support@v1", "support@v2", "support@v3"}
    with Session(sql) as session, session.begin():
        route = session.get(Route, TRACK)
        assert route is not None
        route.updated_at = datetime.now(UTC) - timedelta(seconds=61)
    result = run_deploy(versions[4], fleet, sql, unload_grace_seconds=60.0)
    assert result.prune == "done"  # type: ignore[attr-defined]
    assert set(fleet[A].served) == {"support@v3", "support@v4"}
    assert result.unloaded == ["support@v1", "support@v2"]  # type: ignore[attr-defined]


def test_prune_keeps_versions_with_requests_in_flight(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    def in_flight(name: str) -> int:
        return 3 if name == "support@v1" else 0

    for n in (1, 2, 3):
        run_deploy(versions[n], fleet, sql, in_flight=in_flight)
    assert "support@v1" in fleet[A].served
    assert rows(sql)[-1].detail["kept_in_flight"] == ["support@v1"]
    run_deploy(versions[4], fleet, sql)  # drained now
    assert set(fleet[A].served) == {"support@v3", "support@v4"}


def test_rollback_flips_back_to_the_resident_previous_version(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    run_deploy(versions[1], fleet, sql)
    before = stable_reply(fleet[A], sql)
    run_deploy(versions[2], fleet, sql)
    assert stable_reply(fleet[A], sql) != before
    loads = len([call for call in fleet[A].calls if call[0] == "load_adapter"])
    result = run_deploy(versions[1], fleet, sql, action="rollback")
    assert stable_reply(fleet[A], sql) == before
    assert result.previous == {A: 2, B: 2}  # type: ignore[attr-defined]
    assert [(r.action, r.version) for r in rows(sql)][-2:] == [("rollback", "1"), ("rollback", "1")]
    # The version rolled back to was still resident: nothing loaded, only the route flipped.
    assert len([call for call in fleet[A].calls if call[0] == "load_adapter"]) == loads
    route = read_routes(sql)[TRACK]
    assert (route.adapter_name, route.previous_version) == ("support@v1", "2")


def test_invalid_arguments_are_user_errors(versions: dict[int, AdapterVersion], sql: Engine) -> None:
    with pytest.raises(storage.UserError, match=r"serving\.endpoints"):
        deploy(versions[1], [], engine=sql)
    with pytest.raises(storage.UserError, match=r"serving\.keep_versions"):
        deploy(versions[1], [A], engine=sql, keep_versions=1)


# --------------------------------------------------------------------------- serving (load, routes, state)


def test_load_champions_serves_each_track_under_its_pinned_name(
    versions: dict[int, AdapterVersion], sql: Engine
) -> None:
    from pipeline.deploy.serving import load_champions, seed_routes, serving_state

    endpoint = FakeEndpoint(A)
    math = make_adapter_dir(versions[1].path.parents[1], 7, track="math")
    load_champions(endpoint, [versions[2], math])
    assert endpoint.served == {"support@v2": str(versions[2].path), "math@v7": str(math.path)}
    load_champions(endpoint, [versions[2]])  # loaded already: nothing to do
    assert [call for call in endpoint.calls if call[0] == "load_adapter"] == [
        ("load_adapter", "support@v2"),
        ("load_adapter", "math@v7"),
    ]
    routes = seed_routes(sql, [versions[2], math])
    assert {track: route.adapter_name for track, route in routes.items()} == {
        "support": "support@v2",
        "math": "math@v7",
    }
    down = FakeEndpoint(B)
    down.down = True
    states = serving_state(
        [A, B], routes, ["support", "math", "absent"], client_factory={A: endpoint, B: down}.__getitem__
    )
    assert [(s.endpoint, s.reachable, s.serving) for s in states] == [
        (A, True, {"support": 2, "math": 7, "absent": None}),
        (B, False, {}),
    ]
    assert states[1].error is not None and states[1].error.startswith(f"{B}: adapters: cannot reach")


def test_seed_routes_follows_the_registry_champion_and_keeps_a_matching_route(
    versions: dict[int, AdapterVersion], sql: Engine
) -> None:
    from pipeline.deploy.serving import seed_routes

    seed_routes(sql, [versions[2]])
    first = read_routes(sql)[TRACK]
    assert seed_routes(sql, [versions[2]])[TRACK].updated_at == first.updated_at  # untouched
    # The champion moved without serving (`--registry-only`): serve routes to it, v2 becomes previous.
    route = seed_routes(sql, [versions[3]])[TRACK]
    assert (route.adapter_name, route.previous_version) == ("support@v3", "2")


def test_load_champions_refuses_two_champions_or_foreign_weights(versions: dict[int, AdapterVersion]) -> None:
    from pipeline.deploy.serving import load_champions

    with pytest.raises(storage.UserError, match="more than one champion for track"):
        load_champions(FakeEndpoint(A), [versions[1], versions[2]])
    endpoint = FakeEndpoint(A)
    endpoint.served["support@v1"] = str(versions[2].path)
    with pytest.raises(storage.UserError, match=r"support@v1 is already loaded from .*v2, not .*v1$"):
        load_champions(endpoint, [versions[1]])
