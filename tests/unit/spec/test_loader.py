"""Loading experiment files and stowplan.toml: typed specs, or a SpecError the user can act on."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from stowplan.errors import SpecError, StowplanError
from stowplan.spec.loader import (
    find_project_file,
    load_experiment,
    load_project,
    locate,
    placeholders,
)
from stowplan.spec.models import FailureClass, LogUniform

GiB = 1024**3

QUICKSTART_TOML = """\
[experiment]
name = "digits-svm"
description = "Does gamma matter more than C on the digits data?"

[[tasks]]
name = "train"
command = ["python", "train.py", "--C", "{C}", "--gamma", "{gamma}", "--seed", "{seed}"]
outputs = ["metrics.json"]
resources = { cpus = 1, memory = "1GiB" }
sweep = { method = "grid", parameters = { C = [0.1, 1, 10], gamma = [0.001, 0.01] }, seed = 7 }

[[tasks]]
name = "select"
command = ["python", "select_best.py"]
depends_on = ["train"]
"""

QUICKSTART_YAML = """\
experiment:
  name: digits-svm
  description: Does gamma matter more than C on the digits data?
tasks:
  - name: train
    command: [python, train.py, --C, "{C}", --gamma, "{gamma}", --seed, "{seed}"]
    outputs: [metrics.json]
    resources: {cpus: 1, memory: 1GiB}
    sweep:
      method: grid
      parameters: {C: [0.1, 1, 10], gamma: [0.001, 0.01]}
      seed: 7
  - name: select
    command: [python, select_best.py]
    depends_on: [train]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return no
    raise AssertionError(f"{needle!r} not in {path}")


def load_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    return info.value


def assert_actionable(err: SpecError, path: Path, json_path: str | None) -> str:
    """The rendered error names the file, the $.path and carries a fix hint."""
    text = err.render()
    assert str(path) in text
    if json_path is not None:
        assert err.path == json_path
        assert f"at {json_path}" in text
    assert "\n  fix: " in text
    assert str(err) == text
    return text


# ---- valid files ----------------------------------------------------------------------------


def test_valid_toml_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "exp.toml", QUICKSTART_TOML)
    loaded = load_experiment(path)
    spec = loaded.spec
    assert spec.name == "digits-svm"
    assert [t.name for t in spec.tasks] == ["train", "select"]
    train, select = spec.tasks
    assert train.resources.memory == GiB
    assert train.resources.cpus == 1.0
    assert train.sweep is not None
    assert train.sweep.parameters == {"C": [0.1, 1, 10], "gamma": [0.001, 0.01]}
    assert train.sweep.seed == 7
    assert select.depends_on == ["train"]
    assert loaded.file == str(path)
    assert loaded.directory == str(tmp_path.resolve())
    assert loaded.text == path.read_text()
    assert loaded.policy.retry.max_attempts == 3  # defaults, no project file


def test_valid_yaml_loads_to_the_same_spec(tmp_path: Path) -> None:
    toml = load_experiment(write(tmp_path, "exp.toml", QUICKSTART_TOML))
    yaml_ = load_experiment(write(tmp_path, "exp.yaml", QUICKSTART_YAML))
    assert yaml_.spec == toml.spec
    yml = load_experiment(write(tmp_path, "exp.yml", QUICKSTART_YAML))
    assert yml.spec == toml.spec


def test_yaml_reads_scalars_as_yaml_1_2(tmp_path: Path) -> None:
    # YAML 1.1 would make the key `on` True, `yes` True, 1:30 base-60 (90 s) and a date object
    path = write(
        tmp_path,
        "exp.yaml",
        """\
        experiment: {name: x}
        tasks:
          - name: a
            command: [run]
            env: {FLAG: yes, MODE: off}
            retry: {on: [preempted, lost], max_attempts: 2}
            timeout: 1:30
            inputs: [{uri: data.csv, version: 2024-01-01}]
            resources: {cpus: 0.5, memory: 1024}
        """,
    )
    task = load_experiment(path).spec.tasks[0]
    assert task.env == {"FLAG": "yes", "MODE": "off"}
    assert task.retry is not None
    assert task.retry.on == [FailureClass.LOST, FailureClass.PREEMPTED]
    assert task.timeout == 5400.0
    assert task.inputs[0].version == "2024-01-01"
    assert task.resources.cpus == 0.5
    assert task.resources.memory == 1024


