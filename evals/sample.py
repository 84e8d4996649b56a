"""What a grader scores (`Sample`) and the number a reply ends on (`last_number`).

Apart from `evals.graders` so that the graders built on them elsewhere (`evals.arithmetic`) and the
spec registry in `evals.graders` that builds those graders import in one direction only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sample", "last_number"]


@dataclass(frozen=True)
class Sample:
    """One thing to grade: the conversation so far, the model's reply and what a good reply is."""

    messages: list[dict[str, str]]  # the prompt, as chat messages
    response: str  # the model's reply being graded
    reference: str | None = None  # the expected answer, when the suite line has one
    metadata: Mapping[str, Any] = field(default_factory=dict)  # anything else from the suite line


# The last number in a text: optional sign (not a hyphen between digits), thousands separators,
# decimals, exponent. "3-5" gives 5, "-7" gives -7, "1,234.5" gives 1234.5, "42." gives 42.
_NUMBER = re.compile(
    r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|(?<![\w.])-?\.\d+"
)


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None when it has none."""
    matches = _NUMBER.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None
