"""Registry and tracking against real MLflow on the embedded store (SQLite + a local artifact folder).

The contract tests run on `MlflowRegistry` and on `tests.fakes.registry.FakeRegistry` alike, so the
fake the flow tests use cannot drift from the real thing. One MLflow store serves the whole module
(its migrations take seconds); every test uses its own track, so tests cannot see each other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from evals.gate import GateReport, GateThresholds, SuiteScores, decide
from evals.guard import GuardThresholds
from pipeline.adapters import AdapterInvalid, adapter_sha256
from pipeline.config import OvernightConfig
from pipeline.demo_world.adapters import make_adapter_dir
from pipeline.register.mlflow_run import NightRun, flatten_params, is_secret_key, mlflow_client
from pipeline.register.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    AdapterRefused,
    MlflowRegistry,
    Registry,
    RegistryError,
    parse_version_or_alias,
    promoted,
    rolled_back,
    version_tags,
)
from tests.fakes.registry import FakeRegistry

SECRET = "sk-live-0123456789abcdef"


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    artifact_root: Path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow_client(uri).search_experiments()  # creates the schema once for the module
    return Store(uri, root / "artifacts")


@dataclass(frozen=True)
class Harness:
    registry: Registry
    track: str
    stored_path: Callable[[int], Path]  # where the registry's own copy of a version's adapter lives


def _mlflow_harness(store: Store, tmp_path: Path, track: str) -> Harness:
    registry = MlflowRegistry(
        store.tracking_uri, cache_dir=tmp_path / "cache", artifact_location=str(store.artifact_root)
    )

    def stored_path(version: int) -> Path:
        source = (
            mlflow_client(store.tracking_uri)
            .get_model_version(registry.model_name(track), str(version))
            .source
        )
        return Path(str(source))

    return Harness(registry, track, stored_path)


def _fake_harness(tmp_path: Path, track: str) -> Harness:
    registry = FakeRegistry(tmp_path / "fake", cache_dir=tmp_path / "cache")
    return Harness(registry, track, lambda version: registry.stored_path(track, version))


@pytest.fixture(params=["mlflow", "fake"])
def harness(request: pytest.FixtureRequest, store: Store, tmp_path: Path) -> Harness:
    track = f"t-{uuid.uuid4().hex[:8]}"
    if request.param == "mlflow":
        return _mlflow_harness(store, tmp_path, track)
    return _fake_harness(tmp_path, track)


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    """Changes one byte of tensor data: the file still parses, only its digest changes."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


REVIEW_TAGS = {
    "gate": "passed",
    "base_model": "tiny-model",
    "dataset_sha256": "ab" * 32,
    "stop_reason": "max_steps",
}


# --------------------------------------------------------------------------- contract: both registries


def test_promoted_night_makes_exactly_one_version_with_its_tags_and_aliases(
    harness: Harness, tmp_path: Path
) -> None:
    registry, track = harness.registry, harness.track
    assert isinstance(registry, Registry)
    first = make_adapter_dir(tmp_path / "night1", seed=1)
    forged = {**REVIEW_TAGS, "adapter_sha256": "0" * 64, "parent_version": "7"}  # the registry sets these

    v1 = registry.register(track, first, run_id=None, tags=forged)
    assert [info.version for info in registry.versions(track)] == [v1] == [1]
    (info,) = registry.versions(track)
    assert info.tags["adapter_sha256"] == adapter_sha256(first)
    assert info.tags["parent_version"] == "none"
    assert {key: info.tags[key] for key in REVIEW_TAGS} == REVIEW_TAGS
    assert info.aliases == (CHALLENGER,)
    assert registry.version_for(track, CHAMPION) is None

    registry.promote(track, v1)
    assert registry.version_for(track, CHAMPION) == 1
    assert registry.version_for(track, CHALLENGER) is None
    assert registry.version_for(track, PREVIOUS) is None

    second = make_adapter_dir(tmp_path / "night2", seed=2)
    v2 = registry.register(track, second, run_id=None, tags=REVIEW_TAGS)
    assert v2 == 2
    assert len(registry.versions(track)) == 2
    assert registry.versions(track)[1].tags["parent_version"] == "1"
    assert registry.version_for(track, CHALLENGER) == 2
    assert registry.version_for(track, CHAMPION) == 1  # registering does not serve

    registry.promote(track, v2)
    aliases = {info.version: info.aliases for info in registry.versions(track)}
    assert aliases == {1: (PREVIOUS,), 2: (CHAMPION,)}


def test_rejected_night_leaves_no_version(harness: Harness) -> None:
    assert harness.registry.versions(harness.track) == []
    assert harness.registry.version_for(harness.track, CHAMPION) is None
    with pytest.raises(RegistryError, match="champion"):
        harness.registry.fetch(harness.track, CHAMPION)


