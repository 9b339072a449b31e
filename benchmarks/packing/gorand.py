"""Go's math/rand (the pre-1.20 seeded global source), bit for bit.

The FGD simulator (hkust-adsl/kubernetes-scheduler-simulator) draws everything from Go's global
math/rand after `rand.Seed(tuneSeed)` (pkg/simulator/core.go): one `rand.Int()` inside a
`log.Debugf` argument (Go evaluates arguments even when the level is off), `rand.Shuffle` of the
pods (SortClusterPods), `rand.Intn` per clone (tuneUpPods, pkg/simulator/simulator.go),
`rand.Perm` of the nodes (syncClusterResourceList) and then one `rand.Intn` per tie in
kube-scheduler's selectHost. This module reproduces that generator: the additive lagged
Fibonacci source of Go's src/math/rand/rng.go (seeding table `_rng_cooked.txt`, transcribed from
that file; Go is BSD-licensed) and the Rand methods of src/math/rand/rand.go that the simulator
calls (Int, Int31n, Intn, Perm, Shuffle with Lemire's int31n).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_LEN = 607
_TAP = 273
_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_INT32MAX = (1 << 31) - 1


def _load_cooked() -> list[int]:
    text = (Path(__file__).parent / "_rng_cooked.txt").read_text()
    values = [int(x) & _MASK64 for x in text.replace("\n", " ").split(",") if x.strip()]
    if len(values) != _LEN:
        raise RuntimeError(f"_rng_cooked.txt holds {len(values)} values, not {_LEN}")
    return values


_COOKED = _load_cooked()


def _seedrand(x: int) -> int:
    # x[n+1] = 48271 * x[n] mod (2**31 - 1), Schrage's method as in rng.go (int32 arithmetic)
    hi, lo = int(x / 44488), x - int(x / 44488) * 44488  # Go's truncating / and %
    x = 48271 * lo - 3399 * hi
    if x < 0:
        x += _INT32MAX
    return x


class GoRand:
    """`rand.New(rand.NewSource(seed))`, or the global source after `rand.Seed(seed)`."""

    def __init__(self, seed: int) -> None:
        self._tap = 0
        self._feed = _LEN - _TAP
        seed %= _INT32MAX  # Go's % truncates; seeds here are non-negative
        if seed == 0:
            seed = 89482311
        x = seed
        vec = [0] * _LEN
        for i in range(-20, _LEN):
            x = _seedrand(x)
            if i >= 0:
                u = (x << 40) & _MASK64
                x = _seedrand(x)
                u ^= (x << 20) & _MASK64
                x = _seedrand(x)
                u ^= x
                u ^= _COOKED[i]
                vec[i] = u
        self._vec = vec

    def uint64(self) -> int:
        self._tap -= 1
        if self._tap < 0:
            self._tap += _LEN
        self._feed -= 1
        if self._feed < 0:
            self._feed += _LEN
        x = (self._vec[self._feed] + self._vec[self._tap]) & _MASK64
        self._vec[self._feed] = x
        return x

    def int63(self) -> int:
        return self.uint64() & _MASK63

    def go_int(self) -> int:
        return self.int63()  # uint(Int63()) << 1 >> 1 on 64-bit: the same value

    def int31(self) -> int:
        return self.int63() >> 32

    def uint32(self) -> int:
        return (self.int63() >> 31) & 0xFFFFFFFF

    def int31n(self, n: int) -> int:
        """Rand.Int31n (rejection sampling, used by Intn)."""
        if n <= 0:
            raise ValueError("invalid argument to Int31n")
        if n & (n - 1) == 0:
            return self.int31() & (n - 1)
        max_ = _INT32MAX - ((1 << 31) % n)
        v = self.int31()
        while v > max_:
            v = self.int31()
        return v % n

    def intn(self, n: int) -> int:
        if n <= 0:
            raise ValueError("invalid argument to Intn")
        if n > _INT32MAX:
            raise NotImplementedError("Int63n path not needed here")
        return self.int31n(n)

    def _int31n_lemire(self, n: int) -> int:
        """The unexported Rand.int31n that Shuffle uses (Lemire's multiply-shift)."""
        v = self.uint32()
        prod = v * n
        low = prod & 0xFFFFFFFF
        if low < n:
            thresh = ((1 << 32) - n) % n
            while low < thresh:
                v = self.uint32()
                prod = v * n
                low = prod & 0xFFFFFFFF
        return prod >> 32

    def shuffle(self, n: int, swap: Callable[[int, int], None]) -> None:
        i = n - 1
        while i > 0:
            j = self._int31n_lemire(i + 1)
            swap(i, j)
            i -= 1

    def perm(self, n: int) -> list[int]:
        m = [0] * n
        for i in range(n):
            j = self.intn(i + 1)
            m[i] = m[j]
            m[j] = i
        return m
