"""Decoded images kept in memory across epochs, up to a byte budget.

A training epoch over the 64 px world decodes 2000 JPEGs (and as many mask PNGs) again each time;
a real dataset may not fit. Entries are kept until ``budget_bytes`` is reached, and what does not
fit is decoded on each access, as before. Callers must not write into the arrays they get.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

DEFAULT_BUDGET_BYTES = 1 << 30


class DecodedCache:
    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._items: dict[Hashable, np.ndarray] = {}

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            return self._items[key]
        value = load()
        if self.bytes + value.nbytes <= self.budget_bytes:
            value.setflags(write=False)  # a caller writing into a shared array fails loudly
            self._items[key] = value
            self.bytes += value.nbytes
        return value

    def __len__(self) -> int:
        return len(self._items)
