"""Hostile and careless input at load time: every case is one SpecError with a path and a fix.

The same kind of input gets the same treatment wherever the schema takes it: non-finite and
unrepresentable numbers, control characters in names and paths, deep nesting, YAML aliases
and duplicate keys, files that are not regular files, and data inputs that cannot be read.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.errors import SpecError
from stowplan.placement.problem import DemandClass, PlacementProblem, Pool, validate
from stowplan.provenance.data import capture_data, capture_inputs
from stowplan.spec.loader import (
    MAX_DEPTH,
    _cycle_text,
    _find_cycle,
    load_experiment,
    load_project,
    placeholders,
    task_order,
)
from stowplan.spec.models import PlacementSettings, Task, output_path_problem
from stowplan.spec.units import MAX_BYTES, MAX_DURATION_S, parse_duration, parse_size

HEAD = '[experiment]\nname = "x"\n\n[[tasks]]\nname = "a"\n'


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, **kwargs: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_experiment(path, **kwargs)
    err = info.value
    text = err.render()
    assert str(path) in text and "\n  fix: " in text, text
    assert text.count("\n") == 1, text  # one paragraph: the error, then its fix
    return err


def project_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_project(path)
    assert str(path) in info.value.render()
    return info.value


# ---- numbers: finite and representable, everywhere -------------------------------------------


@pytest.mark.parametrize(
    ("body", "path", "words"),
    [
        ('command = ["e"]\nresources = { cpus = nan }', "$.tasks[0].resources.cpus", "finite"),
        ('command = ["e"]\nresources = { cpus = inf }', "$.tasks[0].resources.cpus", "finite"),
        ('command = ["e"]\nresources = { cpus = 1e308 }', "$.tasks[0].resources.cpus", "1,048,576"),
        ('command = ["e"]\nresources = { gpus = 70000 }', "$.tasks[0].resources.gpus", "65,536"),
        (
            'command = ["e"]\nresources = { memory = "9999999TiB" }',
            "$.tasks[0].resources.memory",
            "EiB",
        ),
        ('command = ["e"]\nresources = { memory = inf }', "$.tasks[0].resources.memory", "finite"),
        ('command = ["e"]\nresources = { walltime = nan }', "$.tasks[0].resources.walltime", "fin"),
        ('command = ["e"]\ntimeout = "99999999d"', "$.tasks[0].timeout", "10 years"),
        ('command = ["e"]\ntimeout = -inf', "$.tasks[0].timeout", "finite"),
        ('command = ["e"]\npriority = 9000000000000000000', "$.tasks[0].priority", "2,147,483,647"),
        ('command = ["e"]\nretry = { backoff = inf }', "$.tasks[0].retry.backoff", "finite"),
        ('command = ["e"]\nretry = { jitter = nan }', "$.tasks[0].retry.jitter", "finite"),
        (
            'command = ["e"]\nretry = { max_attempts = 100000 }',
            "$.tasks[0].retry.max_attempts",
            "1,000",
        ),
        (
            'command = ["e"]\nplacement = { runtime = inf }',
            "$.tasks[0].placement.runtime",
            "finite",
        ),
        (
            'command = ["e"]\ninputs = [{ uri = "d", size = 1e300 }]',
            "$.tasks[0].inputs[0].size",
            "",
        ),
        (
            'command = ["{a}"]\nsweep = { parameters = { a = [1.0, nan] } }',
            "$.tasks[0].sweep.parameters.a[1]",
            "finite",
        ),
        (
            'command = ["{a}"]\nsweep = { parameters = '
            '{ a = { type = "choice", values = [inf] } } }',
            "$.tasks[0].sweep.parameters.a.values[0]",
            "finite",
        ),
        (
            'command = ["{a}"]\nsweep = { method = "random", samples = 2, parameters = '
            '{ a = { type = "uniform", low = -inf, high = inf } } }',
            "$.tasks[0].sweep.parameters.a.low",
            "finite",
        ),
        (
            'command = ["{a}"]\nsweep = { method = "random", samples = 2, parameters = '
            '{ a = { type = "loguniform", low = 1.0, high = inf } } }',
            "$.tasks[0].sweep.parameters.a.high",
            "finite",
        ),
        (
            'command = ["{a}"]\nsweep = { method = "random", samples = 2, parameters = '
            '{ a = { type = "uniform", low = -1e308, high = 1e308 } } }',
            "$.tasks[0].sweep.parameters.a",
            "wider than a float",
        ),
        (
            'command = ["{a}"]\nsweep = { method = "random", samples = 2, seed = -1, '
            "parameters = { a = [1, 2] } }",
            "$.tasks[0].sweep.seed",
            "at least 0",
        ),
        (
            'command = ["{a}"]\nsweep = { method = "random", samples = 99999999999, '
            "parameters = { a = [1, 2] } }",
            "$.tasks[0].sweep.samples",
            "10,000,000",
        ),
        (
            'command = ["{a}"]\nsweep = { parameters = { a = [1] }, max_concurrent = 2147483648 }',
            "$.tasks[0].sweep.max_concurrent",
            "2,147,483,647",
        ),
    ],
)
def test_numbers_are_finite_and_bounded(tmp_path: Path, body: str, path: str, words: str) -> None:
    err = load_error(write(tmp_path, "e.toml", HEAD + body + "\n"))
    assert err.path == path
    assert words in err.message
    assert err.line is not None


def test_the_policy_and_experiment_seed_are_bounded_too(tmp_path: Path) -> None:
    text = "experiment: {name: x, seed: 100000000000000000000}\ntasks: [{name: a, command: [e]}]\n"
    err = load_error(write(tmp_path, "e.yaml", text))
    assert err.path == "$.experiment.seed" and "9,223,372,036,854,775,807" in err.message
    err = load_error(
        write(tmp_path, "p.toml", HEAD + 'command = ["e"]\n[policy]\nmax_sweep_size = 1e400\n')
    )
    assert err.path == "$.policy.max_sweep_size"


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ('[providers.local]\nkind = "local"\ncpus = inf\n', "$.providers.local.cpus", "finite"),
        ('[providers.l]\nkind = "local"\ncpus = 1e308\n', "$.providers.l.cpus", "1,048,576"),
        ('[providers.l]\nkind = "local"\ngpus = 99999999999\n', "$.providers.l.gpus", "65,536"),
        ('[providers.l]\nkind = "local"\nmemory = "9EiB"\n', "$.providers.l.memory", "size"),
        ("[placement]\nbudget = inf\n", "$.placement.budget", "finite"),
        ("[placement]\nbudget = nan\n", "$.placement.budget", "finite"),
        ("[placement]\nbudget = -1.0\n", "$.placement.budget", "at least 0"),
        ("[placement]\nbudget = 1e9\n", "$.placement.budget", "86,400"),
        ("[policy]\npriority = -9000000000000000000\n", "$.policy.priority", "at least"),
        ("[policy.placement]\ndata = nan\n", "$.policy.placement.data", "finite"),
        (
            '[[placement.links]]\nsrc = "a"\ndst = "b"\nbandwidth = inf\n',
            "$.placement.links[0].bandwidth",
            "finite",
        ),
        (
            '[[placement.links]]\nsrc = "a"\ndst = "b"\nbandwidth = 1\negress_per_gb = nan\n',
            "$.placement.links[0].egress_per_gb",
            "finite",
        ),
        (
            '[providers.c]\nkind = "slurm"\nhost = "h"\nqueue_factor = inf\n',
            "$.providers.c.queue_factor",
            "finite",
        ),
    ],
)
def test_project_numbers_are_finite_and_bounded(
    tmp_path: Path, text: str, path: str, words: str
) -> None:
    err = project_error(write(tmp_path, "stowplan.toml", text))
    assert err.path == path
    assert words in err.message


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0, 1e9])
def test_the_budget_flag_and_the_field_share_one_definition(budget: float) -> None:
    # stowplan.cli.common.budget_seconds checks --budget against this very field
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"budget": budget}, PlacementSettings)
    assert msgspec.convert({"budget": 0.5}, PlacementSettings).budget == 0.5


def test_units_name_their_limits() -> None:
    assert parse_size(MAX_BYTES) == MAX_BYTES
    with pytest.raises(ValueError, match="1 EiB"):
        parse_size(MAX_BYTES + 1)
    with pytest.raises(ValueError, match="1 EiB"):
        parse_size(10**400)
    with pytest.raises(ValueError, match="not a size"):
        parse_size("9" * 100 + "GiB")
    assert parse_duration(MAX_DURATION_S) == MAX_DURATION_S
    with pytest.raises(ValueError, match="10 years"):
        parse_duration("3651d")
    with pytest.raises(ValueError, match="finite"):
        parse_duration(10**400)
    with pytest.raises(ValueError, match="10 years"):
        parse_duration("99999999999999999999-00:00:00")


def test_placement_problem_bounds_what_the_table_can_represent() -> None:
    pool = Pool(id="p", provider="local", cpus=4, memory=1 << 30)
    for cls, path in [
        (DemandClass(id="c", cpus=1e308, members=["t"]), "$.classes[0].cpus"),
        (DemandClass(id="c", gpus=10**30, members=["t"]), "$.classes[0].gpus"),
        (DemandClass(id="c", memory=1 << 70, members=["t"]), "$.classes[0].memory"),
        (DemandClass(id="c", runtime_s=float("inf"), members=["t"]), "$.classes[0].runtime_s"),
    ]:
        with pytest.raises(SpecError) as info:
            validate(PlacementProblem(pools=[pool], classes=[cls]))
        assert info.value.path == path
    huge = Pool(id="p", provider="local", cpus=1e300, memory=1 << 30)
    with pytest.raises(SpecError, match="at most") as info:
        validate(PlacementProblem(pools=[huge], classes=[]))
    assert info.value.path == "$.pools[0].cpus"


# ---- names and paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ('name = "b\\n"\ncommand = ["e"]', "$.tasks[1].name"),
        ('name = "b"\ncommand = ["e"]\nenv = { "A\\n" = "1" }', "$.tasks[1].env"),
        ('name = "b"\ncommand = ["e"]\nenv = { A = "x\\u0000" }', "$.tasks[1].env.A"),
        ('name = "b"\ncommand = ["e", "\\u0000"]', "$.tasks[1].command[1]"),
        ('name = "b"\nscript = "echo \\u0000"', "$.tasks[1].script"),
        ('name = "b"\ncommand = ["e"]\ndepends_on = ["a\\n"]', "$.tasks[1].depends_on[0]"),
        ('name = "b"\ncommand = ["e"]\ninputs = [{ uri = "d\\n" }]', "$.tasks[1].inputs[0].uri"),
        ('name = "b"\ncommand = ["e"]\ninputs = [{ uri = "d", sites = ["s\\t"] }]', None),
        ('name = "b"\ncommand = ["e"]\nresources = { gpus = 1, gpu_type = "a\\n" }', None),
        ('name = "b"\ncommand = ["e"]\nplacement = { require_sites = ["x\\n"] }', None),
        (
            'name = "b"\ncommand = ["{p}"]\nsweep = { parameters = { "p\\n" = [1] } }',
            "$.tasks[1].sweep.parameters",
        ),
        (
            'name = "b"\ncommand = ["{p}"]\nsweep = { parameters = { p = ["v\\u0000"] } }',
            "$.tasks[1].sweep.parameters.p[0]",
        ),
    ],
)
def test_no_control_characters_in_names_and_paths(
    tmp_path: Path, body: str, path: str | None
) -> None:
    text = HEAD + 'command = ["e"]\n\n[[tasks]]\n' + body + "\n"
    err = load_error(write(tmp_path, "e.toml", text))
    if path is not None:
        assert err.path == path
    assert err.path is not None and err.path.startswith("$.tasks[1]")
    assert "<" not in err.message  # no Python reprs


def test_experiment_and_provider_names_are_anchored(tmp_path: Path) -> None:
    text = '[experiment]\nname = "x\\n"\n[[tasks]]\nname = "a"\ncommand = ["e"]\n'
    err = load_error(write(tmp_path, "e.toml", text))
    assert err.path == "$.experiment.name" and "a name must be" in err.message
    err = project_error(write(tmp_path, "stowplan.toml", '[providers."a\\n"]\nkind = "local"\n'))
    assert err.path == "$.providers" and "'a\\n'" in err.message


@pytest.mark.parametrize(
    "out", ["/etc/passwd", "../up", "a/../../b", "a//b", "./x", "a/./b", "a\nb", "a\x00b", " ", ""]
)
def test_bad_output_paths(out: str) -> None:
    assert output_path_problem(out) is not None
    with pytest.raises(msgspec.ValidationError, match=r"outputs\[0\]: "):
        msgspec.convert({"name": "t", "command": ["x"], "outputs": [out]}, Task)


@pytest.mark.parametrize("out", ["metrics.json", "plots/", "a/b/c.txt", ".hidden", "a..b"])
def test_good_output_paths_and_a_trailing_slash_for_a_directory(out: str) -> None:
    assert output_path_problem(out) is None
    task = msgspec.convert({"name": "t", "command": ["x"], "outputs": [out]}, Task)
    assert task.outputs == [out]


def test_an_output_listed_twice(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "e.toml", HEAD + 'command = ["e"]\noutputs = ["a", "a"]\n'))
    assert err.path == "$.tasks[0].outputs[1]" and "twice" in err.message


# ---- structure: depth, cycles, long chains ----------------------------------------------------


def test_a_5000_task_chain_loads_and_orders_without_recursion(tmp_path: Path) -> None:
    n = 5000
    parts = ['[experiment]\nname = "chain"\n']
    for i in range(n):  # t0 needs t1 needs t2 ...: a depth-first walk goes n deep
        dep = f'depends_on = ["t{i + 1}"]\n' if i < n - 1 else ""
        parts.append(f'[[tasks]]\nname = "t{i}"\ncommand = ["e"]\n{dep}')
    limit = sys.getrecursionlimit()
    loaded = load_experiment(write(tmp_path, "chain.toml", "".join(parts)))
    assert task_order(loaded.spec.tasks) == [f"t{i}" for i in reversed(range(n))]
    assert sys.getrecursionlimit() == limit


def test_a_long_cycle_is_found_without_recursion() -> None:
    n = 5000
    graph = {f"t{i}": [f"t{(i + 1) % n}"] for i in range(n)}
    cycle = _find_cycle(graph)
    assert cycle is not None and len(cycle) == n and cycle[0] == "t0"
    text = _cycle_text(cycle)
    assert text.startswith("t0 -> t1 -> t2 -> t3 -> ... (4,993 more) ...") and len(text) < 100
    assert _find_cycle({f"t{i}": [f"t{i + 1}"] if i < n - 1 else [] for i in range(n)}) is None


def _recursive_order(deps: dict[str, list[str]], names: list[str]) -> list[str]:
    done: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        for d in deps[n]:
            visit(d)
        done.append(n)

    for n in names:
        visit(n)
    return done


def test_task_order_is_the_depth_first_post_order() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 12)
        names = [f"t{i}" for i in range(n)]
        rng.shuffle(names)
        deps = {m: rng.sample(names[:k], rng.randint(0, min(3, k))) for k, m in enumerate(names)}
        file_order = rng.sample(names, n)
        tasks = [Task(name=m, command=["e"], depends_on=deps[m]) for m in file_order]
        assert task_order(tasks) == _recursive_order(deps, file_order)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep-array.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ("deep-inline.toml", "a = " + "{b = " * 50_000 + "1" + "}" * 50_000 + "\n"),
        ("deep-dotted.toml", "a" + ".a" * 50_000 + " = 1\n"),
        ("deep-flow.yaml", "a: " + "[" * 20_000 + "]" * 20_000 + "\n"),
        ("deep-block.yaml", "".join("  " * i + "a:\n" for i in range(2_000)) + "  " * 2000 + "b\n"),
    ],
)
def test_deep_nesting_is_refused_with_the_limit(tmp_path: Path, name: str, text: str) -> None:
    err = load_error(write(tmp_path, name, text))
    assert f"deeper than {MAX_DEPTH} levels" in err.message


def test_brackets_in_strings_and_comments_do_not_count(tmp_path: Path) -> None:
    text = HEAD + 'command = ["' + "[" * 100 + '", """' + "{" * 100 + '"""]  # ' + "[" * 100 + "\n"
    loaded = load_experiment(write(tmp_path, "e.toml", text))
    assert loaded.spec.tasks[0].command == ["e" if False else "[" * 100, "{" * 100]


# ---- YAML: aliases and duplicate keys ----------------------------------------------------------


def test_flat_alias_amplification_is_refused(tmp_path: Path) -> None:
    big = "x" * 200_000
    text = (
        f"big: &b {big}\nexperiment: {{name: x}}\ntasks:\n  - name: a\n    command: [e]\n"
        "    env:\n" + "".join(f"      V{i}: *b\n" for i in range(2000))
    )
    err = load_error(write(tmp_path, "flat.yaml", text))
    assert "aliases" in err.message and "1,000,000" in err.message
    assert err.line is not None and err.line > 6


def test_nested_billion_laughs_is_refused(tmp_path: Path) -> None:
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, 10):
        levels.append(f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]")
    text = "\n".join(levels) + "\nexperiment: {name: x}\ntasks: [{name: a, command: [e]}]\n"
    err = load_error(write(tmp_path, "lol.yaml", text))
    assert "aliases" in err.message


def test_too_many_aliases(tmp_path: Path) -> None:
    text = "v: &v 1\nl: [" + ", ".join(["*v"] * 1001) + "]\n"
    err = load_error(write(tmp_path, "many.yaml", text))
    assert "more than 1,000 aliases" in err.message


def test_modest_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = (
        "experiment: {name: x}\n"
        "tasks:\n"
        "  - &base {name: a, command: [e], resources: &r {cpus: 2, memory: 2GiB}}\n"
        "  - {<<: *base, name: b}\n"
        "  - {name: c, command: [e], resources: *r}\n"
    )
    loaded = load_experiment(write(tmp_path, "ok.yaml", text))
    assert [t.name for t in loaded.spec.tasks] == ["a", "b", "c"]
    assert {t.resources.cpus for t in loaded.spec.tasks} == {2.0}


def test_yaml_duplicate_keys_are_refused_like_toml(tmp_path: Path) -> None:
    text = "experiment: {name: x}\ntasks:\n  - name: a\n    command: [e]\n    name: b\n"
    err = load_error(write(tmp_path, "dup.yaml", text))
    assert err.line == 5
    assert "duplicate key 'name' (first on line 3)" in err.message


# ---- the file itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path, suffix: str) -> None:
    body = (
        HEAD + 'command = ["e"]\n'
        if suffix == ".toml"
        else "experiment: {name: x}\ntasks: [{name: a, command: [e]}]\n"
    )
    path = write(tmp_path, "bom" + suffix, b"\xef\xbb\xbf" + body.encode())
    loaded = load_experiment(path)
    assert loaded.spec.tasks[0].name == "a"
    assert not loaded.text.startswith("\ufeff")


def test_utf16_and_bad_bytes_are_named(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "u16.toml", "\ufeff[experiment]\n".encode("utf-16")))
    assert "UTF-16" in err.message
    err = load_error(write(tmp_path, "latin.toml", (HEAD + "# caf\xe9\n").encode("latin-1")))
    assert "not UTF-8" in err.message and err.line == 6


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "exp.toml"
    os.mkfifo(fifo)
    err = load_error(fifo)  # the per-test timeout fails this if it blocks
    assert "named pipe" in err.message
    project = tmp_path / "stowplan.toml"
    os.mkfifo(project)
    assert "named pipe" in project_error(project).message


def test_a_directory_or_device_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir.toml"
    d.mkdir()
    assert "a directory" in load_error(d).message
    with pytest.raises(SpecError, match="character device"):
        load_experiment(Path("/dev/zero"))


def test_a_stowplan_toml_that_is_not_a_file_is_refused_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "stowplan.toml").mkdir()
    path = write(tmp_path, "e.toml", HEAD + 'command = ["e"]\n')
    with pytest.raises(SpecError, match="a directory") as info:
        load_experiment(path)
    assert "stowplan.toml" in str(info.value)


# ---- messages a person can act on --------------------------------------------------------------


def test_unknown_field_lists_the_fields_and_suggests_one(tmp_path: Path) -> None:
    body = 'command = ["{a}"]\nsweep = { method = "random", trials = 6, parameters = { a = [1] } }'
    err = load_error(write(tmp_path, "e.toml", HEAD + body + "\n"))
    assert err.path == "$.tasks[0].sweep.trials"
    assert err.hint is not None and err.hint.startswith("did you mean 'samples'?")
    assert "parameters, method, samples, seed, max_concurrent" in err.hint
    err = load_error(write(tmp_path, "f.toml", HEAD + 'command = ["e"]\nresourcs = {}\n'))
    assert err.hint is not None and "did you mean 'resources'?" in err.hint


def test_provider_errors_name_the_provider_and_the_kinds(tmp_path: Path) -> None:
    text = '[providers.local]\nkind = "local"\n[providers.campus]\nkind = "nomad"\n'
    err = project_error(write(tmp_path, "stowplan.toml", text))
    assert err.path == "$.providers.campus.kind" and err.line == 4
    assert err.hint is not None
    assert err.hint.startswith("use one of: local, instant, slurm, kubernetes")
    err = project_error(write(tmp_path, "stowplan.toml", "[providers.campus]\nhost = 'h'\n"))
    assert err.path == "$.providers.campus.kind"
    assert err.hint is not None and "local, instant, slurm" in err.hint
    text = (
        '[providers.a]\nkind = "local"\n[providers.campus]\nkind = "slurm"\nhost = "h"\nport = 0\n'
    )
    err = project_error(write(tmp_path, "stowplan.toml", text))
    assert err.path == "$.providers.campus.port" and err.line == 6


def test_sweep_domain_errors_name_the_parameter(tmp_path: Path) -> None:
    body = (
        'command = ["{lr}"]\nsweep = { method = "random", samples = 2, parameters = '
        '{ wd = [1], lr = { type = "uniform", low = 1.0, high = 0.5 } } }'
    )
    err = load_error(write(tmp_path, "e.toml", HEAD + body + "\n"))
    assert err.path == "$.tasks[0].sweep.parameters.lr"
    assert "low < high" in err.message


def test_enum_errors_list_the_values_and_no_repr_leaks(tmp_path: Path) -> None:
    err = load_error(
        write(tmp_path, "e.toml", HEAD + 'command = ["e"]\nretry = { on = ["bogus"] }\n')
    )
    assert err.path == "$.tasks[0].retry.on[0]"
    assert err.hint is not None and "out_of_memory" in err.hint
    body = 'command = ["e"]\nretry = { on = ["cancelled", "lost"] }\n'
    err = load_error(write(tmp_path, "f.toml", HEAD + body))
    assert err.message.startswith("cancelled can never be retried")
    assert "<" not in err.message and "FailureClass" not in err.message


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{seed:>99999999}", "format specs"),
        ("{seed!r}", "conversions"),
        ("{0}", "not a placeholder"),
        ("{a.b}", "not a placeholder"),
        ("{", "literal braces"),
        ("}", "literal braces"),
    ],
)
def test_placeholder_messages_say_what_is_supported(template: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        placeholders(template)


# ---- data inputs -------------------------------------------------------------------------------


def test_unreadable_data_inputs_name_the_file_line_and_field(tmp_path: Path) -> None:
    body = 'command = ["e"]\ninputs = [{ uri = "ok.csv" }, { uri = "/proc/self" }]\n'
    write(tmp_path, "ok.csv", "1\n")
    loaded = load_experiment(write(tmp_path, "e.toml", HEAD + body))
    with pytest.raises(SpecError) as info:
        capture_inputs(loaded)
    err = info.value
    assert err.file == loaded.file and err.line == 7
    assert err.path == "$.tasks[0].inputs[1].uri"
    assert "/proc/self" in err.message


def test_missing_data_input_names_the_field(tmp_path: Path) -> None:
    loaded = load_experiment(
        write(tmp_path, "e.toml", HEAD + 'command = ["e"]\ninputs = [{ uri = "nope.csv" }]\n')
    )
    with pytest.raises(SpecError) as info:
        capture_inputs(loaded)
    assert info.value.path == "$.tasks[0].inputs[0].uri" and "does not exist" in info.value.message
    assert info.value.file == loaded.file


@pytest.mark.parametrize("uri", ["/proc/self", "~no-such-user-here/x", "/proc/self/mem"])
def test_capture_data_turns_os_errors_into_spec_errors(tmp_path: Path, uri: str) -> None:
    with pytest.raises(SpecError):
        capture_data(uri, None, tmp_path)


def test_the_sweep_cap_message_counts_in_good_grammar(tmp_path: Path) -> None:
    text = HEAD + 'command = ["e"]\n\n[[tasks]]\nname = "b"\ncommand = ["e"]\n'
    text += "[policy]\nmax_sweep_size = 1\n"
    err = load_error(write(tmp_path, "e.toml", text))
    assert err.message.startswith("this expands to 1 trial (2 so far)")
