"""Registered adapter versions, the aliases that say what serves, and a fetch that trusts no bytes.

A candidate that passes the gate becomes a version of the registered model `overnight-<track>`,
tagged with what a reviewer needs to trust it (gate result and per-gate deltas, base model, parent
version, dataset, adapter digest, judge and rubric, why training stopped). Three aliases carry the
serving state, MLflow's stages being deprecated: `champion` serves, `previous` is the rollback
target, `challenger` is registered but not yet serving. The alias moves are pure functions
(`promoted`, `rolled_back`) so the real registry and the fake one cannot disagree on them.

Nothing registered is used unverified: `fetch` downloads a version into a local cache and checks it
against the `adapter_sha256` tag recorded at registration (computed here from the files, never taken
from the caller), on every call, cached copy included. A mismatch is refused with one line.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pipeline.adapters import (
    AdapterInvalid,
    AdapterVersion,
    adapter_sha256,
    check_adapter_dir,
    verify_adapter,
)
from pipeline.register.mlflow_run import ADAPTER_ARTIFACT, MlflowErrors, NightRun, mlflow_client
from storage.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from evals.gate import GateReport

__all__ = [
    "ALIASES",
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS",
    "AdapterRefused",
    "MlflowRegistry",
    "Registry",
    "RegistryError",
    "VersionInfo",
    "cached_adapter",
    "check_track_name",
    "parse_version_or_alias",
    "promoted",
    "rolled_back",
    "version_tags",
]

logger = logging.getLogger(__name__)

CHAMPION = "champion"  # the version serving under the track's stable name
PREVIOUS = "previous"  # the rollback target: the champion the current one replaced
CHALLENGER = "challenger"  # registered (gate passed), not yet serving
ALIASES = (CHAMPION, PREVIOUS, CHALLENGER)
SHA_TAG = "adapter_sha256"
PARENT_TAG = "parent_version"
TRACK_TAG = "track"
RESERVED_TAGS = frozenset({SHA_TAG, PARENT_TAG, TRACK_TAG})  # set by `register`, never by the caller
TRACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
VERSION_TEXT = re.compile(r"v?([0-9]+)")


class RegistryError(UserError):
    """The registry refused an operation, or a version or alias does not exist; one line says which."""


class AdapterRefused(RegistryError, AdapterInvalid):
    """A registered adapter's files do not match the digest recorded at registration."""


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as the registry reports it."""

    track: str
    version: int
    aliases: tuple[str, ...]  # of ALIASES, those pointing at this version
    tags: dict[str, str] = field(hash=False)
    run_id: str | None  # the MLflow run that produced it
    created_at: datetime  # UTC

    @property
    def adapter_sha256(self) -> str | None:
        return self.tags.get(SHA_TAG)


@runtime_checkable
class Registry(Protocol):
    """What the pipeline needs of a model registry; `MlflowRegistry` is the real one."""

    def register(self, track: str, adapter_dir: Path, *, run_id: str | None, tags: Mapping[str, str]) -> int:
        """Store the adapter as a new version (tags + `adapter_sha256`, `parent_version`), alias `challenger`."""
        ...

    def versions(self, track: str) -> list[VersionInfo]:
        """Every version of the track, oldest first; empty when nothing was registered."""
        ...

    def version_for(self, track: str, alias: str) -> int | None:
        """The version an alias points at, None when unset."""
        ...

    def promote(self, track: str, version: int) -> None:
        """champion := version, previous := the old champion, challenger dropped if it was this version."""
        ...

    def rollback_aliases(self, track: str, to_version: int) -> None:
        """champion := to_version, previous := the champion it replaced."""
        ...

    def fetch(self, track: str, version_or_alias: int | str) -> AdapterVersion:
        """The version's adapter as a verified local directory, or `AdapterRefused`."""
        ...


# --------------------------------------------------------------------------- pure logic


def check_track_name(track: str) -> str:
    """The track name, if usable in model names, filters and cache paths; `RegistryError` otherwise."""
    if not TRACK_NAME.fullmatch(track):
        raise RegistryError(
            f"track {track!r}: names must be 1-100 letters, digits, '_', '.' or '-', starting alphanumeric"
        )
    return track