def test_rollback_moves_champion_back_and_previous_to_what_it_replaced(
    harness: Harness, tmp_path: Path
) -> None:
    registry, track = harness.registry, harness.track
    for night in (1, 2, 3):
        version = registry.register(
            track, make_adapter_dir(tmp_path / f"n{night}", seed=night), run_id=None, tags={}
        )
        registry.promote(track, version)
    assert (registry.version_for(track, CHAMPION), registry.version_for(track, PREVIOUS)) == (3, 2)

    registry.rollback_aliases(track, 2)
    assert (registry.version_for(track, CHAMPION), registry.version_for(track, PREVIOUS)) == (2, 3)
    registry.rollback_aliases(track, 1)
    assert (registry.version_for(track, CHAMPION), registry.version_for(track, PREVIOUS)) == (1, 2)
    assert registry.fetch(track, CHAMPION).version == 1

    with pytest.raises(RegistryError, match="no version 9"):
        registry.rollback_aliases(track, 9)
    assert registry.version_for(track, CHAMPION) == 1  # a refused move moves nothing


def test_fetch_by_alias_and_version_returns_a_verified_cached_copy(harness: Harness, tmp_path: Path) -> None:
    registry, track = harness.registry, harness.track
    adapter = make_adapter_dir(tmp_path / "adapter", seed=5)
    version = registry.register(track, adapter, run_id=None, tags={})

    fetched = registry.fetch(track, CHALLENGER)
    assert fetched.version == version
    assert fetched.path == tmp_path / "cache" / track / f"v{version}"
    assert fetched.sha256 == adapter_sha256(adapter) == adapter_sha256(fetched.path)
    assert fetched.pinned_name == f"{track}@v{version}"
    assert registry.fetch(track, version) == fetched
    assert registry.fetch(track, f"v{version}") == fetched  # the cached copy, verified again


def test_tampered_stored_adapter_is_refused_and_never_cached(harness: Harness, tmp_path: Path) -> None:
    registry, track = harness.registry, harness.track
    version = registry.register(track, make_adapter_dir(tmp_path / "a", seed=3), run_id=None, tags={})
    _flip_byte(harness.stored_path(version) / "adapter_model.safetensors")

    with pytest.raises(AdapterRefused, match=r"refused the registry's copy.*sha256 mismatch") as caught:
        registry.fetch(track, version)
    assert isinstance(caught.value, AdapterInvalid)  # callers catching either error see it
    assert "\n" not in str(caught.value)
    cache = tmp_path / "cache" / track
    assert not (cache / f"v{version}").exists()
    assert list(cache.iterdir()) == []  # no half-downloaded scratch left behind


def test_tampered_cached_copy_is_refused_on_the_next_fetch(harness: Harness, tmp_path: Path) -> None:
    registry, track = harness.registry, harness.track
    version = registry.register(track, make_adapter_dir(tmp_path / "a", seed=4), run_id=None, tags={})
    cached = registry.fetch(track, version).path
    _flip_byte(cached / "adapter_model.safetensors")

    with pytest.raises(AdapterRefused, match=r"refused the cached copy .*delete it to download again"):
        registry.fetch(track, version)

    (cached / "extra.bin").write_bytes(b"x")  # an added file changes the digest too
    weights = cached / "adapter_model.safetensors"
    _flip_byte(weights)  # restore the weights: only the extra file differs now
    with pytest.raises(AdapterRefused, match="sha256 mismatch"):
        registry.fetch(track, version)

    (cached / "extra.bin").unlink()
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated: refused before any digest
    with pytest.raises(AdapterRefused, match="truncated"):
        registry.fetch(track, version)


def test_bad_input_is_a_one_line_error(harness: Harness, tmp_path: Path) -> None:
    registry, track = harness.registry, harness.track
    with pytest.raises(AdapterInvalid, match="adapter directory not found"):
        registry.register(track, tmp_path / "missing", run_id=None, tags={})
    with pytest.raises(RegistryError, match="track 'a b'"):
        registry.register("a b", make_adapter_dir(tmp_path / "a"), run_id=None, tags={})
    with pytest.raises(RegistryError, match="unknown alias"):
        registry.version_for(track, "production")
    with pytest.raises(RegistryError, match="no version 4"):
        registry.fetch(track, 4)
    assert registry.versions(track) == []


# --------------------------------------------------------------------------- pure logic


