"""The memory suite: a track's well-judged past interactions, kept as a regression suite of its own.

Why: shipped suites test skills someone thought of; the memory suite tests what this track's users
actually asked and were well served on. Each night folds its well-judged interactions in (capped,
versioned by sha256), after its candidate was decided, so tonight's memory guards the nights after.
`track_suites` is every suite a track's gate runs: the ones it names, then its memory suite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from evals.suites import Suite, build_memory_suite, load_suite, write_suite
from pipeline.config import OvernightConfig

__all__ = ["memory_suite_path", "track_suites", "update_memory_suite"]


def memory_suite_path(home: str | Path, track: str) -> Path:
    return Path(home) / "suites" / f"memory-{track}.jsonl"


def track_suites(config: OvernightConfig, track: str) -> list[Suite]:
    """The suites a track names (shipped names or JSONL paths), then its memory suite when it has one."""
    suites = [load_suite(name) for name in config.track(track).suites]
    memory = memory_suite_path(config.home, track)
    if memory.exists():
        suites.append(load_suite(memory))
    return suites


def update_memory_suite(
    home: str | Path, track: str, judged: Iterable[Mapping[str, Any]], *, cap: int, min_reward: float
) -> Suite | None:
    """Fold tonight's well-judged interactions into the track's memory suite (capped, versioned by sha256).

    `judged` rows need `messages`, `response`, `reward` and `interaction_id`. Called once the
    night's candidate has been decided, so tonight's memory guards the nights after, not itself.
    """
    if cap == 0:
        return None
    path = memory_suite_path(home, track)
    previous = load_suite(path) if path.exists() else None
    suite = build_memory_suite(judged, previous=previous, cap=cap, min_reward=min_reward, track=track)
    if not suite.cases:
        return previous
    path.parent.mkdir(parents=True, exist_ok=True)
    write_suite(suite, path)
    return suite
