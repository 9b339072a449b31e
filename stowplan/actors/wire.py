"""Batches between actors travel as msgpack bytes: one buffer instead of 10^5 pickled objects.

Ray pickles arguments; for large lists of small Structs, encoding them once with msgspec is
far cheaper, and the receiving side decodes with a typed decoder made once per type.
"""

from __future__ import annotations

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
