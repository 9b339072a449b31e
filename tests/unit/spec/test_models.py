"""The spec Structs: normalisation in __post_init__ and the checks each one makes alone."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from stowplan.spec.models import (
    INFRASTRUCTURE_FAILURES,
    Choice,
    DataInput,
    Experiment,
    FailureClass,
    IntRange,
    LocalProviderConfig,
    LogUniform,
    Policy,
    ProjectConfig,
    Resources,
    RetryPolicy,
    Sweep,
    Task,
    Uniform,
    to_builtins,
)

GiB = 1024**3


def convert(raw: Any, type_: type[Any]) -> Any:
    return msgspec.convert(raw, type_)


def invalid(raw: Any, type_: type[Any], match: str) -> str:
    with pytest.raises(msgspec.ValidationError, match=match) as info:
        msgspec.convert(raw, type_)
    return str(info.value)


# ---- Resources ----------------------------------------------------------------------------


def test_resources_defaults_are_normalised() -> None:
    r = Resources()
    assert r.cpus == 1.0
    assert r.memory == GiB
    assert r.memory_bytes == GiB
    assert r.gpus == 0
    assert r.gpu_types == ()
    assert r.walltime is None


def test_resources_memory_text_and_bytes_are_equal() -> None:
    a = convert({"memory": "4GiB", "cpus": 2}, Resources)
    b = convert({"memory": 4 * GiB, "cpus": 2.0}, Resources)
    assert a == b
    assert a.memory == 4 * GiB


def test_resources_walltime_is_seconds() -> None:
    assert convert({"walltime": "2h"}, Resources).walltime == 7200.0
    assert convert({"walltime": 60}, Resources).walltime == 60.0


def test_resources_gpu_type_string_becomes_sorted_unique_list() -> None:
    r = convert({"gpus": 1, "gpu_type": "H100"}, Resources)
    assert r.gpu_type == ["H100"]
    r = convert({"gpus": 2, "gpu_type": ["H100", "A100", "H100"]}, Resources)
    assert r.gpu_type == ["A100", "H100"]
    assert r.gpu_types == ("A100", "H100")


def test_resources_rejects_gpu_type_without_gpus() -> None:
    invalid({"gpu_type": "A100"}, Resources, "gpu_type is set but gpus = 0")
    invalid({"gpus": 1, "gpu_type": []}, Resources, "empty list")


@pytest.mark.parametrize("cpus", [0, -1, -0.5])
def test_resources_rejects_non_positive_cpus(cpus: float) -> None:
    invalid({"cpus": cpus}, Resources, r"Expected `float` > 0.0 - at `\$.cpus`")


def test_resources_bad_memory_names_field_and_units() -> None:
    msg = invalid({"memory": "4GX"}, Resources, "memory: '4GX' is not a size")
    assert "GiB" in msg and "GB" in msg


def test_resources_rejects_negative_gpus_and_unknown_field() -> None:
    invalid({"gpus": -1}, Resources, ">= 0")
    invalid({"cpu": 2}, Resources, "unknown field `cpu`")


def test_resources_gpu_share_is_one_device_in_thousandths() -> None:
    r = convert({"gpus": 0.25}, Resources)
    assert (r.gpus, r.gpu_devices, r.gpu_milli) == (0.25, 1, 250)
    whole = convert({"gpus": 2}, Resources)
    assert (whole.gpus, whole.gpu_devices, whole.gpu_milli) == (2, 2, 1000)
    # a whole number written as a decimal is that many whole GPUs, as if written as one
    two = convert({"gpus": 2.0}, Resources)
    assert two == whole and isinstance(two.gpus, int)
    assert msgspec.json.encode(two) == msgspec.json.encode(whole)
    assert convert({"gpus": 0.0}, Resources).gpus == 0


def test_resources_whole_gpus_encode_as_before() -> None:
    # the spec hash of every experiment written before shares existed stays the same
    assert b'"gpus":1,' in msgspec.json.encode(convert({"gpus": 1}, Resources))


@pytest.mark.parametrize(
    ("gpus", "match"),
    [
        (1.5, "not a whole number; a task takes whole GPUs or a share of one, so write 1 or 2"),
        (0.0001, "not a share in thousandths of one GPU; write e.g. 0.001"),
        (0.12345, "write e.g. 0.123"),
    ],
)
def test_resources_rejects_gpus_that_are_neither_whole_nor_a_share(gpus: float, match: str) -> None:
    invalid({"gpus": gpus}, Resources, match)


def test_resources_nodes_is_a_gang_of_whole_gpus() -> None:
    assert convert({}, Resources).nodes == 1
    r = convert({"nodes": 4, "gpus": 8, "cpus": 16}, Resources)
    assert (r.nodes, r.gpus, r.cpus) == (4, 8, 16.0)  # each node's part, as written
    invalid({"nodes": 0}, Resources, ">= 1")
    invalid(
        {"nodes": 2, "gpus": 0.5},
        Resources,
        "a share of one GPU \\(0.5\\) runs on one node, and nodes = 2; ask for whole GPUs",
    )


def test_a_task_without_nodes_hashes_as_before_nodes_existed() -> None:
    from stowplan.spec.canonical import task_hash

    plain = convert({"name": "t", "command": ["true"]}, Task)
    # the stored form of the same task from before the field existed
    before = msgspec.to_builtins(plain)
    del before["resources"]["nodes"]
    assert task_hash(plain) == task_hash(before)
    two = convert({"name": "t", "command": ["true"], "resources": {"nodes": 2}}, Task)
    assert task_hash(two) != task_hash(plain)


# ---- DataInput ------------------------------------------------------------------------------


def test_data_input_size_and_empty_uri() -> None:
    assert convert({"uri": "s3://b/k", "size": "1GB"}, DataInput).size == 10**9
    invalid({"uri": "  "}, DataInput, "uri: must not be empty")


# ---- domains and sweeps ---------------------------------------------------------------------


def test_domains_validate_their_bounds() -> None:
    invalid({"type": "uniform", "low": 1.0, "high": 1.0}, Uniform, "low < high")
    invalid({"type": "loguniform", "low": 0.0, "high": 1.0}, LogUniform, "0 < low < high")
    invalid({"type": "int", "low": 3, "high": 2}, IntRange, "low <= high")
    invalid({"type": "choice", "values": []}, Choice, "at least one value")
    assert convert({"type": "int", "low": 2, "high": 2}, IntRange).high == 2


def test_sweep_decodes_every_domain_kind() -> None:
    sweep = convert(
        {
            "method": "random",
            "samples": 4,
            "parameters": {
                "a": [1, 2],
                "b": {"type": "uniform", "low": 0, "high": 1},
                "c": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
                "d": {"type": "int", "low": 1, "high": 3},
                "e": {"type": "choice", "values": ["x", "y"]},
            },
        },
        Sweep,
    )
    p = sweep.parameters
    assert p["a"] == [1, 2]
    assert p["b"] == Uniform(low=0.0, high=1.0)
    assert p["c"] == LogUniform(low=1e-4, high=1e-1)
    assert p["d"] == IntRange(low=1, high=3)
    assert p["e"] == Choice(values=["x", "y"])


def test_grid_rejects_continuous_ranges() -> None:
    invalid(
        {"parameters": {"lr": {"type": "uniform", "low": 0, "high": 1}}},
        Sweep,
        "parameters.lr: a grid needs explicit values",
    )
    invalid(
        {"parameters": {"lr": {"type": "loguniform", "low": 0.1, "high": 1}}},
        Sweep,
        "a grid needs explicit values",
    )


@pytest.mark.parametrize("method", ["random", "sobol"])
def test_random_and_sobol_need_samples(method: str) -> None:
    invalid({"method": method, "parameters": {"x": [1, 2]}}, Sweep, f"a {method} sweep needs")


def test_sweep_other_checks() -> None:
    invalid({"parameters": {"x": [1]}, "samples": 3}, Sweep, "samples applies to random")
    invalid({"parameters": {}}, Sweep, "at least one parameter")
    invalid({"parameters": {"x": []}}, Sweep, "parameters.x: an empty list")
    invalid({"parameters": {"1x": [1]}}, Sweep, r"matching regex .* at `key` in `\$.parameters`")
    invalid({"parameters": {"x": [1]}, "method": "bayes"}, Sweep, "Invalid enum value 'bayes'")
    invalid({"parameters": {"x": [1]}, "method": "random", "samples": 0}, Sweep, ">= 1")


# ---- RetryPolicy ----------------------------------------------------------------------------


def test_retry_policy_defaults_to_infrastructure_failures() -> None:
    r = RetryPolicy()
    assert r.max_attempts == 3
    assert set(r.on) == set(INFRASTRUCTURE_FAILURES)
    assert r.on == sorted(r.on)


def test_retry_policy_sorts_and_deduplicates_classes() -> None:
    r = convert({"on": ["preempted", "lost", "preempted"]}, RetryPolicy)
    assert r.on == [FailureClass.LOST, FailureClass.PREEMPTED]


@pytest.mark.parametrize("cls", ["dependency_failed", "cancelled"])
def test_retry_policy_rejects_never_retried_classes(cls: str) -> None:
    invalid({"on": [cls]}, RetryPolicy, "can never be retried")


def test_retry_policy_bounds() -> None:
    invalid({"max_attempts": 0}, RetryPolicy, ">= 1")
    invalid({"jitter": 1.5}, RetryPolicy, "<= 1")
    invalid({"backoff": -1}, RetryPolicy, ">= 0")
    invalid({"on": ["flaky"]}, RetryPolicy, "Invalid enum value 'flaky'")


# ---- Task -----------------------------------------------------------------------------------


def test_task_needs_exactly_one_of_command_or_script() -> None:
    invalid({"name": "t"}, Task, "exactly one of command")
    invalid({"name": "t", "command": ["x"], "script": "x"}, Task, "exactly one of command")
    invalid({"name": "t", "command": []}, Task, "command: must name a program")
    assert convert({"name": "t", "script": "echo hi"}, Task).script == "echo hi"


def test_task_timeout_is_seconds() -> None:
    t = convert({"name": "t", "command": ["x"], "timeout": "1:30:00"}, Task)
    assert t.timeout == 5400.0
    assert t.timeout_s == 5400.0
    invalid({"name": "t", "command": ["x"], "timeout": "later"}, Task, "timeout: 'later'")


@pytest.mark.parametrize("out", ["/etc/passwd", "../up", "a/../../b", "  "])
def test_task_outputs_stay_inside_the_attempt_directory(out: str) -> None:
    invalid({"name": "t", "command": ["x"], "outputs": [out]}, Task, r"outputs\[0\]: ")


def test_task_env_names_and_duplicate_dependencies() -> None:
    invalid({"name": "t", "command": ["x"], "env": {"1BAD": "v"}}, Task, r"at `key` in `\$.env`")
    invalid({"name": "t", "command": ["x"], "depends_on": ["a", "a"]}, Task, "twice")


@pytest.mark.parametrize("name", ["", "-lead", "has space", "a/b", "x" * 129])
def test_task_name_pattern(name: str) -> None:
    invalid({"name": name, "command": ["x"]}, Task, r"\$\.name")


def test_experiment_and_policy_defaults() -> None:
    exp = convert(
        {"experiment": {"name": "e"}, "tasks": [{"name": "t", "command": ["x"]}]}, Experiment
    )
    assert exp.name == "e"
    assert exp.policy is None
    assert Policy().max_sweep_size == 1_000_000
    assert to_builtins(exp)["tasks"][0]["resources"]["memory"] == GiB  # type: ignore[index]


def test_project_config_defaults_and_checks() -> None:
    p = ProjectConfig()
    assert p.project.name == "default"
    assert p.providers == {"local": LocalProviderConfig()}
    invalid({"providers": {}}, ProjectConfig, "configure at least one provider")
    cfg = convert({"providers": {"lab": {"kind": "local", "memory": "2GiB"}}}, ProjectConfig)
    lab = cfg.providers["lab"]
    assert isinstance(lab, LocalProviderConfig)
    assert lab.memory == 2 * GiB
    invalid({"providers": {"x": {"kind": "warp"}}}, ProjectConfig, "Invalid value 'warp'")