def test_yaml_and_toml_durations_agree(tmp_path: Path) -> None:
    body = '[experiment]\nname = "x"\n[[tasks]]\nname = "a"\ncommand = ["r"]\ntimeout = "1:30"\n'
    toml = load_experiment(write(tmp_path, "a.toml", body)).spec.tasks[0]
    yaml_ = load_experiment(
        write(
            tmp_path,
            "a.yaml",
            "experiment: {name: x}\ntasks: [{name: a, command: [r], timeout: 1:30}]\n",
        )
    ).spec.tasks[0]
    assert toml.timeout == yaml_.timeout == 5400.0


def test_placeholders_that_are_allowed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.toml",
        """\
        [experiment]
        name = "x"

        [[tasks]]
        name = "a"
        command = ["run", "{lr}", "{seed}", "{run_id}", "{experiment_dir}", "{{x}}"]
        env = { LR = "{lr}" }
        sweep = { method = "random", samples = 3, parameters = { lr = [0.1, 0.2] } }

        [[tasks]]
        name = "b"
        script = "echo {seed} {{literal}}"
        """,
    )
    assert [t.name for t in load_experiment(path).spec.tasks] == ["a", "b"]


# ---- parse errors ---------------------------------------------------------------------------


def test_malformed_toml_names_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.toml",
        """\
        [experiment]
        name = "x"

        [[tasks]]
        name = unquoted
        command = ["x"]
        """,
    )
    err = load_error(path)
    assert err.line == 5
    assert "not valid TOML" in err.message
    text = assert_actionable(err, path, None)
    assert text.startswith(f"{path}:5: ")


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.yaml",
        """\
        experiment:
          name: x
        tasks:
          - name: a
            command: [echo
          - name: b
        """,
    )
    err = load_error(path)
    assert "not valid YAML" in err.message
    assert err.line == 6
    assert_actionable(err, path, None)


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "exp.json", "{}"))
    assert "unknown file type '.json'" in err.message
    assert "*.toml" in (err.hint or "")
    err = load_error(tmp_path / "nope.toml")
    assert err.message == "file not found"


def test_top_level_must_be_a_table(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "exp.yaml", "- a\n- b\n"))
    assert "at the top level" in err.message
    err = load_error(write(tmp_path, "empty.yaml", ""))
    assert "at the top level" in err.message


def test_spec_error_is_a_value_error_under_the_root() -> None:
    err = SpecError("bad", file="f.toml", path="$.x", line=3, hint="fix it")
    assert isinstance(err, ValueError)
    assert isinstance(err, StowplanError)
    assert err.render() == "f.toml:3 at $.x: bad\n  fix: fix it"
    assert SpecError("bad").render() == "bad"


# ---- decode errors: $.path and line --------------------------------------------------------

UNKNOWN_FIELD_TOML = """\
[experiment]
name = "x"

[[tasks]]
name = "a"
command = ["echo"]
resourcez = { cpus = 1 }
"""

UNKNOWN_FIELD_YAML = """\
experiment:
  name: x
tasks:
  - name: a
    command: [echo]
    resourcez: {cpus: 1}
"""


@pytest.mark.parametrize(
    ("name", "text"), [("e.toml", UNKNOWN_FIELD_TOML), ("e.yaml", UNKNOWN_FIELD_YAML)]
)
def test_unknown_field_has_path_and_line(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, name, text)
    err = load_error(path)
    assert "unknown field `resourcez`" in err.message
    assert err.line == line_of(path, "resourcez")
    text_ = assert_actionable(err, path, "$.tasks[0].resourcez")
    assert "did you mean 'resources'?" in text_
    assert "the fields here are: name, command, script, env, resources," in text_


def test_unknown_field_in_second_task_and_nested_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.toml",
        """\
        [experiment]
        name = "x"

        [[tasks]]
        name = "a"
        command = ["echo"]

        [[tasks]]
        name = "b"
        command = ["echo"]

        [tasks.resources]
        cpus = 2
        gpu = 1
        """,
    )
    err = load_error(path)
    assert err.line == line_of(path, "gpu = 1")
    assert_actionable(err, path, "$.tasks[1].resources.gpu")


