"""Hot-swap logic against fake endpoints: all or nothing, switch-back at every step, pruning, SQL rows.

`FakeEndpoint` behaves like vLLM's adapter API where a deploy relies on it: names map to adapter
directories, a name loads once unless in place, unknown names 404, and a chat reply is a function of
the directory the name serves (so "the stable name answers as the pinned one" can fail).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
    serving_versions,
    version_serving,
    versions_to_unload,
)
from pipeline.deploy.vllm_client import Chat, ServedAdapter, ServerRequestFailed, ServerUnavailable
from storage.models import Deployment

TRACK = "support"
A, B = "http://a:8000", "http://b:8000"


class FakeEndpoint:
    """A vLLM server's adapter table and deterministic per-directory replies; can fail on demand."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.served: dict[str, str] = {}  # name -> adapter directory
        self.fail_on: tuple[str, str | None] | None = None  # (method, name or None for any)
        self.ignore_inplace = False  # an in-place load that keeps the old weights (stale server)
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

    def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        self._call("load_adapter", name)
        if name in self.served and not inplace:
            raise ServerRequestFailed(f"{self.base_url}: load: HTTP 400: already loaded", 400)
        if not (self.ignore_inplace and name in self.served):
            self.served[name] = path

    def unload_adapter(self, name: str) -> None:
        self._call("unload_adapter", name)
        if name not in self.served:
            raise ServerRequestFailed(f"{self.base_url}: unload: HTTP 404: not found", 404)
        del self.served[name]

    def reset_prefix_cache_outcome(self) -> str:
        self._call("reset_prefix_cache")
        return "reset"

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


def serve(endpoint: FakeEndpoint, adapter: AdapterVersion) -> None:
    """The state after `overnight serve`: the champion under its pinned and stable names."""
    endpoint.served[adapter.pinned_name] = str(adapter.path)
    endpoint.served[adapter.track] = str(adapter.path)


def stable_reply(endpoint: FakeEndpoint) -> str:
    return endpoint.chat(TRACK, PROBE_PROMPTS[0])


def rows(engine: Engine) -> list[Deployment]:
    with Session(engine) as session:
        return list(session.scalars(select(Deployment).order_by(Deployment.id)))