def test_alias_moves() -> None:
    assert promoted({}, 1) == {CHAMPION: 1}
    assert promoted({CHAMPION: 1, CHALLENGER: 2}, 2) == {CHAMPION: 2, PREVIOUS: 1}
    assert promoted({CHAMPION: 1, CHALLENGER: 3}, 2) == {CHAMPION: 2, PREVIOUS: 1, CHALLENGER: 3}
    assert promoted({CHAMPION: 2, PREVIOUS: 1}, 2) == {CHAMPION: 2, PREVIOUS: 1}  # again: no change
    assert rolled_back({CHAMPION: 3, PREVIOUS: 2, CHALLENGER: 4}, 2) == {
        CHAMPION: 2,
        PREVIOUS: 3,
        CHALLENGER: 4,
    }
    assert rolled_back({CHAMPION: 3, PREVIOUS: 2}, 1) == {CHAMPION: 1, PREVIOUS: 3}


def test_parse_version_or_alias() -> None:
    assert parse_version_or_alias(3) == parse_version_or_alias("3") == parse_version_or_alias("v3") == 3
    assert parse_version_or_alias("previous") == PREVIOUS
    for bad in ("latest", "v0", 0, "-1"):
        with pytest.raises(RegistryError):
            parse_version_or_alias(bad)


def _report(regress: bool) -> GateReport:
    champion = [1.0, 0.0] * 15
    candidate = [0.0] * 30 if regress else list(champion)
    suites = [SuiteScores("arithmetic", candidate=candidate, champion=champion)]
    # The tags of the gate verdict are under test, not the reward-hacking guard: confirmation off.
    return decide(
        suites,
        heldout_candidate=[0.8] * 10 + [0.9] * 10,
        heldout_champion=[0.5] * 20,
        kl_to_base=0.1,
        thresholds=GateThresholds(bootstrap_samples=200, guard=GuardThresholds(confirm=False)),
    )


def test_version_tags_carry_the_gate_and_provenance() -> None:
    tags = version_tags(
        gate=_report(regress=False),
        base_model="tiny",
        dataset_sha256="d" * 64,
        judge_model="judge",
        rubric_version="helpfulness@2",
        stop_reason="kl_budget",
    )
    assert tags["gate"] == "passed"
    assert tags["delta.suite.arithmetic"].startswith("+0.000 [") and tags["delta.suite.arithmetic"].endswith(
        "pass"
    )
    assert tags["delta.heldout_gain"].startswith("+0.350 [")
    assert tags["gate.kl_to_base"] == "0.1000 (max 0.5) pass"
    assert (tags["rubric_version"], tags["stop_reason"]) == ("helpfulness@2", "kl_budget")
    failed = version_tags(
        gate=_report(regress=True),
        base_model="tiny",
        dataset_sha256="d",
        judge_model="j",
        rubric_version="r",
        stop_reason="s",
    )
    assert failed["gate"] == "failed"
    assert failed["gate.failed"] == "suite/arithmetic"
    assert failed["delta.suite.arithmetic"].startswith("-0.500 [") and failed[
        "delta.suite.arithmetic"
    ].endswith("FAIL")


def test_flatten_params_drops_secrets_and_keeps_the_rest() -> None:
    config = OvernightConfig.model_validate(
        {
            "database": {"url": f"postgresql+psycopg://app:{SECRET}@db:5432/overnight"},
            "judge": {"api_key": SECRET, "max_tokens": 77},
            "tracks": [{"name": "support"}],
        }
    )
    params = flatten_params(config)
    assert SECRET not in json.dumps(params)
    assert "judge.api_key" not in params
    assert params["judge.max_tokens"] == "77"  # a token count is not a secret
    assert params["tracks.0.name"] == "support"
    assert params["database.url"] == "postgresql+psycopg://app:***@db:5432/overnight"
    nested = flatten_params({"hf_token": SECRET, "auth": {"password": SECRET}, "x": {"secret_key": SECRET}})
    assert nested == {}
    assert flatten_params({"long": "y" * 7000})["long"] == "y" * 6000
    assert [
        key
        for key in ("api_key", "judge.API-KEY", "access_token", "cache_key", "max_tokens")
        if is_secret_key(key)
    ] == [
        "api_key",
        "judge.API-KEY",
        "access_token",
    ]


# --------------------------------------------------------------------------- MLflow runs


