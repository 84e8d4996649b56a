"""The compact hash set agrees with a Python set, batch by batch, including duplicates within a batch."""

import numpy as np

from pipeline.harvest.hash_set import CompactHashSet


def test_matches_python_set_semantics() -> None:
    rng = np.random.default_rng(0)
    compact, reference = CompactHashSet(), set()
    for _ in range(200):
        batch = rng.integers(0, 20_000, size=500).astype(np.uint64)
        expected = []
        for value in batch.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert compact.add_batch(batch).tolist() == expected
    assert len(compact) == len(reference)


def test_large_values_and_empty_batches() -> None:
    compact = CompactHashSet()
    top = np.array([2**64 - 1, 0, 2**63], dtype=np.uint64)
    assert compact.add_batch(top).tolist() == [True, True, True]
    assert compact.add_batch(np.array([], dtype=np.uint64)).tolist() == []
    assert compact.add_batch(top[::-1]).tolist() == [False, False, False]