@pytest.mark.parametrize("cpus", ["-1", "0", "-0.5"])
def test_non_positive_cpus(tmp_path: Path, cpus: str) -> None:
    path = write(
        tmp_path,
        "exp.toml",
        f"""\
        [experiment]
        name = "x"

        [[tasks]]
        name = "a"
        command = ["echo"]

        [[tasks]]
        name = "b"
        command = ["echo"]
        resources = {{ cpus = {cpus} }}
        """,
    )
    err = load_error(path)
    assert err.message.startswith("must be more than 0, got ")
    assert err.line == line_of(path, "cpus =")
    assert_actionable(err, path, "$.tasks[1].resources.cpus")


def test_non_positive_cpus_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.yaml",
        """\
        experiment: {name: x}
        tasks:
          - name: a
            command: [echo]
            resources:
              memory: 2GiB
              cpus: -2
        """,
    )
    err = load_error(path)
    assert err.line == line_of(path, "cpus: -2")
    assert_actionable(err, path, "$.tasks[0].resources.cpus")


@pytest.mark.parametrize("layout", ["inline", "table"])
def test_bad_memory_unit_names_units(tmp_path: Path, layout: str) -> None:
    res = (
        'resources = { cpus = 2, memory = "4GX" }'
        if layout == "inline"
        else '[tasks.resources]\ncpus = 2\nmemory = "4GX"'
    )
    path = write(
        tmp_path,
        "exp.toml",
        '[experiment]\nname = "x"\n\n[[tasks]]\nname = "a"\ncommand = ["echo"]\n' + res + "\n",
    )
    err = load_error(path)
    assert "'4GX' is not a size" in err.message
    for unit in ("KiB", "MiB", "GiB", "TiB", "MB", "GB"):
        assert unit in err.message
    assert err.line == line_of(path, "4GX")
    assert_actionable(err, path, "$.tasks[0].resources.memory")


def test_wrong_type_hint(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.toml",
        '[experiment]\nname = "x"\n[[tasks]]\nname = "a"\ncommand = "echo hi"\n',
    )
    err = load_error(path)
    assert err.message == "Expected `array | null`, got `str`"
    assert err.hint == "change the value to the expected type"
    assert err.line == 5
    assert_actionable(err, path, "$.tasks[0].command")


def test_missing_experiment_table(tmp_path: Path) -> None:
    path = write(tmp_path, "exp.toml", '[[tasks]]\nname = "a"\ncommand = ["x"]\n')
    err = load_error(path)
    assert "missing required field `experiment`" in err.message
    assert_actionable(err, path, "$.experiment")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ('command = ["x"]\nscript = "x"', "exactly one of command"),
        ('env = { A = "1" }', "exactly one of command"),
    ],
)
def test_command_and_script_both_or_neither(tmp_path: Path, fields: str, message: str) -> None:
    path = write(
        tmp_path,
        "exp.toml",
        f'[experiment]\nname = "x"\n\n[[tasks]]\nname = "ok"\ncommand = ["x"]\n\n'
        f'[[tasks]]\nname = "a"\n{fields}\n',
    )
    err = load_error(path)
    assert message in err.message
    assert err.line == 8  # the second [[tasks]]
    assert_actionable(err, path, "$.tasks[1]")


def test_grid_with_a_uniform_range(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.toml",
        """\
        [experiment]
        name = "x"

        [[tasks]]
        name = "a"
        command = ["run", "{lr}"]

        [tasks.sweep]
        method = "grid"
        parameters = { lr = { type = "uniform", low = 0.0, high = 1.0 } }
        """,
    )
    err = load_error(path)
    assert "a grid needs explicit values" in err.message
    assert "'random' or 'sobol'" in err.message
    assert err.line == line_of(path, "parameters =")
    assert_actionable(err, path, "$.tasks[0].sweep.parameters.lr")


def test_random_without_samples(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.yaml",
        """\
        experiment: {name: x}
        tasks:
          - name: a
            command: [run, "{lr}"]
            sweep:
              method: random
              parameters:
                lr: {type: loguniform, low: 1.0e-4, high: 0.1}
        """,
    )
    err = load_error(path)
    assert "a random sweep needs samples = N" in err.message
    assert err.line == line_of(path, "sweep:")
    assert_actionable(err, path, "$.tasks[0].sweep")