def parse_version_or_alias(value: int | str) -> int | str:
    """`3`, `"3"` or `"v3"` -> 3; an alias name stays a name; anything else is a `RegistryError`."""
    if isinstance(value, int):
        if value < 1:
            raise RegistryError(f"version {value}: versions start at 1")
        return value
    match = VERSION_TEXT.fullmatch(value.strip())
    if match:
        return parse_version_or_alias(int(match.group(1)))
    if value in ALIASES:
        return value
    raise RegistryError(f"{value!r} is neither a version number nor one of the aliases {', '.join(ALIASES)}")


def promoted(aliases: Mapping[str, int], version: int) -> dict[str, int]:
    """The aliases after promoting `version`: it becomes champion, the old champion becomes previous."""
    moved = dict(aliases)
    old = aliases.get(CHAMPION)
    moved[CHAMPION] = version
    if old is not None and old != version:
        moved[PREVIOUS] = old
    if aliases.get(CHALLENGER) == version:
        del moved[CHALLENGER]
    return moved


def rolled_back(aliases: Mapping[str, int], to_version: int) -> dict[str, int]:
    """The aliases after a rollback to `to_version`: champion moves back, previous is what it replaced."""
    moved = dict(aliases)
    old = aliases.get(CHAMPION)
    moved[CHAMPION] = to_version
    if old is not None and old != to_version:
        moved[PREVIOUS] = old
    return moved


def _tag_key(gate_name: str) -> str:
    """`suite/arithmetic` -> `suite.arithmetic`: dotted like the other review tags."""
    return gate_name.replace("/", ".")


def _bound(value: float | None, infinity: str) -> str:
    return infinity if value is None or not math.isfinite(value) else f"{value:+.3f}"


def _gate_tag(delta: float, low: float | None, high: float | None, passed: bool) -> str:
    """`+0.012 [-0.004, +0.030] pass`; an interval unbounded at this n shows as -inf/+inf."""
    interval = "" if low is None and high is None else f" [{_bound(low, '-inf')}, {_bound(high, '+inf')}]"
    return f"{delta:+.3f}{interval} {'pass' if passed else 'FAIL'}"


def version_tags(
    *,
    gate: GateReport,
    base_model: str,
    dataset_sha256: str,
    judge_model: str,
    rubric_version: str,
    stop_reason: str,
) -> dict[str, str]:
    """The review tags of a candidate version: the gate verdict; `delta.<gate>` for every gate with a
    delta (`delta.suite.arithmetic` = `+0.012 [-0.004, +0.030] pass`); the KL to the base; and where
    the candidate came from."""
    tags = {"gate": "passed" if gate.passed else "failed"}
    if not gate.passed:
        tags["gate.failed"] = ", ".join(gate.failed_gates())
    for result in gate.gates:
        if result.delta is not None and math.isfinite(result.delta):
            tags[f"delta.{_tag_key(result.name)}"] = _gate_tag(
                result.delta, result.ci_low, result.ci_high, result.passed
            )
        elif result.kind == "kl":
            tags[f"gate.{_tag_key(result.name)}"] = (
                f"{result.metric:.4f} (max {result.threshold:g}) {'pass' if result.passed else 'FAIL'}"
            )
    tags.update(
        {
            "base_model": base_model,
            "dataset_sha256": dataset_sha256,
            "judge_model": judge_model,
            "rubric_version": rubric_version,
            "stop_reason": stop_reason,
        }
    )
    return tags


def registration_tags(
    track: str, caller_tags: Mapping[str, str], *, sha256: str, parent: int | None
) -> dict[str, str]:
    """The caller's tags as text plus the ones only the registry sets (digest, parent, track)."""
    tags = {str(key): str(value) for key, value in caller_tags.items() if key not in RESERVED_TAGS}
    tags.update({PARENT_TAG: "none" if parent is None else str(parent), SHA_TAG: sha256, TRACK_TAG: track})
    return tags


# --------------------------------------------------------------------------- the verified cache (files)


def cached_adapter(
    cache_dir: Path, track: str, version: int, sha256: str, download: Callable[[Path], Path]
) -> AdapterVersion:
    """`cache_dir/<track>/v<N>/`, downloaded with `download(scratch_dir) -> adapter_dir` when absent, and
    verified against `sha256` on every call. A mismatch raises `AdapterRefused`, for a download (the
    stored artifact was altered) and for a cached copy (the cache was altered) alike."""
    target = Path(cache_dir) / track / f"v{version}"
    label = f"{track} v{version}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".v{version}-", dir=target.parent) as scratch:
            downloaded = download(Path(scratch))
            _verify(downloaded, sha256, f"{label}: refused the registry's copy")
            try:
                downloaded.rename(target)
            except OSError:  # another process cached it first; its copy is verified below
                if not target.is_dir():
                    raise
    _verify(target, sha256, f"{label}: refused the cached copy at {target} (delete it to download again)")
    return AdapterVersion(track=track, version=version, path=target, sha256=sha256)


