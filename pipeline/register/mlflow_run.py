"""One MLflow run per track per night: everything a reviewer needs to decide, without a terminal.

People review the night in the MLflow UI, not in logs. So every night, promoted or rejected, gets a
run in the track's experiment holding: the flattened config and data window as params (secrets
never), the training curves as step metrics (the UI charts them per step), judge statistics and
calibration, every gate's metric/delta/CI/pass as metrics with the gate table and a delta plot as
artifacts, the snapshot manifest, the rubric text and the adapter directory.

From MLflow: `MlflowClient.log_batch` splits any number of params, tags and metrics into the batches
its store accepts (100 params or tags, 1000 entities per call in MLflow 3.17), `log_dict` writes the
JSON artifacts, `log_text` the text ones, `log_artifact(s)` the files already on disk, and the run
page charts the step metrics (no training plot of our own). By hand, because MLflow does not: the
flattening of a nested config into dotted params with secrets dropped, the length limits applied
before logging (so the returned params are what was stored, and a long key is cut, not refused), and
one-line `TrackingError`s naming the store. The gate's delta plot (`evals.gate.deltas_figure`) goes in
through `log_figure`.

MLflow is reached only through an explicit `MlflowClient` (tracking and registry URIs passed in, no
global active run, no `mlflow.set_tracking_uri`), so two tracks or two stores never leak into each
other, and an exception in the night never leaves a run open: `NightRun` used as a context manager
ends it `FAILED`. Telemetry and progress bars are switched off before MLflow is imported: nothing
here needs the network beyond the tracking server itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, SecretStr

from storage.engine import safe_url
from storage.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from evals.gate import GateReport

__all__ = [
    "MAX_PARAM_VALUE_LENGTH",
    "MlflowErrors",
    "NightRun",
    "TrackingError",
    "flatten_params",
    "is_secret_key",
    "mlflow_client",
    "read_training_metrics",
    "server_healthy",
]

logger = logging.getLogger(__name__)

MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.17
MAX_TAG_VALUE_LENGTH = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
SECRET_SUBSTRINGS = ("api_key", "apikey", "secret", "password", "passwd", "credential", "private_key")
SECRET_WORDS = frozenset({"token", "auth", "authorization", "bearer"})  # whole words of the last key segment
TRAINING_PREFIX = "train/"
GATE_CASES = "gate/cases.json"  # per-case replies, an MLflow table
GATE_PLOT = "plots/gate_deltas.png"
ADAPTER_ARTIFACT = "adapter"


class TrackingError(UserError):
    """The MLflow tracking store refused or could not be reached; the message names the URI."""


def mlflow_client(
    tracking_uri: str, registry_uri: str | None = None, *, error: type[UserError] = TrackingError
) -> MlflowClient:
    """An `MlflowClient` bound to these URIs, with telemetry and artifact progress bars off.

    MLflow would print run links on stdout, where the CLI's `--json` goes: switched off too. An
    `http(s)://` server is probed first (`/health`, 5 s): MLflow's own client retries an
    unreachable server for minutes, a user deserves the one-line `error` at once.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout carries `--json`
    for uri in {tracking_uri, registry_uri or tracking_uri}:
        if uri.startswith(("http://", "https://")) and not server_healthy(uri):
            raise error(f"MLflow server at {safe_url(uri)} is not reachable (no answer on /health)")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def server_healthy(base_url: str, timeout_seconds: float = 5.0) -> bool:
    """Whether an MLflow server answers `GET /health` with 200."""
    import httpx

    try:
        return httpx.get(f"{base_url.rstrip('/')}/health", timeout=timeout_seconds).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- params (pure)


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) key names a secret: `judge.api_key`, `hf_token`, `db.password`, ...

    Matched on the last segment: a secret substring, or a secret whole word (`max_tokens` is not one).
    """
    last = key.rsplit(".", 1)[-1].lower().replace("-", "_")
    if any(part in last for part in SECRET_SUBSTRINGS):
        return True
    return bool(SECRET_WORDS.intersection(last.split("_")))


def _render(value: Any) -> str:
    """A param value as text: URLs with their password masked, numbers and booleans as JSON would."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return safe_url(value) if "://" in value and "@" in value else value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _leaves(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Mapping):
        if not value and prefix:
            yield prefix, "{}"
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple) and any(isinstance(item, Mapping | BaseModel) for item in value):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{prefix}.{index}")
    else:
        yield prefix, value