def test_random_loguniform_in_yaml_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exp.yaml",
        """\
        experiment: {name: x}
        tasks:
          - name: a
            command: [run, "{lr}"]
            sweep:
              method: random
              samples: 8
              parameters:
                lr: {type: loguniform, low: 1e-4, high: 0.1}
        """,
    )
    sweep = load_experiment(path).spec.tasks[0].sweep
    assert sweep is not None
    assert sweep.parameters["lr"] == LogUniform(low=1e-4, high=0.1)


# ---- whole-file checks ----------------------------------------------------------------------


def tasks_file(tmp_path: Path, *tasks: str, name: str = "exp.toml", policy: str = "") -> Path:
    body = '[experiment]\nname = "x"\n'
    if policy:
        body += f"\n[policy]\n{policy}\n"
    for t in tasks:
        body += f"\n[[tasks]]\n{t}\n"
    return write(tmp_path, name, body)


def test_unknown_dependency_names_known_tasks(tmp_path: Path) -> None:
    path = tasks_file(
        tmp_path,
        'name = "prep"\ncommand = ["x"]',
        'name = "train"\ncommand = ["x"]\ndepends_on = ["prep", "prepp"]',
    )
    err = load_error(path)
    assert err.message == "depends on 'prepp', which is not a task of this experiment"
    assert err.hint == "use one of: prep, train"
    assert err.line == line_of(path, "depends_on")
    assert_actionable(err, path, "$.tasks[1].depends_on[1]")


def test_self_dependency(tmp_path: Path) -> None:
    path = tasks_file(tmp_path, 'name = "a"\ncommand = ["x"]\ndepends_on = ["a"]')
    err = load_error(path)
    assert err.message == "a task cannot depend on itself"
    assert_actionable(err, path, "$.tasks[0].depends_on[0]")


def test_dependency_cycle_names_the_cycle(tmp_path: Path) -> None:
    path = tasks_file(
        tmp_path,
        'name = "a"\ncommand = ["x"]\ndepends_on = ["c"]',
        'name = "b"\ncommand = ["x"]\ndepends_on = ["a"]',
        'name = "c"\ncommand = ["x"]\ndepends_on = ["b"]',
        'name = "d"\ncommand = ["x"]\ndepends_on = ["a"]',
    )
    err = load_error(path)
    assert err.message == "dependency cycle: a -> c -> b -> a"
    assert err.line == line_of(path, 'depends_on = ["c"]')
    assert_actionable(err, path, "$.tasks[0].depends_on")


def test_a_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    path = tasks_file(
        tmp_path,
        'name = "a"\ncommand = ["x"]',
        'name = "b"\ncommand = ["x"]\ndepends_on = ["a"]',
        'name = "c"\ncommand = ["x"]\ndepends_on = ["a"]',
        'name = "d"\ncommand = ["x"]\ndepends_on = ["b", "c"]',
    )
    assert len(load_experiment(path).spec.tasks) == 4


def test_duplicate_task_names(tmp_path: Path) -> None:
    path = tasks_file(
        tmp_path,
        'name = "a"\ncommand = ["x"]',
        'name = "b"\ncommand = ["x"]',
        'name = "a"\ncommand = ["y"]',
    )
    err = load_error(path)
    assert err.message == "task name 'a' is used twice (also by $.tasks[0])"
    assert err.line == line_of(path, 'command = ["y"]') - 1
    assert_actionable(err, path, "$.tasks[2].name")


def test_no_tasks(tmp_path: Path) -> None:
    path = write(tmp_path, "exp.toml", 'tasks = []\n[experiment]\nname = "x"\n')
    err = load_error(path)
    assert err.message == "an experiment needs at least one task"
    assert_actionable(err, path, "$.tasks")


SWEEP_6 = (
    'name = "a"\ncommand = ["x", "{C}"]\nsweep = { parameters = { C = [1, 2, 3], g = [1, 2] } }'
)


