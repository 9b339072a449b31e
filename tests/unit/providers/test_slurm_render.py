"""sbatch rendering: golden scripts, array grouping, time limits, and hostile input made inert.

The hostile-input tests run the rendered script with the real bash (array index set as Slurm
would) and check that the task received exactly its arguments and environment, and that
nothing else ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stowplan.errors import ProviderError
from stowplan.providers.base import LaunchSpec
from stowplan.providers.slurm.render import (
    SlurmRequest,
    array_name,
    bash_quote,
    format_time_limit,
    plan_arrays,
)
from stowplan.spec.units import parse_duration

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "slurm" / "golden"
HOSTILE = [
    "it's",
    'say "hi"',
    "$(touch pwned-subst)",
    "`touch pwned-backtick`",
    "a\nb",
    "line\n#SBATCH --partition=evil\ntouch pwned-newline",
    "; touch pwned-semicolon",
    "tab\there",
    "\\back\\slash",
    "${HOME}",
    "",
    "ünïcödé ✓",
    "\x1b[31mred",
]


def launch(i: int, **kw: object) -> LaunchSpec:
    base: dict[str, object] = {
        "key": f"{i:032x}",
        "run_id": f"run{i:04d}",
        "attempt": 1,
        "pool": "campus/cpu",
        "name": "train",
        "argv": ["python", "train.py", "--i", str(i)],
        "cpus": 2,
        "memory": 3 << 30,
        "timeout_s": 5400.0,
    }
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def plan(launches: list[LaunchSpec], **kw: object) -> list[SlurmRequest]:
    args: dict[str, object] = {"provider": "campus", "workdir": "/scratch/alice/sp"}
    args.update(kw)
    return plan_arrays(launches, **args)  # type: ignore[arg-type]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("STOWPLAN_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing; STOWPLAN_UPDATE_GOLDEN=1 writes it (review it!)"
    assert text == path.read_text()


def test_sweep_renders_one_array_golden() -> None:
    reqs = plan([launch(i) for i in range(3)], max_concurrent=2)
    assert len(reqs) == 1
    check_golden("array_cpu.sh", reqs[0].render())


def test_gpu_script_golden() -> None:
    reqs = plan(
        [launch(0, pool="campus/gpu", gpus=2, gpu_types=("a100", "fake"), timeout_s=None)],
        gpu_types={"campus/gpu": ("fake",)},
    )
    script = reqs[0].render()
    assert "#SBATCH --gres=gpu:fake:2\n" in script
    assert "--time" not in script
    check_golden("single_gpu.sh", script)


def test_hostile_script_golden() -> None:
    reqs = plan(
        [
            launch(
                0,
                name="x\n#SBATCH --qos=evil",
                argv=["printf", "%s|", *HOSTILE],
                env={"A": HOSTILE[2], "B": HOSTILE[5], "C": HOSTILE[0]},
                outputs=["out file.json"],
            )
        ]
    )
    check_golden("hostile.sh", reqs[0].render())


def test_index_to_trial_mapping_is_by_key_order() -> None:
    launches = [launch(i) for i in (5, 1, 3)]
    (req,) = plan(launches)
    assert [m.key for m in req.members] == sorted(x.key for x in launches)
    assert [m.index for m in req.members] == [0, 1, 2]
    script = req.render()
    for m in req.members:
        assert f"# stowplan-key {m.index} {m.key} {m.run_id} 1 []" in script
        assert f"#@@ {m.index}\n  # task train, run {m.run_id}" in script
    assert req.name == array_name("sp", [x.key for x in launches])
    assert req.keys == tuple(sorted(x.key for x in launches))


def test_shapes_and_partitions_split_arrays() -> None:
    launches = [
        launch(0),
        launch(1),
        launch(2, pool="campus/gpu", gpus=1),
        launch(3, cpus=4),
        launch(4, timeout_s=60.0),
        launch(5, memory=1 << 30),
    ]
    reqs = plan(launches)
    assert sorted(len(r.members) for r in reqs) == [1, 1, 1, 1, 2]
    assert {r.partition for r in reqs} == {"cpu", "gpu"}


def test_a_gang_asks_for_its_nodes_with_each_nodes_part() -> None:
    # totals of 2 nodes x (3 CPUs, 4 GiB, 2 GPUs): the script asks per node, one task each
    (req,) = plan([launch(0, pool="campus/gpu", cpus=6, memory=8 << 30, gpus=4, nodes=2)])
    script = req.render()
    for line in (
        "#SBATCH --nodes=2\n",
        "#SBATCH --ntasks-per-node=1\n",
        "#SBATCH --cpus-per-task=3\n",
        "#SBATCH --mem=4096M\n",
        "#SBATCH --gres=gpu:2\n",
    ):
        assert line in script, line
    assert "--ntasks=1" not in script
    # gangs of another size, and single-node runs, go in arrays of their own
    reqs = plan([launch(1, nodes=2), launch(2, nodes=3), launch(3), launch(4, nodes=2)])
    assert sorted(len(r.members) for r in reqs) == [1, 1, 2]


def test_max_array_size_chunks() -> None:
    reqs = plan([launch(i) for i in range(7)], max_array_size=3)
    assert [len(r.members) for r in reqs] == [3, 3, 1]
    assert "#SBATCH --array=0-2\n" in reqs[0].render()
    assert "#SBATCH --array=0\n" in reqs[2].render()
    assert len({r.name for r in reqs}) == 3


def test_plan_is_deterministic() -> None:
    launches = [launch(i) for i in range(10)]
    assert [r.render() for r in plan(launches)] == [r.render() for r in plan(launches[::-1])]


@pytest.mark.parametrize(
    ("seconds", "rendered"),
    [
        (1, "0-00:01:00"),
        (60, "0-00:01:00"),
        (61, "0-00:02:00"),
        (5400, "0-01:30:00"),
        (86400 + 3600, "1-01:00:00"),
        (3 * 86400, "3-00:00:00"),
    ],
)
def test_time_limit_is_explicit(seconds: float, rendered: str) -> None:
    assert format_time_limit(seconds) == rendered


def test_clock_durations_are_not_misread_by_slurm() -> None:
    # our spec reads "1:30" as 1 h 30 min; Slurm would read it as 1 min 30 s
    (req,) = plan([launch(0, timeout_s=parse_duration("1:30"))])
    assert "#SBATCH --time=0-01:30:00\n" in req.render()


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"argv": []}, "argv is empty"),
        ({"argv": None, "script": None}, "exactly one"),
        ({"env": {"BAD-NAME": "x"}}, "not a variable name"),
        ({"env": {"A": "x\0y"}}, "NUL"),
        ({"env": {"__sp_e": "/tmp/elsewhere"}}, "job script's own"),
        ({"argv": ["a\0b"]}, "NUL"),
        ({"outputs": ["../escape"]}, "relative path"),
        ({"outputs": ["/abs"]}, "relative path"),
        ({"run_id": "../x"}, "safe directory name"),
        ({"pool": "campus/cpu;rm"}, "partition"),
        ({"gpus": 1, "gpu_types": ("a100 --qos=x",)}, "GRES type"),
    ],
)
def test_rejects_what_slurm_cannot_take(kw: dict[str, object], why: str) -> None:
    with pytest.raises(ProviderError, match=why) as e:
        plan([launch(0, **kw)])
    assert not e.value.retryable


@pytest.mark.parametrize("s", HOSTILE)
def test_bash_quote_is_one_line_and_round_trips(s: str) -> None:
    q = bash_quote(s)
    assert "\n" not in q and "\r" not in q
    out = subprocess.run(["bash", "-c", f"printf %s {q}"], capture_output=True, check=True)
    assert out.stdout == s.encode()


def _run_script(script: str, tmp_path: Path, index: int = 0) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "job.sh"
    path.write_text(script)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SLURM_ARRAY_TASK_ID": str(index)}
    return subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True)


def _sbatch_options(script: str) -> list[str]:
    """The lines sbatch reads as options: #SBATCH lines before the first command."""
    out = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line)
        elif line.strip() and not line.startswith("#"):
            break
    return out