def _write_metrics(path: Path, steps: int) -> Path:
    rows = [
        {
            "step": step,
            "reward_mean": 0.2 + 0.1 * step,
            "reward_std": 0.05,
            "kl": 0.01 * step,
            "kl_rolling": 0.01 * step,
            "loss": 0.5,
            "grad_norm": None,
            "rewards": {"judge": 0.3 + step},
        }
        for step in range(1, steps + 1)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _artifacts(client: object, run_id: str, path: str | None = None) -> set[str]:
    from mlflow import MlflowClient

    assert isinstance(client, MlflowClient)
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_rejected_night_run_holds_everything_and_registers_nothing(store: Store, tmp_path: Path) -> None:
    track = f"t-{uuid.uuid4().hex[:8]}"
    config = OvernightConfig.model_validate({"judge": {"api_key": SECRET}, "tracks": [{"name": track}]})
    manifest = {"track": track, "after_id": 10, "until_id": 42, "rows_kept": 30, "sha256": "c" * 64}
    with NightRun(
        store.tracking_uri, f"overnight-{track}", "2026-11-21", artifact_location=str(store.artifact_root)
    ) as night:
        night.log_params(config)
        night.log_window(manifest)
        assert night.log_training(_write_metrics(tmp_path / "metrics.jsonl", steps=3)) == 3
        night.log_judge({"judge_calls": 12, "judge_failed": 1}, {"spearman_rating": 0.4, "n_judged": 11})
        night.log_gate(_report(regress=True))
        night.log_text("rubric.md", "# helpfulness\nScore 1-5.\n")
        night.log_adapter(make_adapter_dir(tmp_path / "adapter", seed=9))

    client = mlflow_client(store.tracking_uri)
    run = client.get_run(night.run_id)
    assert run.info.status == "FINISHED"
    assert SECRET not in json.dumps(run.data.params)
    assert run.data.params["data.until_id"] == "42"
    assert run.data.params["tracks.0.name"] == track
    history = client.get_metric_history(night.run_id, "train/reward_mean")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.3), (2, 0.4), (3, 0.5)]
    assert [m.value for m in client.get_metric_history(night.run_id, "train/reward/judge")] == [1.3, 2.3, 3.3]
    assert "train/grad_norm" not in run.data.metrics  # a step that did not log it is not a zero
    assert run.data.metrics["gate/passed"] == 0.0
    assert run.data.metrics["gate/suite/arithmetic/passed"] == 0.0
    assert run.data.metrics["gate/suite/arithmetic/delta"] == pytest.approx(-0.5)
    assert run.data.metrics["judge/judge_calls"] == 12.0
    assert run.data.metrics["calibration/spearman_rating"] == 0.4
    assert run.data.tags["gate"] == "failed"
    assert run.data.tags["gate.failed"] == "suite/arithmetic"
    assert run.data.tags["gate.reason"].startswith("suite/arithmetic: suite arithmetic: delta -0.500")
    assert run.data.tags["mlflow.note.content"].startswith("## Rejected: suite/arithmetic: ")
    assert {
        "gate.md",
        "gate.json",
        "judge.json",
        "rubric.md",
        "snapshot_manifest.json",
        "plots/gate_deltas.png",
        "train/metrics.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    } <= _artifacts(client, night.run_id)
    assert "plots/training.png" not in _artifacts(client, night.run_id)  # MLflow charts the step metrics
    local = Path(client.download_artifacts(night.run_id, "plots", str(tmp_path / "dl")))
    assert (local / "gate_deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gate_json = json.loads(
        Path(client.download_artifacts(night.run_id, "gate.json", str(tmp_path))).read_text()
    )
    assert gate_json["passed"] is False

    registry = MlflowRegistry(store.tracking_uri, cache_dir=tmp_path / "cache")
    assert registry.versions(track) == []
    assert client.search_registered_models(f"name = 'overnight-{track}'") == []


def test_run_fails_on_exception_and_registered_version_points_at_its_adapter(
    store: Store, tmp_path: Path
) -> None:
    track = f"t-{uuid.uuid4().hex[:8]}"
    client = mlflow_client(store.tracking_uri)
    with (
        pytest.raises(ZeroDivisionError),
        NightRun(store.tracking_uri, f"overnight-{track}", "broken") as broken,
    ):
        _ = 1 / 0
    failed = client.get_run(broken.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == "ZeroDivisionError: division by zero"

    adapter = make_adapter_dir(tmp_path / "adapter", seed=11)
    registry = MlflowRegistry(store.tracking_uri, cache_dir=tmp_path / "cache")
    with NightRun(
        store.tracking_uri, f"overnight-{track}", "night", artifact_location=str(store.artifact_root)
    ) as night:
        uri = night.log_adapter(adapter)
        version = registry.register(track, adapter, run_id=night.run_id, tags={"gate": "passed"})
    model_version = client.get_model_version(registry.model_name(track), str(version))
    assert model_version.run_id == night.run_id
    assert model_version.source == uri  # the run's copy, not a second upload
    assert len(_artifacts(client, night.run_id)) == 2  # adapter_config.json + adapter_model.safetensors

    other = make_adapter_dir(tmp_path / "other", seed=12)
    with pytest.raises(RegistryError, match="logged a different adapter"):
        registry.register(track, other, run_id=night.run_id, tags={})
    assert [info.version for info in registry.versions(track)] == [version]