def test_sweep_over_the_cap_in_the_file_policy(tmp_path: Path) -> None:
    path = tasks_file(tmp_path, SWEEP_6, policy="max_sweep_size = 5")
    err = load_error(path)
    assert err.message == "this expands to 6 trials (6 so far); the cap is 5"
    assert "policy.max_sweep_size" in (err.hint or "")
    assert err.line == line_of(path, "sweep =")
    assert_actionable(err, path, "$.tasks[0].sweep")
    ok = tasks_file(tmp_path, SWEEP_6, name="ok.toml", policy="max_sweep_size = 6")
    assert load_experiment(ok).policy.max_sweep_size == 6


def test_sweep_cap_counts_the_total(tmp_path: Path) -> None:
    path = tasks_file(
        tmp_path,
        SWEEP_6,
        'name = "b"\ncommand = ["x"]\nsweep = { parameters = { k = { type = "int", low = 1, '
        "high = 5 } } }",
        policy="max_sweep_size = 10",
    )
    err = load_error(path)
    assert err.message == "this expands to 5 trials (11 so far); the cap is 10"
    assert err.path == "$.tasks[1].sweep"


def test_sweep_cap_from_the_project_file_next_to_it(tmp_path: Path) -> None:
    write(tmp_path, "stowplan.toml", "[policy]\nmax_sweep_size = 4\n")
    path = tasks_file(tmp_path, SWEEP_6)
    err = load_error(path)
    assert err.message == "this expands to 6 trials (6 so far); the cap is 4"
    # the experiment's own [policy] overrides the project's
    ok = tasks_file(tmp_path, SWEEP_6, name="ok.toml", policy="max_sweep_size = 100")
    assert load_experiment(ok).policy.max_sweep_size == 100


def test_sweep_random_cap_uses_samples(tmp_path: Path) -> None:
    path = tasks_file(
        tmp_path,
        'name = "a"\ncommand = ["x"]\nsweep = { method = "sobol", samples = 9, parameters = '
        '{ u = { type = "uniform", low = 0, high = 1 } } }',
        policy="max_sweep_size = 8",
    )
    assert load_error(path).message == "this expands to 9 trials (9 so far); the cap is 8"


def test_unknown_placeholder(tmp_path: Path) -> None:
    path = tasks_file(
        tmp_path,
        'name = "a"\ncommand = ["train", "--lr", "{lr}"]\nsweep = { parameters = { C = [1] } }',
    )
    err = load_error(path)
    assert err.message == "unknown placeholder {lr}"
    assert "{C}" in (err.hint or "") and "{seed}" in (err.hint or "")
    assert err.line == line_of(path, "{lr}")
    assert_actionable(err, path, "$.tasks[0].command[2]")


@pytest.mark.parametrize(
    ("field", "json_path"),
    [
        ('script = "echo {lr}"', "$.tasks[0].script"),
        ('command = ["x"]\nenv = { LR = "{lr}" }', "$.tasks[0].env.LR"),
    ],
)
def test_unknown_placeholder_in_script_and_env(tmp_path: Path, field: str, json_path: str) -> None:
    path = tasks_file(tmp_path, f'name = "a"\n{field}')
    err = load_error(path)
    assert err.message == "unknown placeholder {lr}"
    assert_actionable(err, path, json_path)


@pytest.mark.parametrize("arg", ["{}", "{0}", "{a.b}", "{x!r}", "{x:3}", "oops {"])
def test_malformed_braces(tmp_path: Path, arg: str) -> None:
    path = tasks_file(tmp_path, f'name = "a"\ncommand = ["x", "{arg}"]')
    err = load_error(path)
    assert err.hint == "escape literal braces as {{ and }}"
    assert err.path == "$.tasks[0].command[1]"


def test_placeholders_helper() -> None:
    assert placeholders("a {x} {y}{x} {{z}}") == {"x", "y"}
    assert placeholders("no braces") == set()
    with pytest.raises(ValueError, match=r"write \{\{ for a literal brace"):
        placeholders("{1}")


# ---- the project file and policy merge ------------------------------------------------------


def test_project_file_is_found_upward(tmp_path: Path) -> None:
    project = write(tmp_path, "stowplan.toml", '[project]\nname = "lab"\n')
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_project_file(deep) == project
    assert find_project_file(tmp_path) == project
    loaded = load_project(search_from=deep)
    assert loaded.config.project.name == "lab"
    assert loaded.file == str(project)
    assert loaded.root == str(tmp_path.resolve())


