"""Declared outputs on real files (``scan_outputs``), and the facts that tell an OOM kill from
an outside one, read from real and hand-written cgroup and kernel-log files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stowplan.providers.launcher import (
    oom_counter_file,
    oom_killed_pids,
    read_kmsg,
    read_oom_kills,
    scan_outputs,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "attempt"
    d.mkdir()
    (d / "spec.json").write_text('{"env": {"TOKEN": "secret"}}')
    return d


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_directory_stands_for_every_file_under_it(root: Path) -> None:
    write(root / "d" / "a.txt", "a")
    write(root / "d" / "x", "x")
    write(root / "d" / "sub" / "b.txt", "b")
    (root / "d" / "empty").mkdir()
    write(root / "m.json", "{}")
    scan = scan_outputs(root, ["d/x", "d/", "m.json"])
    assert (scan.missing, scan.refused) == ([], [])
    assert scan.files == {
        "d/a.txt": root / "d" / "a.txt",
        "d/sub/b.txt": root / "d" / "sub" / "b.txt",
        "d/x": root / "d" / "x",
        "m.json": root / "m.json",
    }
    # without the slash, the same; an empty directory gives no artifact and is not missing
    assert scan_outputs(root, ["d"]).files == {
        k: v for k, v in scan.files.items() if k.startswith("d/")
    }
    assert scan_outputs(root, ["d/empty/"]) == ({}, [], [])


def test_missing_and_wrongly_typed_outputs(root: Path) -> None:
    write(root / "f.txt", "f")
    os.mkfifo(root / "pipe")
    (root / "d").mkdir()
    os.mkfifo(root / "d" / "pipe")
    scan = scan_outputs(root, ["nope", "gone/", "f.txt/", "pipe", "d/"])
    assert scan.files == {}
    assert scan.missing == ["nope", "gone/"]
    assert scan.refused == [
        "f.txt/: declared as a directory, but is a file",
        "pipe: is a FIFO, not a regular file or a directory",
        "d/pipe: is a FIFO, not a regular file or a directory",
    ]


def test_links_that_leave_the_attempt_directory_are_refused(root: Path, tmp_path: Path) -> None:
    secret = write(tmp_path / "hostname", "not yours")
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "elsewhere" / "out.txt", "not yours either")
    (root / "out.txt").symlink_to(secret)
    (root / "via").symlink_to(tmp_path / "elsewhere")
    (root / "d").mkdir()
    write(root / "d" / "ok.txt", "ok")
    (root / "d" / "leak").symlink_to(secret)
    scan = scan_outputs(root, ["out.txt", "via/out.txt", "via/", "d/"])
    assert scan.files == {"d/ok.txt": root / "d" / "ok.txt"}
    real = Path(os.path.realpath(tmp_path))
    assert scan.refused == [
        f"out.txt: leads to {real / 'hostname'}, outside the attempt directory",
        f"via/out.txt: leads to {real / 'elsewhere' / 'out.txt'}, outside the attempt directory",
        f"via/: leads to {real / 'elsewhere'}, outside the attempt directory",
        f"d/leak: leads to {real / 'hostname'}, outside the attempt directory",
    ]


def test_links_into_stowplans_own_files_or_the_attempt_directory_are_refused(
    root: Path,
) -> None:
    (root / "s.json").symlink_to(root / "spec.json")
    (root / "all").symlink_to(root)
    (root / "d").mkdir()
    (root / "d" / "up").symlink_to("..")
    (root / "d" / "self").symlink_to(".")
    scan = scan_outputs(root, ["s.json", "all/", "d/"])
    assert scan.files == {}
    assert scan.refused == [
        "s.json: leads to stowplan's own spec.json",
        "all/: leads to the attempt directory itself",
        "d/self: a symbolic link loop",
        "d/up: leads to the attempt directory itself",
    ]


def test_links_that_stay_inside_are_stored_as_what_they_lead_to(root: Path) -> None:
    real = Path(os.path.realpath(root))
    write(root / "ckpt" / "step-2" / "w.bin", "w2")
    (root / "ckpt" / "latest").symlink_to("step-2")
    (root / "out.txt").symlink_to("ckpt/step-2/w.bin")
    (root / "ckpt" / "dangling").symlink_to("nowhere")
    scan = scan_outputs(root, ["out.txt", "ckpt/latest/w.bin", "ckpt/"])
    assert scan.files == {
        "out.txt": real / "ckpt" / "step-2" / "w.bin",
        "ckpt/latest/w.bin": real / "ckpt" / "step-2" / "w.bin",
        "ckpt/step-2/w.bin": real / "ckpt" / "step-2" / "w.bin",
    }
    assert scan.refused == [
        f"ckpt/dangling: a symbolic link to {real / 'ckpt' / 'nowhere'}, which does not exist"
    ]


# -- OOM evidence ------------------------------------------------------------------------------

# Captured from a real kernel (6.x) after a cgroup OOM kill, and unrelated records around it.
KMSG = [
    "6,2001,4000000,-;python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0",
    "6,2002,4000100,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,"
    "mems_allowed=0,oom_memcg=/stowplan-t,task_memcg=/stowplan-t,task=python3,pid=4242,uid=0",
    "3,2003,4000200,-;Memory cgroup out of memory: Killed process 4242 (python3) "
    "total-vm:400000kB, anon-rss:300000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:800kB",
    "3,2004,9000000,-;Out of memory: Killed process 777 (java) total-vm:1kB, anon-rss:1kB",
    "6,2005,9000100,-;EXT4-fs (vda): mounted filesystem with ordered data mode.",
    "garbage without a header",
]


V2_EVENTS = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"


def test_oom_killed_pids_from_kernel_records() -> None:
    assert oom_killed_pids(KMSG) == {4242, 777}
    assert oom_killed_pids(KMSG, since_us=5_000_000) == {777}
    assert oom_killed_pids(["6,1,0,-;Killed process"]) == set()


def test_read_kmsg_of_a_missing_log_is_unknown(tmp_path: Path) -> None:
    assert read_kmsg(tmp_path / "no-kmsg") is None


@pytest.mark.parametrize(
    ("proc", "files", "counter", "count"),
    [
        # cgroup v2: the unified hierarchy's memory.events
        (
            "0::/user.slice/session-1.scope\n",
            {"user.slice/session-1.scope/memory.events": V2_EVENTS},
            "user.slice/session-1.scope/memory.events",
            2,
        ),
        # cgroup v1 (this very machine's layout): the memory controller's oom_control
        (
            "9:name=systemd:/\n4:memory:/process_api/5d3a\n1:cpu:/\n0::/\n",
            {"memory/process_api/5d3a/memory.oom_control": V1_OOM_CONTROL},
            "memory/process_api/5d3a/memory.oom_control",
            5,
        ),
        # a namespaced v2 root, with the counter readable at the mount itself
        ("0::/\n", {"memory.events": "oom 0\noom_kill 0\n"}, "memory.events", 0),
        # nothing readable
        ("0::/gone\n", {}, None, None),
    ],
)
def test_the_cgroup_oom_counter(
    tmp_path: Path,
    proc: str,
    files: dict[str, str],
    counter: str | None,
    count: int | None,
) -> None:
    mount = tmp_path / "cgroup"
    for rel, text in files.items():
        write(mount / rel, text)
    proc_file = write(tmp_path / "proc-self-cgroup", proc)
    found = oom_counter_file(proc_file, mount)
    assert found == (None if counter is None else mount / counter)
    assert read_oom_kills(found) == count


def test_the_cgroup_oom_counter_of_this_process_is_read_or_unknown() -> None:
    # Whatever this machine has: a number where a counter is readable, else None; never raises.
    count = read_oom_kills(oom_counter_file())
    assert count is None or count >= 0
