"""Fuzzing the way in: every input either loads or raises SpecError, never another exception.

Three generators, each bounded (a few hundred examples, derandomized, no example database):
hostile values put at every place of a rich experiment and project (YAML, so NaN, infinities,
huge integers, control characters and odd types can all be written), and byte-level mutations
of valid TOML and YAML text. Whatever loads is planned (sweeps expanded, run identities made),
turned into a placement problem that is validated and placed greedily, the way ``stowplan
run`` and ``stowplan plan`` do before any I/O: that path must not raise either, except a
SpecError for what only the whole project can tell (an unknown site, say).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stowplan.errors import SpecError
from stowplan.placement.context import context_for
from stowplan.placement.greedy import place_greedy
from stowplan.placement.problem import PlacementProblem, Pool, TaskDemand, group, validate
from stowplan.placement.table import build
from stowplan.scheduler.plan import Versions, plan_runs
from stowplan.spec.loader import (
    LoadedProject,
    load_experiment,
    load_project,
    sweep_size,
)

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

EXPERIMENT: dict[str, Any] = {
    "experiment": {"name": "fuzz", "description": "d", "seed": 3},
    "tasks": [
        {
            "name": "prep",
            "script": "echo {seed} > out.txt",
            "outputs": ["out.txt", "plots/"],
            "resources": {"cpus": 0.5, "memory": "256MiB", "walltime": "1:00:00"},
            "inputs": [{"uri": "data.csv", "version": "v1", "size": "1GB", "sites": ["local"]}],
            "env": {"MODE": "fast"},
            "timeout": "10m",
            "priority": 2,
            "placement": {"require_sites": ["local"], "runtime": 60},
        },
        {
            "name": "train",
            "command": ["python", "train.py", "--lr", "{lr}", "--k", "{k}", "--s", "{seed}"],
            "depends_on": ["prep"],
            "resources": {"cpus": 2, "memory": 1073741824, "gpus": 0},
            "retry": {"max_attempts": 2, "on": ["lost", "preempted"], "backoff": 1.5},
            "sweep": {
                "method": "random",
                "samples": 4,
                "seed": 11,
                "max_concurrent": 2,
                "parameters": {
                    "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
                    "k": {"type": "int", "low": 1, "high": 5},
                    "opt": ["sgd", "adam"],
                    "w": {"type": "uniform", "low": -1.0, "high": 1.0},
                    "c": {"type": "choice", "values": [1, 2.5, True, "x"]},
                },
            },
        },
        {
            "name": "grid",
            "command": ["echo", "{a}", "{b}"],
            "depends_on": ["train", "prep"],
            "sweep": {"parameters": {"a": [1, 2], "b": {"type": "int", "low": 0, "high": 2}}},
        },
    ],
    "policy": {
        "retry": {"max_attempts": 3, "jitter": 0.1},
        "placement": {"data": 1.0, "cost": 2.0},
        "max_sweep_size": 1000,
        "priority": 1,
        "naming": {"prefix": "sp", "tags": {"team": "ml"}},
    },
}

PROJECT: dict[str, Any] = {
    "project": {"name": "fuzz"},
    "policy": {"retry": {"max_attempts": 2}},
    "providers": {
        "local": {"kind": "local", "cpus": 8, "memory": "16GiB", "gpus": 0, "site": "local"},
        "campus": {
            "kind": "slurm",
            "host": "login.example.org",
            "port": 22,
            "partitions": ["gpu"],
            "max_concurrent": 10,
            "queue_factor": 1.5,
            "remote_env": {"A": "1"},
        },
        "instant": {"kind": "instant"},
    },
    "store": {"path": ".stowplan/stowplan.db"},
    "placement": {
        "links": [{"src": "local", "dst": "cloud", "bandwidth": "1GB", "egress_per_gb": 0.09}],
        "residency": {"eu": ["local"]},
        "budget": 0.1,
        "workers": 1,
    },
}

HOSTILE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.0, -0.0]),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]),
    st.text(max_size=6),
    st.sampled_from(
        [
            "",
            " ",
            "\n",
            "x\n",
            "\x00",
            "a\x00b",
            "/etc/passwd",
            "../x",
            "a//b",
            "d/",
            "{",
            "}",
            "{seed:>9}",
            "{x}",
            "{seed!r}",
            "1e400GiB",
            "9" * 40 + "d",
            "-1GiB",
            "nan",
            "inf",
            "1:99",
            "local",
            "slurm",
            "cancelled",
            "\ufeff",
            "\u202e",
            "ü",
            "a" * 300,
        ]
    ),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 3) | st.text(max_size=3) | st.floats(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 2) | st.text(max_size=2), max_size=3),
)

FIELD_NAMES = sorted(
    {"name", "command", "script", "env", "resources", "inputs", "outputs", "depends_on",
     "retry", "timeout", "sweep", "priority", "placement", "cpus", "memory", "gpus", "gpu_type",
     "walltime", "uri", "version", "size", "sites", "residency", "method", "samples", "seed",
     "max_concurrent", "parameters", "type", "low", "high", "values", "kind", "host", "port",
     "budget", "links", "bandwidth", "trials", "on", "max_attempts", "backoff", "jitter",
     "<<", "\n", ""}
)  # fmt: skip


def _places(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``doc``: mappings' keys and lists' indexes, containers included."""
    out = [prefix]
    stack = [(doc, prefix)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, dict):
            items: list[tuple[Any, Any]] = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        else:
            continue
        for k, v in items:
            out.append((*at, k))
            stack.append((v, (*at, k)))
    return sorted(out, key=repr)


