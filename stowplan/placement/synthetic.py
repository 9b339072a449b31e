"""Seeded synthetic placement problems shaped like a multi-site research fleet.

Used by the benchmarks, the property tests and the simulator's capacity-planning examples. The
fleet mixes Slurm partitions (free, with queue waits), Kubernetes node pools (cheap, short
waits) and cloud instance types (elastic, on-demand and spot, with boot latency) across sites in
three regions, with GPU models from T4 to H100, datasets replicated at one or two sites, a
network priced per GB, and an ``eu-only`` residency rule on some datasets.
"""

from __future__ import annotations

import numpy as np

from stowplan.placement.problem import (
    Dataset,
    DemandClass,
    Link,
    PlacementProblem,
    Pool,
    Shape,
)

GiB = 1 << 30
SITES = (
    ("us-east-1", "us"),
    ("us-east-2", "us"),
    ("us-west-2", "us"),
    ("eu-west-1", "eu"),
    ("eu-central-1", "eu"),
    ("eu-north-1", "eu"),
    ("ap-south-1", "ap"),
    ("ap-northeast-1", "ap"),
)
GPUS = (("T4", 0.5), ("L4", 0.8), ("V100-32GB", 2.5), ("A100-80GB", 4.0), ("H100-80GB", 8.0))


def fleet(n_pools: int, rng: np.random.Generator, *, tight: float = 1.0) -> list[Pool]:
    pools = []
    for i in range(n_pools):
        site, region = SITES[int(rng.integers(len(SITES)))]
        kind = ("slurm", "kubernetes", "cloud")[int(rng.integers(3))]
        gi = int(rng.integers(-1, len(GPUS)))  # -1: CPU only
        per_node_gpus = int(rng.choice([4, 8])) if gi >= 0 else 0
        node_cpus = float(rng.choice([32, 64, 96, 128]))
        node = Shape(
            cpus=node_cpus,
            memory=int(node_cpus * int(rng.choice([4, 8]))) * GiB,
            gpus={GPUS[gi][0]: per_node_gpus} if gi >= 0 else {},
        )
        gpu_price = GPUS[gi][1] * per_node_gpus if gi >= 0 else 0.0
        hw = (f"gpu={GPUS[gi][0]};" if gi >= 0 else "") + "cpu=x86_64"
        if kind == "cloud":
            spot = bool(rng.random() < 0.4)
            price = (node_cpus * 0.04 + gpu_price) * (0.35 if spot else 1.0)
            warm = int(rng.integers(0, 3))
            pools.append(
                Pool(
                    id=f"aws-{site}-{i:04d}{'-spot' if spot else ''}",
                    provider="aws",
                    kind="cloud",
                    site=site,
                    region=region,
                    cpus=warm * node.cpus,
                    memory=warm * node.memory,
                    gpus={m: warm * k for m, k in node.gpus.items()},
                    node=node,
                    price_per_hour=round(price, 4),
                    spot=spot,
                    interruption_rate=0.05 if spot else 0.0,
                    max_instances=max(1, int(rng.integers(1, 40) * tight)),
                    boot_s=float(rng.integers(60, 300)),
                    hardware_class=hw,
                )
            )
            continue
        nodes = max(1, int(rng.integers(2, 32) * tight))
        busy = float(rng.random()) * 0.8
        free = 1.0 - busy
        pools.append(
            Pool(
                id=f"{kind}-{site}-{i:04d}",
                provider="campus" if kind == "slurm" else "k8s",
                kind=kind,
                site=site,
                region=region,
                cpus=float(int(nodes * node.cpus * free)),
                memory=int(nodes * node.memory * free),
                gpus={m: int(nodes * k * free) for m, k in node.gpus.items()},
                node=node,
                price_per_hour=0.0 if kind == "slurm" else round(gpu_price * 0.3 + 0.2, 4),
                expected_wait_s=float(rng.exponential(1800 if kind == "slurm" else 120)),
                hardware_class=hw,
            )
        )
    return pools


def problem(
    n_tasks: int, n_pools: int, n_classes: int, *, seed: int = 0, tight: float = 1.0
) -> PlacementProblem:
    rng = np.random.default_rng(seed)
    pools = fleet(n_pools, rng, tight=tight)
    sites = [s for s, _ in SITES]
    datasets = []
    for d in range(30):
        at = sorted({sites[int(rng.integers(len(sites)))] for _ in range(int(rng.integers(1, 3)))})
        eu = all(s.startswith("eu") for s in at) and rng.random() < 0.5
        datasets.append(
            Dataset(
                id=f"ds{d:02d}",
                size=int(rng.lognormal(np.log(50e9), 1.5)),
                sites=tuple(at),
                residency="eu-only" if eu else None,
            )
        )
    links = []
    for a, ra in SITES:
        for b, rb in SITES:
            if a != b:
                same = ra == rb
                links.append(
                    Link(
                        src=a,
                        dst=b,
                        bandwidth=(2e9 if same else 0.4e9) * float(rng.uniform(0.5, 1.5)),
                        egress_per_gb=0.01 if same else 0.08,
                    )
                )
    sizes = rng.multinomial(n_tasks, np.ones(n_classes) / n_classes)
    classes = []
    for c in range(n_classes):
        gpus = int(rng.choice([0, 0, 1, 1, 2, 4, 8]))
        types: tuple[str, ...] = ()
        if gpus and rng.random() < 0.7:
            k = int(rng.integers(1, 3))
            types = tuple(sorted({GPUS[int(rng.integers(len(GPUS)))][0] for _ in range(k)}))
        cpus = float(rng.choice([1, 2, 4, 8, 16]))
        ds = tuple(
            sorted({f"ds{int(rng.integers(30)):02d}" for _ in range(int(rng.integers(0, 3)))})
        )
        members = [f"t{c:03d}-{i:06d}" for i in range(int(sizes[c]))]
        classes.append(
            DemandClass(
                id=f"c{c:03d}",
                cpus=cpus,
                memory=int(cpus * float(rng.choice([2, 4, 8]))) * GiB,
                gpus=gpus,
                gpu_types=types,
                datasets=ds,
                runtime_s=float(rng.lognormal(np.log(3600), 1.0)),
                priority=int(rng.choice([0, 0, 0, 1, 2])),
                members=members,
            )
        )
    return PlacementProblem(
        request_id=seed,
        pools=pools,
        classes=classes,
        links=links,
        datasets=datasets,
        residency={"eu-only": ("eu",)},
    )
