"""A set of 64-bit hashes at 8 bytes each, for deduplicating millions of prompts in bounded memory.

A Python `set` of ints costs about 70 bytes an entry; harvest must stay nearly flat in memory from
100k to 1M rows. Hashes live in sorted numpy chunks that merge like a binary counter (at most
log2(n) chunks); membership of a whole batch is one vectorised binary search per chunk.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Hashes = npt.NDArray[np.uint64]


class CompactHashSet:
    def __init__(self) -> None:
        self._chunks: list[Hashes] = []  # sorted, unique, sizes roughly decreasing
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add_batch(self, hashes: Hashes) -> npt.NDArray[np.bool_]:
        """Add a batch; returns, per position, whether it was new (first in the batch and unseen)."""
        _, first = np.unique(hashes, return_index=True)
        is_new = np.zeros(len(hashes), dtype=bool)
        is_new[first] = True
        for chunk in self._chunks:
            is_new &= ~_contains(chunk, hashes)
        fresh = np.sort(hashes[is_new])
        if len(fresh):
            self._push(fresh)
        return is_new

    def _push(self, chunk: Hashes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while len(self._chunks) > 1 and len(self._chunks[-2]) <= 2 * len(self._chunks[-1]):
            newest = self._chunks.pop()
            older = self._chunks.pop()
            self._chunks.append(np.sort(np.concatenate([older, newest])))


def _contains(chunk: Hashes, values: Hashes) -> npt.NDArray[np.bool_]:
    positions = np.searchsorted(chunk, values)
    positions[positions == len(chunk)] = 0
    return chunk[positions] == values