def _replace(doc: Any, path: tuple[Any, ...], value: Any, *, add_key: str | None) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        out: Any = dict(doc)
    else:
        out = list(doc)
    out[head] = _replace(doc[head], rest, value, add_key=add_key)
    if add_key is not None and not rest and isinstance(out, dict):
        out[add_key] = value
    return out


NUMBERS = st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e308, -1e308, -1, 0, -1.5, 2**31, 2**63, 10**30, -(2**70)]
)


@st.composite
def hostile_docs(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """``base`` with one to three places replaced: mostly leaves, and a number mostly by a
    number that is not finite, negative or too large to represent."""
    doc: Any = base
    for _ in range(draw(st.integers(1, 3))):
        places = _places(doc)
        leaves = [p for p in places if not isinstance(_get(doc, p), dict | list)]
        use_leaf = bool(leaves) and draw(st.integers(0, 4)) > 0
        path = draw(st.sampled_from(leaves if use_leaf else places))
        old = _get(doc, path)
        number = isinstance(old, int | float) and not isinstance(old, bool)
        value = draw(NUMBERS if number and draw(st.integers(0, 4)) else HOSTILE)
        add = draw(st.none() | st.none() | st.sampled_from(FIELD_NAMES))
        doc = _replace(doc, path, value, add_key=add)
    return doc


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _check_accepted(value: Any, where: str = "$") -> None:
    """What the loader accepted holds only finite numbers within 64 bits, and text without NUL
    (names and paths also without other control characters: their own tests check those)."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, float):
            assert math.isfinite(v), f"{at} = {v} was accepted"
        elif isinstance(v, int):
            assert -(2**63) <= v < 2**63, f"{at} = {v} was accepted"
        elif isinstance(v, str):
            assert "\x00" not in v, f"{at} = {v!r} was accepted"
        elif isinstance(v, dict):
            for k, x in v.items():
                assert "\x00" not in str(k) and "\n" not in str(k), f"key {k!r} at {at}"
                stack.append((x, f"{at}.{k}"))
        elif isinstance(v, list | tuple):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


DEFAULT_PROJECT = LoadedProject(
    config=load_project(None, search_from=Path("/")).config,
    file=None,
    root="/nonexistent",
    raw_policy={},
)


def _plan_and_place(path: Path, project: LoadedProject) -> None:
    """What happens to an accepted experiment before any I/O: plan, build, validate, place."""
    try:
        loaded = load_experiment(path, project)
    except SpecError:
        return
    _check_accepted(msgspec.to_builtins(loaded.spec))
    _check_accepted(msgspec.to_builtins(loaded.policy), "$.policy")
    for task in loaded.spec.tasks:
        assert "\n" not in task.name and all("\n" not in o for o in task.outputs)
    sizes = [sweep_size(t.sweep) if t.sweep else 1 for t in loaded.spec.tasks]
    if sum(sizes) > 2000:  # accepted, but too slow to plan a few hundred times here
        return
    versions = Versions(code_version="git:0", env_hash="e", data_versions={})
    planned = plan_runs(loaded, versions, project="fuzz")
    assert len(planned) == sum(sizes)
    _check_accepted([r.params for r in planned], "params")
    try:
        ctx = context_for(project, loaded)
    except SpecError:
        return
    demands = [
        TaskDemand(
            id=r.run_id,
            cpus=r.instance.cpus,
            memory=r.instance.memory,
            gpus=r.instance.gpus,
            gpu_types=r.instance.gpu_types,
            datasets=r.instance.datasets,
            runtime_s=r.instance.runtime_s,
            priority=r.instance.priority,
            require_sites=r.instance.require_sites,
            forbid_sites=r.instance.forbid_sites,
            forbid_pools=r.instance.forbid_pools,
            residency=r.instance.residency,
        )
        for r in planned
    ]
    problem = PlacementProblem(
        pools=[
            Pool(id="local", provider="local", site="local", cpus=8, memory=16 << 30),
            Pool(
                id="big",
                provider="campus",
                kind="slurm",
                site="campus",
                cpus=1e6,
                memory=1 << 50,
                gpus={"a100": 64},
                price_per_hour=3.0,
            ),
        ],
        classes=group(demands),
        links=ctx.links,
        datasets=ctx.datasets,
        residency=ctx.residency,
        weights=ctx.weights,
    )
    try:
        validate(problem, source=str(path))
    except SpecError:
        return
    place_greedy(build(problem))


def _only_spec_errors_experiment(tmp_path: Path, name: str, text: str | bytes) -> None:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _plan_and_place(path, DEFAULT_PROJECT)


def test_the_base_documents_load_and_place(tmp_path: Path) -> None:
    """The fuzzers start from valid documents: they must load, or nothing is tested."""
    path = tmp_path / "base.yaml"
    path.write_text(_dump(EXPERIMENT))
    loaded = load_experiment(path, DEFAULT_PROJECT)
    assert len(loaded.spec.tasks) == 3
    _plan_and_place(path, DEFAULT_PROJECT)
    proj = tmp_path / "p" / "stowplan.toml"
    proj.parent.mkdir()
    proj.with_suffix(".yaml").write_text(_dump(PROJECT))
    assert set(load_project(proj.with_suffix(".yaml")).config.providers) == {
        "local",
        "campus",
        "instant",
    }


@FUZZ
@given(doc=hostile_docs(EXPERIMENT))
def test_hostile_values_in_experiments(tmp_path: Path, doc: Any) -> None:
    _only_spec_errors_experiment(tmp_path, "exp.yaml", _dump(doc))


@FUZZ
@given(doc=hostile_docs(PROJECT))
def test_hostile_values_in_projects(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "stowplan.yaml"
    path.write_text(_dump(doc), encoding="utf-8", errors="surrogatepass")
    try:
        project = load_project(path)
    except SpecError:
        return
    _check_accepted(msgspec.to_builtins(project.config), "$")
    exp = tmp_path / "exp.yaml"
    exp.write_text(_dump(EXPERIMENT))
    _plan_and_place(exp, project)


TOML_BASE = """\
[experiment]
name = "fuzz"
seed = 1

[[tasks]]
name = "train"
command = ["python", "train.py", "--lr", "{lr}", "--seed", "{seed}"]
outputs = ["metrics.json", "plots/"]
resources = { cpus = 1.5, memory = "1GiB", gpus = 0 }
timeout = "1h"
env = { A = "1" }
inputs = [{ uri = "data.csv", version = "v1", size = 1000 }]
sweep = { method = "random", samples = 3, seed = 7, parameters = { lr = { type = "uniform", low = 0.0, high = 1.0 }, k = [1, 2] } }

[[tasks]]
name = "select"
script = "cat {experiment_dir}/x"
depends_on = ["train"]
retry = { max_attempts = 2, on = ["lost"] }

[policy]
priority = 1
"""  # noqa: E501

YAML_BASE = _dump(EXPERIMENT)

TOKENS = [
    "nan", "inf", "-inf", "+inf", "1e308", "-1", "0", "99999999999999999999", "9223372036854775808",
    "[", "]", "{", "}", '"', "'", '"""', "\n", "\\n", "\\u0000", "\x00", "=", ",", ".", "#", ":",
    "- ", "  ", "&a ", "*a", "<<: ", "!!python/object:os.system ", "!!binary ", "---\n", "...",
    "\ufeff", "\t", "name", "tasks", "[[tasks]]\n", "depends_on = [\"train\"]\n", "{seed:>9}",
    "1:99:99", "9999999TiB", "true", "null", "~", "?", "|", ">", "%YAML 1.1\n",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, base: str) -> bytes:
    data = bytearray(base.encode())
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        at = draw(st.integers(0, n))
        op = draw(st.sampled_from(["insert", "delete", "duplicate", "replace", "byte"]))
        if op == "insert":
            data[at:at] = draw(st.sampled_from(TOKENS)).encode("utf-8", "surrogatepass")
        elif op == "delete":
            data[at : at + draw(st.integers(1, 20))] = b""
        elif op == "duplicate":
            end = min(n, at + draw(st.integers(1, 200)))
            data[at:at] = data[at:end] * draw(st.integers(1, 3))
        elif op == "replace":
            end = min(n, at + draw(st.integers(1, 8)))
            data[at:end] = draw(st.sampled_from(TOKENS)).encode()
        elif n:
            data[min(at, n - 1)] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(text=mutated(TOML_BASE))
def test_mutated_toml(tmp_path: Path, text: bytes) -> None:
    _only_spec_errors_experiment(tmp_path, "exp.toml", text)


@FUZZ
@given(text=mutated(YAML_BASE))
def test_mutated_yaml(tmp_path: Path, text: bytes) -> None:
    _only_spec_errors_experiment(tmp_path, "exp.yaml", text)


@pytest.mark.parametrize("name", ["exp.toml", "exp.yaml"])
def test_the_mutation_bases_are_valid(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(TOML_BASE if name.endswith(".toml") else YAML_BASE)
    assert load_experiment(path, DEFAULT_PROJECT).spec.tasks
