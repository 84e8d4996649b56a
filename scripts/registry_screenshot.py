"""Screenshot a track's registered model page in the MLflow UI: versions, aliases and gate tags.

Reviewers decide in the browser, so the README shows what they will see. This starts `mlflow
server` on a store (the demo's, or a small one it seeds itself with `--seed`), opens
`#/models/<model>` in headless Chromium (Debian's `chromium` package; not needed to run or test
overnight) and saves a PNG:

    .venv/bin/python scripts/registry_screenshot.py --seed --out docs/registry.png
    .venv/bin/python scripts/registry_screenshot.py --store sqlite:///.overnight/mlflow.db \\
        --artifacts .overnight/mlartifacts --model overnight-support --out registry.png

`--seed` writes four nights of the track into a fresh store through `pipeline.register.mlflow_run` and
`pipeline.register.registry` (runs with gate reports and training curves, v1 promoted then replaced by v2,
v3 registered as challenger, one rejected night with a run and no version).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.gate import GateReport, GateThresholds, SuiteScores, decide  # noqa: E402
from pipeline.demo_world.adapters import make_adapter_dir  # noqa: E402
from pipeline.deploy.vllm_process import free_port  # noqa: E402
from pipeline.register.mlflow_run import NightRun, server_healthy  # noqa: E402
from pipeline.register.registry import MlflowRegistry, version_tags  # noqa: E402

logger = logging.getLogger("registry_screenshot")

CHROMIUM = "chromium"


def _night_report(gain: float, regression: float) -> GateReport:
    champion = [1.0] * 24 + [0.0] * 8
    candidate = list(champion)
    for index in range(round(regression * len(champion))):  # flip some passes to failures
        candidate[index] = 0.0
    return decide(
        [
            SuiteScores("arithmetic", candidate=candidate, champion=champion),
            SuiteScores("refusals", candidate=[1.0] * 20, champion=[1.0] * 20, safety=True),
        ],
        heldout_candidate=[0.5 + gain + 0.02 * (i % 5) for i in range(24)],
        heldout_champion=[0.5 + 0.02 * (i % 5) for i in range(24)],
        kl_to_base=0.04 + gain / 4,
        thresholds=GateThresholds(bootstrap_samples=500),
    )


def _write_metrics(path: Path, steps: int, start: float) -> Path:
    lines = [
        f'{{"step": {step}, "reward_mean": {start + 0.02 * step:.4f}, "reward_std": 0.08, '
        f'"kl": {0.004 * step:.4f}, "kl_rolling": {0.003 * step:.4f}, "loss": 0.01}}\n'
        for step in range(1, steps + 1)
    ]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def seed_store(tracking_uri: str, artifacts: Path, track: str, scratch: Path) -> None:
    """Four nights of `track`: promoted, promoted, rejected, and a registered challenger."""
    registry = MlflowRegistry(tracking_uri, cache_dir=scratch / "cache", artifact_location=str(artifacts))
    nights = [  # (night, held-out gain, share of suite cases regressed, promote?)
        ("2026-11-19", 0.10, 0.0, True),
        ("2026-11-20", 0.06, 0.0, True),
        ("2026-11-21", 0.05, 0.25, False),  # the gate refuses it: a run, no version
        ("2026-11-22", 0.04, 0.0, False),  # registered, not promoted: the challenger
    ]
    for index, (night, gain, regression, promote) in enumerate(nights, start=1):
        report = _night_report(gain, regression)
        adapter = make_adapter_dir(scratch / f"adapter-{index}", seed=index, base_model="tiny-model")
        with NightRun(
            tracking_uri, f"overnight-{track}", f"{track}-{night}", artifact_location=str(artifacts)
        ) as run:
            run.log_params({"track": track, "train": {"max_steps": 20, "lora_rank": 8}, "night": night})
            run.log_window(
                {
                    "track": track,
                    "after_id": 1000 * index,
                    "until_id": 1000 * index + 640,
                    "sha256": f"{index:064x}",
                }
            )
            run.log_training(_write_metrics(scratch / f"metrics-{index}.jsonl", 12, 0.4 + 0.05 * index))
            run.log_gate(report)
            run.log_text(
                "rubric.md", "# helpfulness v2\nScore 1-5 for how well the reply solves the user's problem.\n"
            )
            if not report.passed:
                continue  # a rejected night: a run, no version
            run.log_adapter(adapter)
            tags = version_tags(
                gate=report,
                base_model="tiny-model",
                dataset_sha256=f"{index:064x}",
                judge_model="base",
                rubric_version="helpfulness@2",
                stop_reason="max_steps",
            )
            version = registry.register(track, adapter, run_id=run.run_id, tags=tags)
        if promote:
            registry.promote(track, version)


@contextmanager
def mlflow_server(tracking_uri: str, artifacts: Path, log_file: Path) -> Iterator[str]:
    """`mlflow server` on a free local port until the block ends; yields its URL once it answers."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri,
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while not server_healthy(url, timeout_seconds=1.0):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mlflow server did not start; see {log_file}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def warm_up(url: str, model: str) -> None:
    """The first API call of a fresh server opens its store (slow); make it before the browser waits."""
    import httpx

    response = httpx.get(f"{url}/api/2.0/mlflow/registered-models/get", params={"name": model}, timeout=300)
    if response.status_code != 200:
        raise SystemExit(f"{model}: not in this store ({response.status_code}: {response.text[:200]})")


