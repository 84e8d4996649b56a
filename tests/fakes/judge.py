"""Fakes for the pipeline's external systems (real behaviour, no network), used by unit tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.judge.client import JudgeResult, JudgeStats
from pipeline.judge.rubrics import Rubric


class FakeJudge:
    """A judge that scores with a plain function of the response; None means the judgment failed."""

    model = "fake-judge"

    def __init__(self, score_of: Callable[[str], float | None]) -> None:
        self.score_of = score_of
        self.stats = JudgeStats()

    def _result(self, response: str) -> JudgeResult:
        self.stats.calls += 1
        score = self.score_of(response)
        if score is None:
            self.stats.failed += 1
            return JudgeResult(None, status="failed", error="unparseable judge answer: fake")
        self.stats.judged += 1
        return JudgeResult(score, raw_score=score)

    async def score(
        self,
        rubric: Rubric,
        conversations: Sequence[list[dict[str, str]]],
        responses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> list[JudgeResult]:
        return [self._result(response) for response in responses]

    async def score_groups(
        self,
        rubric: Rubric,
        conversations: Sequence[list[dict[str, str]]],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str | None] | None = None,
    ) -> list[list[JudgeResult]]:
        return [[self._result(candidate) for candidate in group] for group in candidates]
