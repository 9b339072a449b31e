"""Capacity planning: the same workload on the cluster as it is and as it could be.

A change is written like a command-line option value::

    pool=gpu-a100,count=16                  # 16 more nodes (instances) in gpu-a100
    pool=gpu-h100,count=16,like=gpu-a100,gpu_model=h100   # a new pool shaped like gpu-a100
    pool=gpu-v100                            # (with --remove) the whole pool goes
    pool=gpu-v100,count=4                    # (with --remove) 4 nodes fewer

Baseline and variant run with the same seeds, so every difference comes from the change.
"""

from __future__ import annotations

from typing import Any

import msgspec

from stowplan.errors import SpecError
from stowplan.simulator.cluster import ClusterSpec, PoolKind, PoolSpec

KEYS_ADD = {"pool", "count", "like", "gpu_model", "price_per_hour"}
KEYS_REMOVE = {"pool", "count"}


class Change(msgspec.Struct, frozen=True, kw_only=True):
    op: str
    pool: str
    count: int | None = None
    like: str | None = None
    gpu_model: str | None = None
    price_per_hour: float | None = None

    def describe(self) -> str:
        what = f"{self.op} {self.count if self.count is not None else 'all'} x {self.pool}"
        if self.like:
            what += f" (like {self.like})"
        return what


def parse_change(text: str, op: str) -> Change:
    flag = f"--{op}"
    allowed = KEYS_ADD if op == "add" else KEYS_REMOVE
    fields: dict[str, str] = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not k or not v:
            raise SpecError(
                f"{text!r}: {part!r} is not key=value",
                path=flag,
                hint="write e.g. pool=gpu-h100,count=16",
            )
        if k not in allowed:
            raise SpecError(
                f"{text!r}: unknown key {k!r}",
                path=flag,
                hint=f"keys for {flag}: {', '.join(sorted(allowed))}",
            )
        fields[k] = v
    if "pool" not in fields:
        raise SpecError(f"{text!r}: no pool=", path=flag, hint="name the pool: pool=NAME")
    count = None
    if "count" in fields:
        try:
            count = int(fields["count"])
        except ValueError:
            count = 0
        if count <= 0:
            raise SpecError(
                f"{text!r}: count must be a positive whole number", path=flag, hint="e.g. count=16"
            )
    elif op == "add":
        raise SpecError(f"{text!r}: how many? add count=N", path=flag, hint="e.g. count=16")
    price = None
    if "price_per_hour" in fields:
        try:
            price = float(fields["price_per_hour"])
        except ValueError:
            raise SpecError(
                f"{text!r}: price_per_hour is not a number",
                path=flag,
                hint="e.g. price_per_hour=32.5",
            ) from None
    return Change(
        op=op,
        pool=fields["pool"],
        count=count,
        like=fields.get("like"),
        gpu_model=fields.get("gpu_model"),
        price_per_hour=price,
    )


def _resize(p: PoolSpec, delta: int) -> PoolSpec:
    if p.kind is PoolKind.CLOUD:
        return msgspec.structs.replace(p, max_instances=p.max_instances + delta)
    return msgspec.structs.replace(p, nodes=p.nodes + delta)


def apply(spec: ClusterSpec, changes: list[Change]) -> ClusterSpec:
    """The cluster with ``changes`` applied in order; errors name the flag and the fix."""
    pools = list(spec.pools)
    for ch in changes:
        flag = f"--{ch.op}"
        names = [p.name for p in pools]
        if ch.op == "remove":
            if ch.pool not in names:
                raise SpecError(
                    f"no pool {ch.pool!r} to remove", path=flag, hint=f"pools: {', '.join(names)}"
                )
            i = names.index(ch.pool)
            if ch.count is None or ch.count >= pools[i].units:
                del pools[i]
            else:
                pools[i] = _resize(pools[i], -ch.count)
            continue
        assert ch.count is not None
        if ch.pool in names:
            if ch.like or ch.gpu_model:
                raise SpecError(
                    f"pool {ch.pool!r} exists: like=/gpu_model= only shape a new one",
                    path=flag,
                    hint=f"use pool={ch.pool},count=N to grow it",
                )
            i = names.index(ch.pool)
            pools[i] = _resize(pools[i], ch.count)
            if ch.price_per_hour is not None:
                pools[i] = msgspec.structs.replace(pools[i], price_per_hour=ch.price_per_hour)
            continue
        if not ch.like:
            raise SpecError(
                f"there is no pool {ch.pool!r}",
                path=flag,
                hint=f"grow one of {', '.join(names)}, or add like=POOL to make a "
                "new pool shaped like an existing one",
            )
        if ch.like not in names:
            raise SpecError(
                f"like={ch.like!r} is not a pool", path=flag, hint=f"pools: {', '.join(names)}"
            )
        base = pools[names.index(ch.like)]
        if base.kind is PoolKind.CLOUD:
            new = msgspec.structs.replace(base, name=ch.pool, max_instances=ch.count)
        else:
            new = msgspec.structs.replace(base, name=ch.pool, nodes=ch.count)
        if ch.gpu_model:
            new = msgspec.structs.replace(new, gpu_model=ch.gpu_model)
        if ch.price_per_hour is not None:
            new = msgspec.structs.replace(new, price_per_hour=ch.price_per_hour)
        pools.append(new)
    if not pools:
        raise SpecError(
            "the change removes every pool", path="--remove", hint="keep at least one pool"
        )
    return msgspec.structs.replace(spec, pools=pools)


def compare(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """Differences of the headline numbers: variant minus baseline, and the ratio."""
    out: dict[str, Any] = {}

    def pair(name: str, a: float | None, b: float | None) -> None:
        out[name] = {
            "baseline": a,
            "variant": b,
            "change": None if a is None or b is None else round(b - a, 6),
            "ratio": None if not a or b is None else round(b / a, 6),
        }

    bs, vs = base["summary"], variant["summary"]
    for p in ("p50", "p95", "p99"):
        pair(f"wait_{p}_s", bs["wait_s"][p], vs["wait_s"][p])
    pair("wait_mean_s", bs["wait_s"]["mean"], vs["wait_s"]["mean"])
    pair("completion_mean_s", bs["completion_s"]["mean"], vs["completion_s"]["mean"])
    pair("utilization", bs["utilization"], vs["utilization"])
    pair("cost", bs["cost"], vs["cost"])
    pair("horizon_s", bs["horizon_s"], vs["horizon_s"])
    return out