def run_deploy(
    adapter: AdapterVersion, fleet: dict[str, FakeEndpoint], engine: Engine, **kwargs: object
) -> object:
    return deploy(adapter, list(fleet), engine=engine, client_factory=fleet.__getitem__, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pure logic


def test_pinned_version_parses_only_this_tracks_pinned_names() -> None:
    assert pinned_version("support@v12", "support") == 12
    assert pinned_version("support", "support") is None
    assert pinned_version("math@v3", "support") is None
    assert pinned_version("support@vx", "support") is None
    assert pinned_version("team@support@v2", "team@support") == 2


def test_version_serving_maps_the_stable_path_to_its_pinned_name() -> None:
    adapters = {
        "support": ServedAdapter("support", "/a/v2"),
        "support@v1": ServedAdapter("support@v1", "/a/v1"),
        "support@v2": ServedAdapter("support@v2", "/a/v2"),
        "math@v2": ServedAdapter("math@v2", "/a/v2"),
    }
    assert version_serving(adapters, "support") == 2
    assert version_serving(adapters, "math") is None  # no stable name loaded
    assert version_serving({"support": ServedAdapter("support", "/elsewhere")}, "support") is None


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


def test_deploy_switches_every_endpoint_and_records_ok_rows(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    for endpoint in fleet.values():
        serve(endpoint, versions[1])
    result = run_deploy(versions[2], fleet, sql)
    assert result.version == 2 and result.endpoints == [A, B]  # type: ignore[attr-defined]
    assert result.previous == {A: 1, B: 1}  # type: ignore[attr-defined]
    expected = fingerprint([reply_of(str(versions[2].path), chat) for chat in PROBE_PROMPTS])
    assert result.fingerprint == expected  # type: ignore[attr-defined]
    for endpoint in fleet.values():
        assert endpoint.served["support"] == str(versions[2].path)
        assert set(endpoint.served) == {"support", "support@v1", "support@v2"}
        assert endpoint.closed
        # The stable name moved in place: never unloaded, so no request could 404.
        assert ("unload_adapter", "support") not in endpoint.calls
    assert serving_versions([A, B], TRACK, client_factory=fleet.__getitem__) == {A: 2, B: 2}
    recorded = rows(sql)
    assert [(r.endpoint, r.version, r.action, r.status) for r in recorded] == [
        (A, "2", "deploy", "ok"),
        (B, "2", "deploy", "ok"),
    ]
    assert recorded[0].adapter_name == "support@v2"
    assert recorded[0].detail["fingerprint"] == expected
    assert recorded[0].detail["previous_version"] == 1
    assert set(recorded[0].detail["step_ms"]) >= {"load", "probe", "switch", "reset", "verify", "prune"}


def test_first_deploy_plain_loads_the_stable_name(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    result = run_deploy(versions[1], fleet, sql)
    assert result.previous == {A: None, B: None}  # type: ignore[attr-defined]
    assert fleet[A].served == {"support": str(versions[1].path), "support@v1": str(versions[1].path)}


def test_redeploying_the_serving_version_changes_nothing(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    for endpoint in fleet.values():
        serve(endpoint, versions[2])
    run_deploy(versions[2], fleet, sql)
    assert not [call for call in fleet[A].calls if call[0] in ("load_adapter", "unload_adapter")]
    assert [r.status for r in rows(sql)] == ["ok", "ok"]


@pytest.mark.parametrize(
    ("fail_on", "step"),
    [
        (("adapters", None), "inspect"),
        (("load_adapter", "support@v2"), "load"),
        (("chat", "support@v2"), "probe"),
        (("load_adapter", "support"), "switch"),
        (("reset_prefix_cache", None), "reset"),
        (("chat", "support"), "verify"),
    ],
)
def test_failure_on_second_endpoint_switches_the_first_back(
    versions: dict[int, AdapterVersion],
    fleet: dict[str, FakeEndpoint],
    sql: Engine,
    fail_on: tuple[str, str | None],
    step: str,
) -> None:
    for endpoint in fleet.values():
        serve(endpoint, versions[1])
    before = stable_reply(fleet[A])
    fleet[B].fail_on = fail_on
    with pytest.raises(SwapFailed) as caught:
        run_deploy(versions[2], fleet, sql)
    assert caught.value.endpoint == B and caught.value.step == step
    assert str(caught.value).startswith(f"{B}: {step}: ")
    assert "\n" not in str(caught.value)
    # A had fully switched to v2; it serves v1 again and the v2 pinned name it loaded is gone.
    assert fleet[A].served == {"support": str(versions[1].path), "support@v1": str(versions[1].path)}
    assert stable_reply(fleet[A]) == before
    assert [(r.endpoint, r.status, r.detail["step"]) for r in rows(sql)] == [
        (A, "failed", step),
        (B, "failed", step),
    ]
    assert rows(sql)[0].detail["switched_back"] is True


@pytest.mark.parametrize(
    ("fail_on", "step"),
    [(("load_adapter", "support@v2"), "load"), (("load_adapter", "support"), "switch")],
)
def test_failure_on_first_endpoint_never_touches_the_second(
    versions: dict[int, AdapterVersion],
    fleet: dict[str, FakeEndpoint],
    sql: Engine,
    fail_on: tuple[str, str | None],
    step: str,
) -> None:
    for endpoint in fleet.values():
        serve(endpoint, versions[1])
    fleet[A].fail_on = fail_on
    with pytest.raises(SwapFailed, match=f"^{A}: {step}: ") as caught:
        run_deploy(versions[2], fleet, sql)
    assert caught.value.endpoint == A
    assert fleet[B].calls == []
    assert fleet[B].served["support"] == str(versions[1].path)


def test_stable_name_that_keeps_old_weights_fails_verify(
    versions: dict[int, AdapterVersion],
    fleet: dict[str, FakeEndpoint],
    sql: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pipeline.deploy.hotswap.VERIFY_PAUSE_SECONDS", 0.0)
    for endpoint in fleet.values():
        serve(endpoint, versions[1])
    fleet[B].ignore_inplace = True
    with pytest.raises(SwapFailed, match=f"^{B}: verify: 'support' answers the probes with fingerprint"):
        run_deploy(versions[2], fleet, sql)
    assert fleet[A].served["support"] == str(versions[1].path)
    assert rows(sql)[1].detail["verify_attempts"] == 10


def test_failure_during_prune_switches_every_endpoint_back(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    for endpoint in fleet.values():
        serve(endpoint, versions[1])
        endpoint.served["support@v2"] = str(versions[2].path)
        endpoint.served["support@v3"] = str(versions[3].path)
    fleet[B].fail_on = ("unload_adapter", "support@v2")  # B goes down while pruning
    with pytest.raises(SwapFailed, match=f"^{B}: prune: .*; could not switch back: {B} ") as caught:
        run_deploy(versions[4], fleet, sql)
    assert caught.value.step == "prune"
    # A had pruned v2 already; it serves v1 again, which pruning never unloads (it was the previous).
    assert fleet[A].served["support"] == str(versions[1].path)
    assert set(fleet[A].served) == {"support", "support@v1", "support@v3"}


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


def test_unwritable_store_switches_back_and_names_the_record_step(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], tmp_path: Path
) -> None:
    no_schema = storage.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    for endpoint in fleet.values():
        serve(endpoint, versions[1])
    with pytest.raises(SwapFailed, match=r"^all endpoints: record: cannot write the deployment rows"):
        run_deploy(versions[2], fleet, no_schema)
    assert all(endpoint.served["support"] == str(versions[1].path) for endpoint in fleet.values())


def test_prune_keeps_newest_and_the_previous_version(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    for n in (1, 2, 3):
        run_deploy(versions[n], fleet, sql)
    assert set(fleet[A].served) == {"support", "support@v2", "support@v3"}
    assert [r.detail["unloaded"] for r in rows(sql) if r.endpoint == A] == [[], [], ["support@v1"]]
    # Roll back to v2, then deploy v4: v4 and v3 are the newest two, and v2 stays as the previous one.
    run_deploy(versions[2], fleet, sql, action="rollback")
    run_deploy(versions[4], fleet, sql)
    assert set(fleet[A].served) == {"support", "support@v2", "support@v3", "support@v4"}
    # Forward again to v3: v4 and v3 stay, v2 (neither newest nor previous) goes.
    run_deploy(versions[3], fleet, sql)
    assert set(fleet[A].served) == {"support", "support@v3", "support@v4"}
    assert [r.detail["unloaded"] for r in rows(sql) if r.endpoint == A][-1] == ["support@v2"]


def test_rollback_restores_the_previous_outputs_and_records_the_action(
    versions: dict[int, AdapterVersion], fleet: dict[str, FakeEndpoint], sql: Engine
) -> None:
    run_deploy(versions[1], fleet, sql)
    before = stable_reply(fleet[A])
    run_deploy(versions[2], fleet, sql)
    assert stable_reply(fleet[A]) != before
    result = run_deploy(versions[1], fleet, sql, action="rollback")
    assert stable_reply(fleet[A]) == before
    assert result.previous == {A: 2, B: 2}  # type: ignore[attr-defined]
    assert [(r.action, r.version) for r in rows(sql)][-2:] == [("rollback", "1"), ("rollback", "1")]
    # The version rolled back to was still resident: no load from disk under its pinned name.
    assert ("load_adapter", "support@v1") not in fleet[A].calls[-8:]


def test_invalid_arguments_are_user_errors(versions: dict[int, AdapterVersion], sql: Engine) -> None:
    with pytest.raises(storage.UserError, match=r"serving\.endpoints"):
        deploy(versions[1], [], engine=sql)
    with pytest.raises(storage.UserError, match=r"serving\.keep_versions"):
        deploy(versions[1], [A], engine=sql, keep_versions=1)


# --------------------------------------------------------------------------- serving (load, state)


def test_load_champions_serves_each_track_under_stable_and_pinned_names(
    versions: dict[int, AdapterVersion],
) -> None:
    from pipeline.deploy.serving import load_champions, serving_state

    endpoint = FakeEndpoint(A)
    math = make_adapter_dir(versions[1].path.parents[1], 7, track="math")
    load_champions(endpoint, [versions[2], math])
    assert endpoint.served == {
        "support": str(versions[2].path),
        "support@v2": str(versions[2].path),
        "math": str(math.path),
        "math@v7": str(math.path),
    }
    load_champions(endpoint, [versions[3]])  # a newer champion moves the stable name in place
    assert endpoint.served["support"] == str(versions[3].path)
    down = FakeEndpoint(B)
    down.down = True
    states = serving_state([A, B], ["support", "math"], client_factory={A: endpoint, B: down}.__getitem__)
    assert [(s.endpoint, s.reachable, s.serving) for s in states] == [
        (A, True, {"support": 3, "math": 7}),
        (B, False, {}),
    ]
    assert states[1].error is not None and states[1].error.startswith(f"{B}: adapters: cannot reach")


def test_load_champions_refuses_two_champions_for_one_track(versions: dict[int, AdapterVersion]) -> None:
    from pipeline.deploy.serving import load_champions

    with pytest.raises(storage.UserError, match="more than one champion for track"):
        load_champions(FakeEndpoint(A), [versions[1], versions[2]])
