"""What the queue actor decodes of a submission: the core's part at once, the launch when an
attempt is launched, and nothing of ``RunPayload`` lost on the way."""

from __future__ import annotations

import msgspec

from stowplan.actors.queue import SubmittedRun
from stowplan.actors.wire import pack, unpack
from stowplan.scheduler.events import TaskInstance
from stowplan.scheduler.plan import Launch, RunPayload


def payload(i: int) -> RunPayload:
    return RunPayload(
        instance=TaskInstance(run_id=f"{i:064x}", cpus=2.0, group="sweep"),
        launch=Launch(
            argv=["python", "train.py", str(i)],
            script=None,
            env={"SEED": str(i)},
            outputs=[],
            timeout_s=None,
        ),
        name=f"exp-train-{i}",
    )


def test_a_submitted_run_has_every_field_of_a_payload() -> None:
    # a field added to RunPayload and not here would be dropped without a word
    assert [f.name for f in msgspec.structs.fields(SubmittedRun)] == [
        f.name for f in msgspec.structs.fields(RunPayload)
    ]


def test_a_submission_decodes_to_the_same_payloads_with_the_launch_kept_encoded() -> None:
    runs = [payload(i) for i in range(3)]
    got = unpack(pack(runs), list[SubmittedRun])
    assert [g.instance for g in got] == [r.instance for r in runs]
    assert [g.run_id for g in got] == [r.run_id for r in runs]
    assert all(isinstance(g.launch, msgspec.Raw) for g in got)
    assert [g.payload() for g in got] == runs
