"""Many of numpy's legacy ``np.random.randint`` draws at once, as the same values and the same
global state as the one-at-a-time calls that timm makes.

timm's per-element CutMix draws each row's box with scalar ``np.random.randint`` calls whose bounds
alternate (height, width) or depend on earlier draws (``cutmix_minmax``): a few microseconds each,
milliseconds for a batch. The legacy generator draws a bounded integer in [low, high) by masked
rejection on 32-bit words (``numpy/random/src/distributions/distributions.c``,
``buffered_bounded_masked_uint32``: ``v = next_uint32() & mask`` until ``v <= high - low - 1``,
mask the smallest ``2^k - 1`` covering the range; no draw when ``high - low == 1``). So the raw
32-bit words are read ahead from a copy of the global state, the rejections replayed in Python on
those words, and the global generator then advanced by exactly the words used.
"""
from __future__ import annotations

from typing import List

import numpy as np


class RawWords:
    """Bounded integers from the global legacy generator's stream of 32-bit words, with the
    global generator advanced on :meth:`commit` by the words consumed."""

    def __init__(self, expected: int):
        self._state = np.random.get_state()
        self._rs = np.random.RandomState()
        self._rs.set_state(self._state)
        self._words: List[int] = []
        self._used = 0
        self._fetch(max(8, expected + expected // 4 + 8))

    def _fetch(self, n: int) -> None:
        self._words += self._rs.randint(0, 2 ** 32, size=n, dtype=np.uint32).tolist()

    def randint(self, low: int, high: int) -> int:
        """``np.random.randint(low, high)`` (one int64 draw)."""
        if high <= low:
            raise ValueError("low >= high")
        rng = high - low - 1
        if rng == 0:
            return low
        if rng > 0xFFFFFFFF:
            raise NotImplementedError("ranges over 2^32 take the 64-bit path")  # never for image sizes
        mask = (1 << rng.bit_length()) - 1
        while True:
            if self._used == len(self._words):
                self._fetch(64)
            v = self._words[self._used] & mask
            self._used += 1
            if v <= rng:
                return low + v

    def commit(self) -> None:
        """Advance the global generator by the words consumed (its other state, such as a cached
        Gaussian, is untouched, as by the scalar calls)."""
        if self._used:
            np.random.randint(0, 2 ** 32, size=self._used, dtype=np.uint32)