def _verify(adapter_dir: Path, sha256: str, context: str) -> None:
    try:
        verify_adapter(adapter_dir, sha256)
    except AdapterInvalid as error:
        raise AdapterRefused(f"{context}: {error}") from None


# --------------------------------------------------------------------------- MLflow


class MlflowRegistry:
    """The registry in MLflow: registered model `<model_prefix><track>`, versions, aliases, artifacts.

    Works with a local store (`sqlite:///...`: artifacts under `artifact_location`) and with a
    tracking server (`http://...`: artifacts through the server). An adapter registered without a run
    is logged in a small `register` run of the track's experiment, so every version has a source run.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        registry_uri: str | None = None,
        model_prefix: str = "overnight-",
        cache_dir: Path,
        experiment_prefix: str = "overnight-",
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.model_prefix = model_prefix
        self.cache_dir = Path(cache_dir)
        self.experiment_prefix = experiment_prefix
        self.artifact_location = artifact_location
        self._client: MlflowClient | None = None

    def model_name(self, track: str) -> str:
        return f"{self.model_prefix}{check_track_name(track)}"

    # ---- Registry

    def register(self, track: str, adapter_dir: Path, *, run_id: str | None, tags: Mapping[str, str]) -> int:
        adapter_dir = Path(adapter_dir)
        check_adapter_dir(adapter_dir)
        sha256 = adapter_sha256(adapter_dir)
        name = self.model_name(track)
        self._ensure_model(name, track)
        parent = self.version_for(track, CHAMPION)
        run_id, source = self._stored_adapter(track, adapter_dir, run_id, sha256)
        version_tags = registration_tags(track, tags, sha256=sha256, parent=parent)
        with self._errors(f"register a version of {name}"):
            created = self._mlflow().create_model_version(name, source, run_id=run_id, tags=version_tags)
            version = int(created.version)
            self._mlflow().set_registered_model_alias(name, CHALLENGER, str(version))
        logger.info("registered %s v%d (parent %s, adapter %s)", name, version, parent, sha256[:12])
        return version

    def versions(self, track: str) -> list[VersionInfo]:
        name = self.model_name(track)
        aliases = self._aliases(name)
        if aliases is None:
            return []
        with self._errors(f"list the versions of {name}"):
            found = self._mlflow().search_model_versions(f"name = '{name}'")
        infos = [self._info(track, model_version, aliases) for model_version in found]
        return sorted(infos, key=lambda info: info.version)

    def version_for(self, track: str, alias: str) -> int | None:
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")
        return (self._aliases(self.model_name(track)) or {}).get(alias)

    def promote(self, track: str, version: int) -> None:
        self._move(track, version, promoted)

    def rollback_aliases(self, track: str, to_version: int) -> None:
        self._move(track, to_version, rolled_back)

    def fetch(self, track: str, version_or_alias: int | str) -> AdapterVersion:
        name = self.model_name(track)
        version = self._resolve(track, version_or_alias)
        model_version = self._model_version(name, version)
        sha256 = (model_version.tags or {}).get(SHA_TAG)
        if not sha256:
            raise RegistryError(f"{name} v{version}: no {SHA_TAG} tag (not registered by overnight): refused")

        def download(scratch: Path) -> Path:
            from mlflow.artifacts import download_artifacts

            with self._errors(f"download {name} v{version}"):
                uri = self._mlflow().get_model_version_download_uri(name, str(version))
                local = download_artifacts(
                    artifact_uri=uri, dst_path=str(scratch), tracking_uri=self.tracking_uri
                )
            return Path(local)

        return cached_adapter(self.cache_dir, track, version, sha256, download)

    # ---- MLflow plumbing

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri, self.registry_uri, error=RegistryError)
        return self._client

    def _errors(self, what: str) -> MlflowErrors:
        return MlflowErrors(self.registry_uri, what, RegistryError)

    def _ensure_model(self, name: str, track: str) -> None:
        if self._aliases(name) is not None:
            return
        try:
            with self._errors(f"create registered model {name}"):
                self._mlflow().create_registered_model(
                    name,
                    tags={TRACK_TAG: track},
                    description=f"LoRA adapters of the overnight track {track!r}.",
                )
        except RegistryError:
            if self._aliases(name) is None:  # not created concurrently by another process: a real failure
                raise

    def _aliases(self, name: str) -> dict[str, int] | None:
        """The model's aliases (of ALIASES) -> version; None when the registered model does not exist."""
        with self._errors(f"read {name}"), _not_found() as missing:
            model = self._mlflow().get_registered_model(name)
        if missing:
            return None
        return {alias: int(version) for alias, version in (model.aliases or {}).items() if alias in ALIASES}

    def _model_version(self, name: str, version: int) -> ModelVersion:
        with self._errors(f"read {name} v{version}"), _not_found() as missing:
            model_version = self._mlflow().get_model_version(name, str(version))
        if missing:
            raise RegistryError(f"{name}: no version {version}")
        return model_version

    def _resolve(self, track: str, version_or_alias: int | str) -> int:
        wanted = parse_version_or_alias(version_or_alias)
        if isinstance(wanted, int):
            return wanted
        version = self.version_for(track, wanted)
        if version is None:
            raise RegistryError(
                f"{self.model_name(track)}: no {wanted} version (alias {wanted!r} is not set)"
            )
        return version

    def _move(
        self, track: str, version: int, move: Callable[[Mapping[str, int], int], dict[str, int]]
    ) -> None:
        name = self.model_name(track)
        self._model_version(name, version)  # exists, or a one-line error
        before = self._aliases(name) or {}
        after = move(before, version)
        client = self._mlflow()
        with self._errors(f"move the aliases of {name}"):
            # previous first, champion next, challenger last: an interruption never loses the rollback target
            for alias in (PREVIOUS, CHAMPION, CHALLENGER):
                if alias in after and after[alias] != before.get(alias):
                    client.set_registered_model_alias(name, alias, str(after[alias]))
                elif alias not in after and alias in before:
                    client.delete_registered_model_alias(name, alias)
        logger.info("%s aliases: %s -> %s", name, before, after)

    def _stored_adapter(
        self, track: str, adapter_dir: Path, run_id: str | None, sha256: str
    ) -> tuple[str, str]:
        """(run id, artifact URI) of the adapter's copy in a run: the given run's, logged there if absent."""
        if run_id is None:
            night = NightRun(
                self.tracking_uri,
                f"{self.experiment_prefix}{track}",
                f"register-{track}",
                artifact_location=self.artifact_location,
                tags={"kind": "register"},
            )
            with night:
                return night.run_id, night.log_adapter(adapter_dir)
        with self._errors(f"read run {run_id}"):
            run = self._mlflow().get_run(run_id)
        logged = run.data.tags.get(SHA_TAG)
        if logged is not None and logged != sha256:
            raise RegistryError(
                f"run {run_id} logged a different adapter (sha256 {logged[:12]}…) than {adapter_dir} ({sha256[:12]}…)"
            )
        source = f"{str(run.info.artifact_uri).rstrip('/')}/{ADAPTER_ARTIFACT}"
        if logged is None:
            with self._errors(f"log the adapter to run {run_id}"):
                self._mlflow().log_artifacts(run_id, str(adapter_dir), ADAPTER_ARTIFACT)
                self._mlflow().set_tag(run_id, SHA_TAG, sha256)
        return run_id, source

    def _info(self, track: str, model_version: ModelVersion, aliases: Mapping[str, int]) -> VersionInfo:
        version = int(model_version.version)
        created = (model_version.creation_timestamp or 0) / 1000
        return VersionInfo(
            track=track,
            version=version,
            aliases=tuple(alias for alias in ALIASES if aliases.get(alias) == version),
            tags=dict(model_version.tags or {}),
            run_id=model_version.run_id or None,
            created_at=datetime.fromtimestamp(created, tz=UTC),
        )


class _Missing:
    """Set by `_not_found` when MLflow answered RESOURCE_DOES_NOT_EXIST."""

    def __init__(self) -> None:
        self.value = False

    def __bool__(self) -> bool:
        return self.value


@contextmanager
def _not_found() -> Iterator[_Missing]:
    """Swallows MLflow's RESOURCE_DOES_NOT_EXIST, recording it; other errors pass through."""
    from mlflow.exceptions import MlflowException

    missing = _Missing()
    try:
        yield missing
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        missing.value = True
