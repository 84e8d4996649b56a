"""The `gate` config section's guard keys as the pure gate's thresholds (`thresholds_from`)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from evals.guard import GuardThresholds
from pipeline.config import OvernightConfig
from pipeline.gate.stage import thresholds_from


def config(**gate: object) -> OvernightConfig:
    return OvernightConfig.model_validate(
        {
            "gate": gate,
            "tracks": [
                {"name": "math", "gate": {"confirm_with": ["demo-arithmetic"]}},
                {"name": "support", "gate": {"confirm_with": []}},
                {"name": "other"},
            ],
        }
    )


def test_confirmation_is_on_unless_confirm_with_is_empty() -> None:
    settings = config()
    assert thresholds_from(settings.gate_for("math")).guard.confirm
    assert thresholds_from(settings.gate_for("other")).guard.confirm  # None: every suite
    assert not thresholds_from(settings.gate_for("support")).guard.confirm
    assert settings.gate_for("math").confirm_with == ["demo-arithmetic"]
    assert settings.gate_for("other").confirm_with is None


def test_defaults_are_the_guards_defaults() -> None:
    assert thresholds_from(config().gate_for("other")).guard == GuardThresholds()


def test_guard_keys_are_mapped() -> None:
    settings = config(
        confirm_confidence=0.9,
        max_repetition=0.3,
        min_distinct_ratio=0.5,
        max_identical_share=0.1,
        max_length_ratio=2.0,
    )
    guard = thresholds_from(settings.gate_for("math")).guard
    assert (guard.confirm_confidence, guard.max_repetition, guard.min_distinct_ratio) == (0.9, 0.3, 0.5)
    assert (guard.max_identical_share, guard.max_length_ratio) == (0.1, 2.0)


@pytest.mark.parametrize(
    "gate",
    [
        {"confirm_confidence": 0.5},
        {"confirm_confidence": 1.0},
        {"max_repetition": 1.5},
        {"min_distinct_ratio": -0.1},
        {"max_identical_share": 2},
        {"max_length_ratio": 1.0},
    ],
)
def test_out_of_range_guard_keys_are_refused(gate: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        config(**gate)
