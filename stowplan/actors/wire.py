"""Batches between actors travel as msgpack bytes: one buffer instead of 10^5 pickled objects.

Ray pickles arguments; for large lists of small Structs, encoding them once with msgspec is
far cheaper, and the receiving side decodes with a typed decoder made once per type.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import msgspec

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def pack(obj: object) -> bytes:
    return _encoder.encode(obj)


def unpack(data: bytes, type_: Any) -> Any:
    """Decode ``data`` as ``type_`` (a Struct, or a generic such as ``list[Report]``)."""
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    return dec.decode(data)


_tuned = False

GEN0_THRESHOLD = 100_000
"""allocations between collections of the youngest generation in an actor (Python's: 700)."""


def tune_gc() -> None:
    """Set up the collector of an actor process that holds 10^5 runs (the queue, the store).

    Such a process allocates a few objects per step and keeps many of them for long, so with
    Python's defaults most of its collections walk objects that are never garbage: what was
    loaded at boot (Ray, the modules) and the runs themselves. What exists now is collected
    once and then frozen (``gc.freeze``: never walked again), and the youngest generation is
    collected every ``GEN0_THRESHOLD`` allocations; the older ones as often, relative to it,
    as by default. Garbage without cycles is freed at once as always; only cycles wait longer.
    Called from the actor's constructor: it acts only in a Ray actor's process (which is that
    actor's alone), never where the class is made in place (a test, a tool), and only once."""
    global _tuned
    if _tuned or not in_actor():
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def in_actor() -> bool:
    """Whether this process is a Ray actor's (Ray already loaded and started: no start here)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None
