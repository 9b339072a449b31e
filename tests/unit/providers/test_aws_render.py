"""RunInstances requests and user-data scripts: golden renderings, and the real script run by
bash against file:// URLs (curl reads and writes them as it does presigned S3 URLs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from stowplan.errors import ProviderError
from stowplan.placement.problem import Pool, Shape
from stowplan.providers.aws import AwsProvider, AwsRequest
from stowplan.providers.aws.render import (
    URL_END,
    USER_DATA_MAX,
    inbox_line,
    payload_of,
    plan_agent,
)
from stowplan.providers.aws.states import ExitRecord, parse_status
from stowplan.providers.base import Facts, LaunchSpec
from stowplan.spec.models import AwsProviderConfig

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NEEDS_CURL = pytest.mark.skipif(
    shutil.which("curl") is None and not CI,
    reason="the user-data script and the agent need curl (in CI its absence fails the test)",
)
"""Outside CI a machine without curl skips these; in CI they run and fail without it."""

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "aws" / "golden"
KEY = "0123456789abcdef0123456789abcdef"
POOL = "cloud/us-east-1/g5.xlarge/spot"


def config(**kw: object) -> AwsProviderConfig:
    base: dict[str, object] = {
        "kind": "aws",
        "regions": ["us-east-1"],
        "bucket": "s3://lab-bucket/sp",
        "ami": "/aws/service/deeplearning/ami/latest",
        "spot": "prefer",
        "security_groups": ["sg-0123456789abcdef0"],
        "instance_profile": "stowplan-instance",
    }
    return msgspec.convert({**base, **kw}, AwsProviderConfig)


def driver(tmp_path: Path, **kw: object) -> AwsProvider:
    return AwsProvider("cloud", config(**kw), state_dir=tmp_path / ".stowplan", project="lab")


FACTS = Facts.of(
    [
        Pool(
            id=POOL,
            provider="cloud",
            kind="cloud",
            node=Shape(cpus=4, memory=16 << 30, gpus={"a10g": 1}),
            max_instances=8,
            spot=True,
            hardware_class="aws:g5.xlarge",
        )
    ]
)


def launch(**kw: object) -> LaunchSpec:
    base: dict[str, object] = {
        "key": KEY,
        "run_id": "r-2026-abc",
        "attempt": 0,
        "pool": POOL,
        "name": "train",
        "argv": ["python", "train.py", "--lr", "0.1"],
        "env": {"WANDB_MODE": "offline"},
        "gpus": 1,
        "timeout_s": 3600.0,
        "outputs": ["metrics.json", "ckpt/"],
        "files": {"params.json": b'{"lr": 0.1}'},
    }
    return msgspec.convert({**base, **kw}, LaunchSpec)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("STOWPLAN_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing; STOWPLAN_UPDATE_GOLDEN=1 writes it (review it!)"
    assert text == path.read_text()


def test_attempt_request_golden_and_pure(tmp_path: Path) -> None:
    d = driver(tmp_path)
    (req,) = d.plan([launch()], FACTS)
    assert isinstance(req, AwsRequest)
    check_golden("attempt_spot_gpu.txt", req.render())
    again = driver(tmp_path).plan([launch()], FACTS)[0]
    assert again == req  # pure: the same launches and facts give the same request
    assert (req.pool, req.gpus, req.cpus) == (POOL, 1, 1.0)
    assert req.slots["payload"] == ("GET", f"sp/attempts/r-2026-abc/{KEY}/payload.tar.gz")
    assert req.outputs == {
        "metrics.json": f"sp/attempts/r-2026-abc/{KEY}/outputs/metrics.json",
        "ckpt/": f"sp/attempts/r-2026-abc/{KEY}/outputs/ckpt.tar.gz",
    }
    assert req.claim_key == f"sp/claims/r-2026-abc/{KEY}.json"
    assert "run.sh" not in req.render()  # the script travels in its inbox line


def test_agent_request_golden(tmp_path: Path) -> None:
    req = plan_agent(
        provider="cloud", project="lab", config=config(), pool=POOL, agent="p-0123abcd-1"
    )
    check_golden("agent_spot.txt", req.render())
    p = req.params
    assert (
        p["ClientToken"] == "p-0123abcd-1" and p["InstanceInitiatedShutdownBehavior"] == "terminate"
    )
    assert p["InstanceMarketOptions"]["MarketType"] == "spot"
    tags = {t["Key"]: t["Value"] for t in p["TagSpecifications"][0]["Tags"]}
    assert tags["stowplan:agent"] == "p-0123abcd-1" and tags["stowplan:token"] == "p-0123abcd"
    assert tags["stowplan:pool"] == POOL and tags["stowplan:provider"] == "cloud"
    assert tags["stowplan:project"] == "lab"
    assert p["ImageId"] == "resolve:ssm:/aws/service/deeplearning/ami/latest"
    assert "UserData" not in p and "SubnetId" not in p  # both filled at launch
    assert len(req.user_data("u" * 2000, "v" * 2000).encode()) <= USER_DATA_MAX
    assert (req.inbox_key, req.status_key) == (
        "sp/agents/p-0123abcd-1/inbox",
        "sp/agents/p-0123abcd-1/status",
    )
    od = plan_agent(
        provider="cloud",
        project="lab",
        config=config(spot="never", security_groups=[], instance_profile=None),
        pool="cloud/us-east-1/g5.xlarge",
        agent="p-0123abcd-0",
    )
    assert "InstanceMarketOptions" not in od.params
    check_golden("agent_on_demand.txt", od.render())


def test_long_arguments_need_no_room_in_user_data(tmp_path: Path) -> None:
    # the attempt script is an S3 object: EC2's 16 KiB user-data limit does not apply
    (req,) = driver(tmp_path).plan([launch(env={"A": "x" * 20000})], FACTS)
    assert isinstance(req, AwsRequest) and "x" * 20000 in req.script


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"pool": "cloud"}, "not an instance type"),
        ({"pool": "other/us-east-1/g5.xlarge"}, "not an instance type"),
        ({"pool": "cloud/eu-west-1/g5.xlarge"}, "not configured"),
        ({"gpus": 2}, "1 GPU(s), 2 asked"),
        ({"image": "python:3.12"}, "AMI"),
        ({"run_id": "../x"}, "run id"),
        ({"files": {"../x": b""}}, "relative path"),
        ({"cpus": 8.0}, "vCPUs"),
    ],
)
def test_plan_refuses_what_it_cannot_launch(
    tmp_path: Path, change: dict[str, object], words: str
) -> None:
    with pytest.raises(ProviderError) as e:
        driver(tmp_path).plan([launch(**change)], FACTS)
    assert not e.value.retryable and words in str(e.value)


def test_the_payload_depends_on_names_and_contents_alone() -> None:
    a = payload_of({"b": b"2", "a": b"1"})
    assert a == payload_of({"a": b"1", "b": b"2"}) and a != payload_of({"a": b"1"})


# ---- the script itself, run by bash ---------------------------------------------------------

HOSTILE = [
    "$(touch PWNED1)",
    "`touch PWNED2`",
    "'; touch PWNED3; '",
    '"; touch PWNED4; "',
    "a\nb; touch PWNED5",
    "\\",
    "${HOME}",
    "-rf",
    "--",
    "",
    "tab\there",
    "ünï $'\\x41'",
    "# not a comment",
    "STOWPLAN_URL_exit=x",
    "@@",
]


def run_script(
    tmp_path: Path, req: AwsRequest, payload: bytes | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the user-data exactly as an instance would, with file:// URLs for the S3 objects."""
    store = tmp_path / "s3"
    urls = {}
    for slot, (_method, key) in req.slots.items():
        (store / key).parent.mkdir(parents=True, exist_ok=True)
        urls[slot] = (store / key).as_uri()
    if payload is not None:
        (store / req.slots["payload"][1]).write_bytes(payload)
    script = tmp_path / "user-data"
    text = req.user_data(urls)
    assert len(text.encode()) <= USER_DATA_MAX
    script.write_text(text)
    halt = tmp_path / "halt"
    halt.write_text(f"#!/bin/sh\necho halted >> {tmp_path / 'halted'}\n")
    halt.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "home"),
        "STOWPLAN_ROOT": str(tmp_path / "root"),
        "STOWPLAN_HALT": str(halt),
    }
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(
        ["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    return done, store


def exit_record(store: Path, req: AwsRequest) -> ExitRecord:
    return msgspec.json.decode((store / req.exit_key).read_bytes(), type=ExitRecord)


@NEEDS_CURL
def test_hostile_names_args_and_env_run_nothing_they_should_not(tmp_path: Path) -> None:
    program = (
        'printf "%s\\n" "$@" > args.txt; printf %s "$EVIL" > env.txt; '
        'printf %s "$TASK_NAME" > name.txt; cp args.txt "$1"'
    )
    evil_out = "out; touch PWNED6 $(touch PWNED7)"
    req = driver(tmp_path, idle_shutdown=1).plan(
        [
            launch(
                name="x'; touch PWNED8; echo '\n$(touch PWNED9)",
                argv=["bash", "-c", program, "arg0", evil_out, *HOSTILE],
                env={"EVIL": "$(touch PWNED10)\n'\"`touch PWNED11`", "TASK_NAME": "`id`"},
                outputs=[evil_out],
                files={},
                timeout_s=60.0,
            )
        ],
        FACTS,
    )[0]
    assert isinstance(req, AwsRequest)
    # the URL lines come first and are ours: the first end marker is the script's own
    head = req.user_data({s: "u" for s in req.slots}).split(URL_END, 1)[0]
    assert all(line.startswith(("#", "STOWPLAN_URL_")) for line in head.splitlines())
    done, store = run_script(tmp_path, req)
    assert done.returncode == 0, done.stderr
    assert not [p for p in tmp_path.rglob("PWNED*")], "a hostile string ran"
    attempt = tmp_path / "root" / "runs" / "r-2026-abc" / "0"
    assert (attempt / "args.txt").read_text() == "".join(a + "\n" for a in [evil_out, *HOSTILE])
    assert (attempt / "env.txt").read_text() == "$(touch PWNED10)\n'\"`touch PWNED11`"
    assert (attempt / "name.txt").read_text() == "`id`"
    record = exit_record(store, req)
    assert (record.key, record.exit_code, record.reason) == (KEY, 0, "exit")
    assert (store / req.outputs[evil_out]).read_text() == (attempt / "args.txt").read_text()


@NEEDS_CURL
def test_payload_outputs_logs_and_a_failing_command(tmp_path: Path) -> None:
    script = (
        "cat params.json; echo oops >&2; mkdir -p ckpt; echo w > ckpt/w.bin; "
        'echo "{\\"loss\\": 1}" > metrics.json; test "$STOWPLAN_KEY" = ' + KEY
    )
    req = driver(tmp_path, idle_shutdown=1).plan([launch(argv=None, script=script, env={})], FACTS)[
        0
    ]
    assert isinstance(req, AwsRequest) and req.payload is not None
    done, store = run_script(tmp_path, req, req.payload)
    assert done.returncode == 0, done.stderr
    assert exit_record(store, req).exit_code == 0
    here = store / f"sp/attempts/r-2026-abc/{KEY}"
    assert (here / "stdout").read_text() == '{"lr": 0.1}'
    assert (here / "stderr").read_text() == "oops\n"
    assert json.loads((here / "outputs" / "metrics.json").read_text()) == {"loss": 1}
    listed = subprocess.run(
        ["tar", "-tzf", str(here / "outputs" / "ckpt.tar.gz")], capture_output=True, text=True
    )
    assert "ckpt/w.bin" in listed.stdout.split()


@NEEDS_CURL
@pytest.mark.parametrize(
    ("argv", "timeout", "code", "reason"),
    [
        (["bash", "-c", "exit 3"], 60.0, 3, "exit"),
        (["bash", "-c", "true"], 60.0, 1, "outputs"),  # declared outputs missing
        (["sleep", "30"], 1.0, 124, "timeout"),
    ],
)
def test_failures_are_recorded(
    tmp_path: Path, argv: list[str], timeout: float, code: int, reason: str
) -> None:
    req = driver(tmp_path, idle_shutdown=1).plan(
        [launch(argv=argv, timeout_s=timeout, files={})], FACTS
    )[0]
    assert isinstance(req, AwsRequest)
    done, store = run_script(tmp_path, req)
    record = exit_record(store, req)
    assert (done.returncode, record.exit_code, record.reason) == (code, code, reason)


@NEEDS_CURL
def test_a_payload_that_cannot_be_fetched_is_a_setup_failure(tmp_path: Path) -> None:
    req = driver(tmp_path, idle_shutdown=1).plan([launch()], FACTS)[0]
    assert isinstance(req, AwsRequest)
    _done, store = run_script(tmp_path, req, payload=None)  # nothing at the payload URL
    record = exit_record(store, req)
    assert (record.exit_code, record.reason) == (70, "setup")


def run_agent(
    tmp_path: Path, inbox: list[str], *, spot: bool = False, imds: str | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run an agent's user-data with file:// URLs for its inbox and status until it idles
    out; (its run, the store)."""
    store = tmp_path / "s3"
    store.mkdir(exist_ok=True)
    (store / "inbox").write_text("".join(line + "\n" for line in inbox))
    req = plan_agent(
        provider="cloud",
        project="lab",
        config=config(idle_shutdown=1),
        pool=POOL if spot else "cloud/us-east-1/g5.xlarge",
        agent="p-ab-0",
    )
    script = tmp_path / "agent.sh"
    script.write_text(req.user_data((store / "inbox").as_uri(), (store / "status").as_uri()))
    halt = tmp_path / "halt"
    halt.write_text(f"#!/bin/sh\necho halted >> {tmp_path / 'halted'}\n")
    halt.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "STOWPLAN_ROOT": str(tmp_path / "root"),
        "STOWPLAN_HALT": str(halt),
        "STOWPLAN_POLL": "0.1",
        **({"STOWPLAN_IMDS": imds} if imds else {}),
    }
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(
        ["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    return done, store


@NEEDS_CURL
def test_the_agent_reads_its_inbox_as_data(tmp_path: Path) -> None:
    """Hostile inbox lines run nothing; a well-formed one runs its attempt (carried in the
    line) once, the agent records what it did in its status, and halts when idle."""
    store = tmp_path / "s3"
    store.mkdir()
    script = "#!/bin/bash\necho ran >> " + str(tmp_path / "ran") + "\n"
    urls = {
        "claim": (store / "claim").as_uri(),
        "claimed": (store / "claim").as_uri(),
        "exit": (store / "exit").as_uri(),
    }
    good = inbox_line(4, KEY, urls, script)
    undecodable = re.sub(
        r"code=\S+",
        "code=$(touch PWNED5)",
        inbox_line(6, "f" * 32, {**urls, "claim": (store / "c2").as_uri()}, script),
    )
    (store / "other").write_text('{"key":"x","agent":"p-other-0","at":1}\n')
    taken = {  # S3 refuses the claim (file:// cannot: a PUT that fails), another agent has it
        "claim": (store / "no" / "such" / "dir").as_uri(),
        "claimed": (store / "other").as_uri(),
    }
    done, store = run_agent(
        tmp_path,
        [
            "1 run $(touch PWNED1) " + good.split(" ", 3)[3],
            "2 run `touch PWNED2` " + good.split(" ", 3)[3],
            "x; touch PWNED3 run " + KEY,
            "3 cancel $(touch PWNED4)",
            good,
            "5 bogus " + KEY,
            undecodable,
            inbox_line(7, "e" * 32, {**urls, "claim": (store / "c3").as_uri()}, script),
            inbox_line(8, "d" * 32, {**urls, **taken}, script),
        ],
    )
    assert done.returncode == 0, done.stderr
    assert not [p for p in tmp_path.rglob("PWNED*")], "a hostile inbox line ran"
    assert (tmp_path / "halted").read_text() == "halted\n"
    # the well-formed lines ran their script, once each
    assert (tmp_path / "ran").read_text() == "ran\nran\n"
    assert b'"agent":"p-ab-0"' in (store / "c2").read_bytes()
    # line 6's script could not be decoded: a setup exit record
    record = msgspec.json.decode((store / "exit").read_bytes(), type=ExitRecord)
    assert (record.key, record.exit_code, record.reason) == ("f" * 32, 70, "setup")
    status = parse_status((store / "status").read_text())
    assert status.claimed == {KEY, "f" * 32, "e" * 32} and status.refused == {"d" * 32}
    assert status.exits["f" * 32].reason == "setup" and not status.noticed
    # a script without an exit record of its own (not the attempt script) ended
    assert status.ended == {KEY, "e" * 32}


@NEEDS_CURL
def test_a_spot_notice_preempts_what_runs_and_takes_nothing_new(tmp_path: Path) -> None:
    """The agent of a spot instance asks IMDSv2 for the interruption notice; when it comes,
    it kills what runs, writes its exit record (``preempted``), notes the notice and takes
    nothing new, then idles out."""
    from tests.integration.aws.harness import FakeImds

    store = tmp_path / "s3"
    store.mkdir()
    urls = {
        "claim": (store / "claim").as_uri(),
        "claimed": (store / "claim").as_uri(),
        "exit": (store / "exit").as_uri(),
    }
    later = {**urls, "claim": (store / "claim2").as_uri(), "exit": (store / "exit2").as_uri()}
    (store / "inbox").write_text(inbox_line(1, KEY, urls, "#!/bin/bash\nexec sleep 60\n") + "\n")
    req = plan_agent(
        provider="cloud", project="lab", config=config(idle_shutdown=1), pool=POOL, agent="p-ab-0"
    )
    script = tmp_path / "agent.sh"
    script.write_text(req.user_data((store / "inbox").as_uri(), (store / "status").as_uri()))
    halt = tmp_path / "halt"
    halt.write_text(f"#!/bin/sh\necho halted >> {tmp_path / 'halted'}\n")
    halt.chmod(0o755)
    imds = FakeImds()
    try:
        env = {
            "PATH": os.environ["PATH"],
            "STOWPLAN_ROOT": str(tmp_path / "root"),
            "STOWPLAN_HALT": str(halt),
            "STOWPLAN_POLL": "0.1",
            "STOWPLAN_IMDS": imds.base("i-1"),
        }
        agent = subprocess.Popen(
            ["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 30
            while "claimed" not in _read(store / "status"):
                assert time.monotonic() < deadline and agent.poll() is None
                time.sleep(0.05)
            assert imds.asked["i-1"] > 0
            imds.notice("i-1")
            with (store / "inbox").open("a") as f:  # sent after the notice: never taken
                f.write(inbox_line(2, "f" * 32, later, "#!/bin/bash\ntouch PWNED\n") + "\n")
            _, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
        finally:
            agent.kill()
            agent.communicate()
    finally:
        imds.close()
    record = msgspec.json.decode((store / "exit").read_bytes(), type=ExitRecord)
    assert (record.key, record.exit_code, record.reason) == (KEY, 143, "preempted")
    st = parse_status((store / "status").read_text())
    assert st.noticed and st.exits[KEY].reason == "preempted" and st.claimed == {KEY}
    assert not (store / "claim2").exists() and not list(tmp_path.rglob("PWNED"))
    assert (tmp_path / "halted").read_text() == "halted\n"


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@NEEDS_CURL
def test_a_line_sent_after_another_waits_unclaimed_until_that_one_ends(tmp_path: Path) -> None:
    """``after=KEY``: the agent holds the line, unclaimed, while KEY runs there, then takes it;
    a line after an attempt that does not run there is taken at once; a held line that is
    cancelled never runs."""
    store = tmp_path / "s3"
    store.mkdir()
    log = tmp_path / "log"

    def line(seq: int, key: str, script: str, after: str | None = None) -> str:
        urls = {
            "claim": (store / f"claim-{key}").as_uri(),
            "claimed": (store / f"claim-{key}").as_uri(),
            "exit": (store / f"exit-{key}").as_uri(),
        }
        return inbox_line(seq, key, urls, f"#!/bin/bash\n{script}\n", after=after)

    first, second, free, dropped = "a" * 32, "b" * 32, "c" * 32, "d" * 32
    done, store = run_agent(
        tmp_path,
        [
            line(1, first, f"echo first-start >> {log}; sleep 1; echo first-end >> {log}"),
            line(2, second, f"echo second >> {log}", after=first),
            line(3, free, f"echo free >> {log}", after="e" * 32),  # not there: at once
            line(4, dropped, f"echo dropped >> {log}", after=first),
            f"5 cancel {dropped}",
        ],
    )
    assert done.returncode == 0, done.stderr
    order = log.read_text().split()
    assert sorted(order) == ["first-end", "first-start", "free", "second"], order
    assert order.index("free") < order.index("first-end") < order.index("second")
    status = parse_status((store / "status").read_text())
    assert status.claimed == {first, second, free}
    assert not (store / f"claim-{dropped}").exists()
