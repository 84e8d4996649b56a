"""Fakes for a night's serving side and log: a deployer, a reply generator and a recording night log.

With `FakeRegistry` and `FakeJudge` they make `NightServices` for a night that runs on SQLite alone:
no Prefect, no vLLM, no MLflow (training and the KL probe still run in-process on the tiny model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.adapters import AdapterVersion
from pipeline.gate.generation import Chat, Decoding
from pipeline.register.night_log import NightLogContext
from pipeline.results import StageResult, Swap


@dataclass
class FakeDeployer:
    """Records what a night hot-swapped; `fail` makes the next swap raise as an unreachable server would."""

    swapped: list[tuple[str, int]] = field(default_factory=list)
    fail: bool = False

    def __call__(self, adapter: AdapterVersion) -> Swap:
        if self.fail:
            raise ConnectionError("fake endpoint: connection refused")
        self.swapped.append((adapter.track, adapter.version))
        return Swap(
            track=adapter.track,
            version=adapter.version,
            action="deploy",
            endpoints=["fake://serving"],
            seconds=0.0,
            fingerprint="fake",
            previous={"fake://serving": None},
        )


@dataclass
class FakeGenerator:
    """Replies by who answers: `base_reply` for the base model, `adapter_reply` for any adapter."""

    base_reply: str = "I do not know."
    adapter_reply: str = "The answer is 7."
    calls: int = 0

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        self.calls += 1
        return [self.base_reply if adapter is None else self.adapter_reply for _ in prompts]


@dataclass
class RecordingNightLog:
    """A `NightLog` that keeps what it was given, in order."""

    context: NightLogContext
    results: list[StageResult] = field(default_factory=list)
    failed: str | None = None  # the reason, once the night failed

    @property
    def run_id(self) -> str | None:
        return "fake-run"

    def log(self, result: StageResult) -> None:
        self.results.append(result)

    def fail(self, reason: str) -> None:
        self.failed = reason


@dataclass
class NightLogs:
    """A `NightLogFactory` that remembers every log it made."""

    made: list[RecordingNightLog] = field(default_factory=list)

    def __call__(self, context: NightLogContext) -> RecordingNightLog:
        log = RecordingNightLog(context)
        self.made.append(log)
        return log

    def logged(self, kind: type[StageResult]) -> list[StageResult]:
        return [result for log in self.made for result in log.results if isinstance(result, kind)]


@dataclass
class CountingFactory:
    """Wraps a factory and counts how often it was called."""

    make: Callable[[], Any]
    calls: int = 0
    made: list[Any] = field(default_factory=list)

    def __call__(self) -> Any:
        self.calls += 1
        self.made.append(self.make())
        return self.made[-1]