def night_run(store: str, track: str, verdict: str) -> str:
    """`<experiment id>/runs/<run id>` of the track's latest night whose gate `verdict` was reached."""
    from pipeline.register.mlflow_run import mlflow_client

    client = mlflow_client(store)
    experiment = client.get_experiment_by_name(f"overnight-{track}")
    if experiment is None:
        raise SystemExit(f"no experiment overnight-{track} in {store}")
    gate = "passed" if verdict == "promoted" else "failed"
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.gate = '{gate}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"no {verdict} night of {track} in {store}")
    return f"{experiment.experiment_id}/runs/{runs[0].info.run_id}"


def screenshot(url: str, out: Path, *, width: int, height: int, budget_ms: int) -> None:
    """Headless Chromium renders the page (the UI is a React app: a virtual-time budget lets it load)."""
    browser = shutil.which(CHROMIUM)
    if browser is None:
        raise SystemExit(
            "chromium not found: install Debian's `chromium` package (apt-get install -y chromium)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url,
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=300)
    if not out.is_file():
        raise SystemExit(f"chromium wrote no screenshot to {out}")


def side_panel_edge(image: Any) -> int | None:
    """The x where the UI's assistant side panel begins: the first full-height gutter (a column with
    almost no pure-white pixels) right of the page's middle; None when there is no panel."""
    rgb = image.convert("RGB")
    top, bottom = rgb.height // 10, rgb.height * 9 // 10
    for x in range(rgb.width // 2, rgb.width):
        column = [rgb.getpixel((x, y)) for y in range(top, bottom, 4)]
        white = sum(1 for pixel in column if pixel == (255, 255, 255))
        if white < 0.02 * len(column):
            return x
    return None


def finish_png(path: Path, *, colors: int = 128) -> None:
    """Crop the assistant side panel (open by default, unrelated to the registry) and save a palette
    PNG: a UI screenshot has few colours, so this keeps it small for the repository."""
    from PIL import Image

    with Image.open(path) as image:
        edge = side_panel_edge(image) or image.width
        small = image.convert("RGB").crop((0, 0, edge, image.height)).quantize(colors=colors)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", help="tracking+registry URI, e.g. sqlite:///.overnight/mlflow.db")
    parser.add_argument(
        "--artifacts", type=Path, help="the store's local artifact folder (served by the server)"
    )
    parser.add_argument("--seed", action="store_true", help="seed a fresh temporary store with four nights")
    parser.add_argument("--track", default="support")
    parser.add_argument("--model", help="registered model (default overnight-<track>)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "registry.png", help="the model page")
    parser.add_argument(
        "--run",
        choices=("rejected", "promoted"),
        help="screenshot the track's latest rejected (or promoted) night run's overview page instead",
    )
    parser.add_argument("--width", type=int, default=1800)
    parser.add_argument("--height", type=int, default=1300)
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time the page gets to render")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model or f"overnight-{args.track}"
    with tempfile.TemporaryDirectory(prefix="registry-screenshot-") as scratch_dir:
        scratch = Path(scratch_dir)
        if args.seed:
            store, artifacts = f"sqlite:///{scratch / 'mlflow.db'}", scratch / "artifacts"
            seed_store(store, artifacts, args.track, scratch)
        elif args.store and args.artifacts:
            store, artifacts = args.store, args.artifacts.resolve()
        else:
            parser.error("give --store and --artifacts, or --seed")
        with mlflow_server(store, artifacts, scratch / "server.log") as url:
            if args.run:
                page = f"{url}/#/experiments/{night_run(store, args.track, args.run)}"
            else:
                warm_up(url, model)
                page = f"{url}/#/models/{model}"
            logger.info("rendering %s", page)
            screenshot(page, args.out, width=args.width, height=args.height, budget_ms=args.budget_ms)
    finish_png(args.out)
    logger.info("wrote %s (%d KiB)", args.out, args.out.stat().st_size // 1024)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