def test_hostile_input_is_inert_when_run(tmp_path: Path) -> None:
    if shutil.which("base64") is None:
        pytest.fail("base64 (coreutils) is needed to run rendered scripts")
    work = tmp_path / "work"
    (req,) = plan(
        [
            launch(
                0,
                name="x\n#SBATCH --qos=evil\ntouch pwned-name",
                argv=[
                    "sh",
                    "-c",
                    'printf "%s|" "$@"; printf "%s" "$A$B" > env.out',
                    "sh",
                    *HOSTILE,
                ],
                env={"A": HOSTILE[2], "B": HOSTILE[5]},
                files={"upstream.json": b"$(touch pwned-file)\n"},
            )
        ],
        workdir=str(work),
    )
    script = req.render()
    options = _sbatch_options(script)
    assert not any("evil" in o or "pwned" in o for o in options)
    assert all(o.startswith("#SBATCH --") for o in options)
    result = _run_script(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("|".join(HOSTILE) + "|").encode()
    attempt = work / "runs" / "run0000" / "1"
    assert (attempt / "env.out").read_text() == HOSTILE[2] + HOSTILE[5]
    assert (attempt / "upstream.json").read_bytes() == b"$(touch pwned-file)\n"
    created = {p.name for p in tmp_path.rglob("*")}
    assert not {n for n in created if n.startswith("pwned")}


def test_exit_code_and_missing_outputs(tmp_path: Path) -> None:
    (req,) = plan(
        [
            launch(0, argv=["sh", "-c", "exit 3"]),
            launch(1, argv=["true"], outputs=["metrics.json"]),
            launch(2, argv=["sh", "-c", "echo {} > metrics.json"], outputs=["metrics.json"]),
        ],
        workdir=str(tmp_path / "w"),
    )
    script = req.render()
    assert _run_script(script, tmp_path, 0).returncode == 3
    missing = _run_script(script, tmp_path, 1)
    assert missing.returncode == 1 and b"metrics.json is missing" in missing.stderr
    assert _run_script(script, tmp_path, 2).returncode == 0
    assert _run_script(script, tmp_path, 3).returncode == 70


def test_relative_workdir_is_under_home(tmp_path: Path) -> None:
    (req,) = plan([launch(0, argv=["sh", "-c", "pwd > where"])], workdir="jobs-here")
    assert _run_script(req.render(), tmp_path).returncode == 0
    assert (tmp_path / "jobs-here" / "runs" / "run0000" / "1" / "where").exists()


def test_an_output_leading_outside_the_attempt_directory_fails_the_job(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("not yours")
    argv = [
        "sh",
        "-c",
        f"ln -s {outside} esc && mkdir d && echo x > d/f && ln -s d/f inside && echo ok > plain",
    ]
    for outputs, rc in ((["plain", "inside", "d/"], 0), (["plain", "esc"], 1)):
        work = tmp_path / f"work{rc}"
        (req,) = plan([launch(0, argv=argv, outputs=outputs)], workdir=str(work))
        done = _run_script(req.render(), tmp_path)
        assert done.returncode == rc, done.stderr
        if rc:
            assert b"declared output esc leads outside the attempt directory" in done.stderr


def test_a_gpu_array_reads_the_binding_before_the_elements_own_lines() -> None:
    """The end record's GPUs and node are read from the environment slurmd gave the element,
    before its own lines export the task's environment (which may name them too); a CPU-only
    array reads no GPU variable at all (sbatch passes the submitter's environment on)."""
    gpu = plan([launch(0, pool="campus/gpu", gpus=1, env={"CUDA_VISIBLE_DEVICES": "7"})])[0]
    script = gpu.render()
    read = script.index("__sp_g=${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}")
    assert script.index("__sp_n=${SLURMD_NODENAME:-}") < script.index('. "$__sp_e"')
    assert read < script.index('. "$__sp_e"') < script.index("export CUDA_VISIBLE_DEVICES=7")
    cpu = plan([launch(1)])[0].render()
    assert "SLURM_JOB_GPUS" not in cpu and "CUDA_VISIBLE_DEVICES" not in cpu