def flatten_params(config: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, str]:
    """Nested config as dotted MLflow params, secrets removed, values cut to MLflow's length limit.

    Lists of objects are indexed (`tracks.0.name`), lists of scalars stay one value. A key that names
    a secret (see `is_secret_key`) and any `SecretStr` value are dropped, never rendered; a URL's
    password is masked.
    """
    params: dict[str, str] = {}
    for key, value in _leaves(config, prefix):
        if isinstance(value, SecretStr) or is_secret_key(key):
            continue
        if isinstance(value, list | tuple):
            text = json.dumps(
                [_render(item) if not isinstance(item, int | float) else item for item in value]
            )
        else:
            text = _render(value)
        params[key[:MAX_KEY_LENGTH]] = text[:MAX_PARAM_VALUE_LENGTH]
    return params


def _finite_numbers(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Numeric leaves of a nested mapping as `prefix + dotted/key` metrics; non-finite and text left out."""
    metrics: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            metrics.update(_finite_numbers(value, f"{name}/"))
        elif isinstance(value, bool) or _is_number(value):  # booleans as 0/1
            metrics[name] = float(value)
    return metrics


# --------------------------------------------------------------------------- training curves (pure)


def read_training_metrics(metrics_path: Path) -> list[dict[str, Any]]:
    """The steps of a `metrics.jsonl` (one JSON object per line, each with `step`); blank lines skipped."""
    steps: list[dict[str, Any]] = []
    with Path(metrics_path).open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise TrackingError(f"{metrics_path}:{number}: not a JSON line") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise TrackingError(f"{metrics_path}:{number}: a metrics line needs an integer `step`")
            steps.append(row)
    return steps


def step_figures(row: Mapping[str, Any]) -> dict[str, float]:
    """One metrics.jsonl line as MLflow metric names: `train/reward_mean`, `train/reward/<function>`."""
    figures = {key: value for key, value in row.items() if key not in ("step", "rewards")}
    per_function = row.get("rewards")
    if isinstance(per_function, Mapping):
        figures["reward"] = per_function  # `train/reward/<function>`, as `StepMetrics.flat` names them
    return _finite_numbers(figures, TRAINING_PREFIX)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- the run (I/O)


class NightRun:
    """One track-night's MLflow run; `with NightRun(...) as run:` ends it FINISHED, or FAILED on error.

    Every `log_*` method writes at once (nothing is buffered), so a night that fails half-way still
    shows what it got to.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        *,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.tags = dict(tags or {})
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._artifact_uri: str | None = None

    # ---- lifecycle

    def start(self) -> str:
        """Create the run (and the experiment the first time); returns the run id."""
        if self._run_id is not None:
            return self._run_id
        client = self._mlflow()
        with self._errors("start a run"):
            experiment_id = _experiment_id(client, self.experiment_name, self.artifact_location)
            run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self._run_id = run.info.run_id
        self._artifact_uri = run.info.artifact_uri
        logger.info("MLflow run %s (%s) in %s", self.run_name, self._run_id, self.experiment_name)
        return self._run_id

    def resume(self, run_id: str) -> str:
        """Continue an existing run (a night resumed after a crash logs into the run it started)."""
        client = self._mlflow()
        with self._errors(f"resume run {run_id}"):
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        self._run_id = run.info.run_id
        self._artifact_uri = run.info.artifact_uri
        return self._run_id

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("NightRun.start() was not called")
        return self._run_id

    @property
    def artifact_uri(self) -> str:
        """The run's artifact root (a local path, or `mlflow-artifacts:/...` through a server)."""
        self.run_id  # noqa: B018 - raises when not started
        assert self._artifact_uri is not None
        return self._artifact_uri

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: `FINISHED`, `FAILED` or `KILLED`."""
        with self._errors("end the run"):
            self._mlflow().set_terminated(self.run_id, status=status)
        logger.info("MLflow run %s (%s) ended %s", self.run_name, self.run_id, status)

    def __enter__(self) -> NightRun:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._run_id is None:
            return
        if error is None:
            self.finish("FINISHED")
            return
        first_line = (str(error).strip().splitlines() or [""])[0]
        try:
            self.set_tags({"error": f"{type(error).__name__}: {first_line}"})
            self.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        except UserError as failure:  # the original error matters more; say why the run stays open
            logger.warning("could not end MLflow run %s: %s", self._run_id, failure)

    # ---- what a night logs

    def log_params(self, params: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, str]:
        """Flatten (`flatten_params`: secrets dropped) and log; returns what was logged."""
        from mlflow.entities import Param

        flat = flatten_params(params, prefix)
        self._log_batch("log params", params=[Param(key, value) for key, value in flat.items()])
        return flat

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> dict[str, float]:
        """Numeric leaves of `metrics` (nested mappings joined with `/`); returns what was logged."""
        flat = _finite_numbers(metrics, "")
        self._log_metric_rows([(step, flat)])
        return flat

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)[:MAX_TAG_VALUE_LENGTH]) for key, value in tags.items()]
        self._log_batch("set run tags", tags=items)

    def log_window(self, manifest: Mapping[str, Any]) -> None:
        """The snapshot manifest: its scalar fields as `data.*` params, the whole as `snapshot_manifest.json`."""
        self.log_params(manifest, prefix="data")
        self.log_json("snapshot_manifest.json", manifest)

    def log_training(self, metrics_path: Path) -> int:
        """metrics.jsonl as step metrics (`train/<key>`, charted by MLflow) and as `train/metrics.jsonl`.

        Returns the number of steps logged.
        """
        steps = read_training_metrics(metrics_path)
        self._log_metric_rows([(int(row["step"]), step_figures(row)) for row in steps])
        self.log_file(metrics_path, "train")
        return len(steps)

    def log_reward_model(self, facts: Mapping[str, Any]) -> None:
        """Tonight's reward model: its agreement with users as `reward_model/*` metrics (usable as 1 or
        0), the reason it is (not) used as a tag, the whole as `reward_model.json`."""
        numbers = {
            key: facts.get(key)
            for key in ("agreement", "spearman", "train_examples", "heldout_examples", "steps", "version")
        }
        self.log_metrics({"reward_model": numbers | {"usable": 1.0 if facts.get("usable") else 0.0}})
        self.set_tags({"reward_model": str(facts.get("reason", ""))})
        self.log_json("reward_model.json", dict(facts))

    def log_judge(self, stats: Mapping[str, Any], calibration: Mapping[str, Any] | None = None) -> None:
        """Judge statistics as `judge/*` metrics and calibration as `calibration/*`, both also as `judge.json`."""
        self.log_metrics({"judge": dict(stats), "calibration": dict(calibration or {})})
        self.log_json("judge.json", {"stats": dict(stats), "calibration": dict(calibration or {})})

    def log_gate(self, report: GateReport, cases: Sequence[Mapping[str, Any]] = ()) -> None:
        """The gate as a reviewer reads it: the verdict, its reason and the gate table as the run's
        description (the run page's overview), tags `gate`, `gate.failed` and `gate.reason`, every
        gate's figures as metrics, `gate.md`, `gate.json`, `plots/gate_deltas.png`, and `cases`
        (champion's and candidate's reply to each suite case and held-out prompt) as the MLflow
        table `gate/cases.json`, which the run's Evaluation tab shows side by side."""
        from evals.gate import deltas_figure, report_markdown

        self._log_metric_rows([(0, report.as_metrics())])
        markdown = report_markdown(report)
        verdict = "Promoted" if report.passed else "Rejected"
        description = f"## {verdict}: {report.reason()}\n\n{markdown}"
        self.set_tags(
            {
                "gate": "passed" if report.passed else "failed",
                "gate.failed": ", ".join(report.failed_gates()) or "none",
                "gate.reason": report.reason()[: MAX_TAG_VALUE_LENGTH - 1],
                "mlflow.note.content": description[: MAX_TAG_VALUE_LENGTH - 1],
            }
        )
        self.log_text("gate.md", markdown)
        self.log_json("gate.json", report.as_json())
        with self._errors(f"log {GATE_PLOT}"):
            self._mlflow().log_figure(self.run_id, deltas_figure(report), GATE_PLOT)
        if cases:
            columns = {key: [row.get(key) for row in cases] for key in cases[0]}
            with self._errors(f"log {GATE_CASES}"):
                client = self._mlflow()
                # log_table appends to an existing table: a resumed night must not log its cases twice.
                if GATE_CASES not in {item.path for item in client.list_artifacts(self.run_id, "gate")}:
                    client.log_table(self.run_id, data=columns, artifact_file=GATE_CASES)

    def log_text(self, name: str, text: str) -> None:
        """A text artifact, e.g. `rubric.md`."""
        with self._errors(f"log {name}"):
            self._mlflow().log_text(self.run_id, text, name)

    def log_json(self, name: str, value: Any) -> None:
        """A JSON artifact (YAML when `name` ends in `.yml`/`.yaml`), through MLflow's `log_dict`."""
        with self._errors(f"log {name}"):
            self._mlflow().log_dict(self.run_id, value, name)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        """One local file as an artifact under `artifact_path`."""
        self._log_file(Path(path), artifact_path)

    def log_adapter(self, adapter_dir: Path) -> str:
        """The adapter directory as the `adapter/` artifact, tagged with its digest; returns its artifact URI."""
        from pipeline.adapters import adapter_sha256, check_adapter_dir

        check_adapter_dir(adapter_dir)
        with self._errors("log the adapter"):
            self._mlflow().log_artifacts(self.run_id, str(adapter_dir), ADAPTER_ARTIFACT)
        self.set_tags({"adapter_sha256": adapter_sha256(adapter_dir)})
        return f"{self.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT}"

    # ---- plumbing

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def _log_file(self, path: Path, artifact_path: str | None) -> None:
        with self._errors(f"log {path.name}"):
            self._mlflow().log_artifact(self.run_id, str(path), artifact_path)

    def _log_metric_rows(self, rows: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for step, figures in rows for key, value in figures.items()]
        self._log_batch("log metrics", metrics=items)

    def _log_batch(self, what: str, **entities: Sequence[Any]) -> None:
        """One `log_batch` call: MLflow splits it into batches its store accepts; synchronous, so an
        error surfaces here (`MLFLOW_ENABLE_ASYNC_LOGGING` would otherwise defer it)."""
        with self._errors(what):
            self._mlflow().log_batch(self.run_id, synchronous=True, **entities)

    def _errors(self, what: str) -> MlflowErrors:
        return MlflowErrors(self.tracking_uri, what, TrackingError)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted: restore it or remove it permanently")
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(artifact_location, name))
    except MlflowException:  # created concurrently by another track or process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _artifact_location(root: str | None, experiment_name: str) -> str | None:
    """A per-experiment folder under a local root (absolute, so the UI and other processes find it)."""
    if root is None:
        return None
    if "://" in root or root.startswith("mlflow-artifacts:"):
        return f"{root.rstrip('/')}/{experiment_name}"
    return str((Path(root) / experiment_name).resolve())


class MlflowErrors:
    """Turns MLflow and transport errors into a one-line `UserError` naming the store and the action."""

    def __init__(self, uri: str, what: str, error: type[UserError]) -> None:
        self.uri = uri
        self.what = what
        self.error = error

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None or isinstance(error, UserError):
            return
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        if isinstance(error, MlflowException | RequestException | OSError):
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise self.error(f"MLflow at {safe_url(self.uri)}: could not {self.what}: {first_line}") from None