def test_no_project_file_gives_defaults(tmp_path: Path) -> None:
    loaded = load_project(search_from=tmp_path)
    assert loaded.file is None
    assert loaded.root == str(tmp_path.resolve())
    assert loaded.config.project.name == "default"
    assert loaded.raw_policy == {}


def test_policy_merges_field_by_field(tmp_path: Path) -> None:
    write(
        tmp_path,
        "stowplan.toml",
        """\
        [project]
        name = "lab"

        [policy]
        priority = 3
        max_sweep_size = 50
        retry = { max_attempts = 5, backoff = 10.0, on = ["preempted"] }
        naming = { prefix = "lab" }
        """,
    )
    path = write(
        tmp_path / "exps" / "one",
        "exp.toml",
        """\
        [experiment]
        name = "x"

        [policy]
        max_sweep_size = 7
        retry = { max_attempts = 2 }

        [[tasks]]
        name = "a"
        command = ["x"]
        """,
    )
    policy = load_experiment(path).policy
    assert policy.max_sweep_size == 7  # experiment wins
    assert policy.priority == 3  # project default kept
    assert policy.retry.max_attempts == 2  # experiment wins inside a table...
    assert policy.retry.backoff == 10.0  # ...and the project's other fields stay
    assert policy.retry.on == [FailureClass.PREEMPTED]
    assert policy.naming.prefix == "lab"


def test_explicit_project_is_used_instead_of_searching(tmp_path: Path) -> None:
    write(tmp_path, "stowplan.toml", "[policy]\npriority = 9\n")
    other = write(tmp_path / "elsewhere", "stowplan.toml", "[policy]\npriority = 1\n")
    path = tasks_file(tmp_path, 'name = "a"\ncommand = ["x"]')
    assert load_experiment(path).policy.priority == 9
    project = load_project(other)
    assert load_experiment(path, project).policy.priority == 1


def test_bad_project_file_is_a_spec_error_naming_it(tmp_path: Path) -> None:
    project = write(tmp_path, "stowplan.toml", "[policy]\nmax_sweep_sise = 3\n")
    path = tasks_file(tmp_path, 'name = "a"\ncommand = ["x"]')
    err = load_error(path)
    assert err.file == str(project)
    assert err.line == 2
    assert_actionable(err, project, "$.policy.max_sweep_sise")


# ---- locate ---------------------------------------------------------------------------------


def test_locate_toml() -> None:
    text = textwrap.dedent(
        """\
        [experiment]
        name = "x"

        [[tasks]]
        name = "a"
        command = ["x"]

        [[tasks]]
        name = "b"
        resources = { cpus = 1 }

        [tasks.sweep]
        seed = 3

        [[tasks.inputs]]
        uri = "one"

        [[tasks.inputs]]
        uri = "two"
        """
    )
    f = Path("e.toml")
    assert locate(f, text, "$.experiment.name") == 2
    assert locate(f, text, "$.tasks[0].command") == 6
    assert locate(f, text, "$.tasks[1].name") == 9
    assert locate(f, text, "$.tasks[1].resources.cpus") == 10
    assert locate(f, text, "$.tasks[1].sweep.seed") == 13
    assert locate(f, text, "$.tasks[1].inputs[1].uri") == 19
    assert locate(f, text, "$.tasks[1]") == 8
    assert locate(f, text, "$") is None


def test_locate_toml_ignores_comments_after_headers() -> None:
    text = '[[tasks]]  # first\nname = "a"\n\n[[tasks]] # second\nname = "b"\n'
    assert locate(Path("e.toml"), text, "$.tasks[1].name") == 5


def test_locate_yaml() -> None:
    text = "experiment:\n  name: x\ntasks:\n  - name: a\n  - name: b\n    command: [x]\n"
    f = Path("e.yaml")
    assert locate(f, text, "$.experiment.name") == 2
    assert locate(f, text, "$.tasks[1]") == 5
    assert locate(f, text, "$.tasks[1].command") == 6
    assert locate(f, text, "$.tasks[7].command") == 3  # best effort: the nearest known line
