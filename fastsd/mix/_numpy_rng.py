"""Many of numpy's legacy ``np.random.randint`` draws at once, as the same values and the same
global state as the one-at-a-time calls that timm makes.

timm's per-element CutMix draws each row's box with scalar ``np.random.randint`` calls whose bounds
alternate (height, width) or depend on earlier draws (``cutmix_minmax``): a few microseconds each,
milliseconds for a batch. The legacy generator draws an integer in [low, high) by masked rejection
on 32-bit words (numpy/random/src/distributions/distributions.c, ``buffered_bounded_masked_uint32``:
``v = next_uint32() & mask`` until ``v <= high - low - 1``, mask the smallest ``2^k - 1`` covering
the range), and draws no word at all when ``high - low == 1``. Every other draw takes at least one
word, so with ``pending`` such draws still to come, reading ``pending`` raw words from the global
generator (one vectorised call) never reads past what the scalar calls would: the words are
consumed exactly, the rejections replayed in Python, more words read only when rejections ran the
read-ahead out. No copy of the generator's state is made, and its other state (a cached Gaussian)
is untouched, as by the scalar calls.
"""
from __future__ import annotations

import numpy as np

WORD = 2 ** 32


def consumes_word(low: int, high: int) -> bool:
    """Whether ``np.random.randint(low, high)`` reads the generator (not when one value is possible)."""
    return high - low > 1


class RawWords:
    """``randint(low, high)`` as ``np.random.randint(low, high)`` makes it, for a known number of
    draws (``pending``: those with ``high - low > 1``) from numpy's global legacy generator."""

    def __init__(self, pending: int):
        self._pending = pending
        self._words = []
        self._next = 0

    def randint(self, low: int, high: int) -> int:
        if high <= low:
            raise ValueError("low >= high")
        rng = high - low - 1
        if rng == 0:
            return low
        if rng >= WORD - 1:
            raise NotImplementedError("ranges of 2^32 or more take numpy's 64-bit path")  # never for images
        mask = (1 << rng.bit_length()) - 1
        while True:
            if self._next == len(self._words):
                if self._pending < 1:
                    raise RuntimeError("RawWords: more word-consuming draws than announced")
                self._words = np.random.randint(0, WORD, size=self._pending, dtype=np.uint32).tolist()
                self._next = 0
            v = self._words[self._next] & mask
            self._next += 1
            if v <= rng:
                self._pending -= 1
                return low + v
