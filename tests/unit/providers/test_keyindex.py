"""The shared key index of array-style drivers: write-ahead, torn lines, find before submit."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import ProviderError
from stowplan.providers.keyindex import KeyIndex, Member, submit_once

pytestmark = pytest.mark.anyio


def members(name: str, *keys: str) -> list[Member]:
    return [
        Member(key=k, request=name, index=i, outputs=["o.txt"], where={"dir": f"/r/{k}"})
        for i, k in enumerate(keys)
    ]


class FakeProvider:
    """Jobs by name; ``lose`` makes the next submit start the job but lose the answer."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}
        self.submits = 0
        self.finds = 0
        self.lose = False

    async def submit(self, name: str) -> str:
        self.submits += 1
        self.jobs[name] = str(100 + len(self.jobs))
        if self.lose:
            self.lose = False
            raise ProviderError("the answer was lost", provider="p", retryable=True)
        return self.jobs[name]

    async def find(self, name: str) -> str | None:
        self.finds += 1
        return self.jobs.get(name)


def test_what_is_written_ahead_is_there_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "index.jsonl"
    index = KeyIndex(path)
    before = index.intend("arr", members("arr", "a", "b"), {"job_dir": "/w/arr"})
    assert before.tries == 0 and before.job_id is None
    again = KeyIndex(path)  # a new control plane: nothing in memory
    m = again.member("b")
    assert m is not None and (m.request, m.index, m.outputs) == ("arr", 1, ["o.txt"])
    assert m.where == {"dir": "/r/b"}
    rec = again.request("arr")
    assert rec is not None and rec.tries == 1 and rec.job_id is None and rec.tried_at > 0
    assert rec.where == {"job_dir": "/w/arr"}
    again.submitted("arr", "7")
    third = KeyIndex(path)
    assert third.request("arr") is not None
    assert third.request("arr").job_id == "7"  # type: ignore[union-attr]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    index = KeyIndex(path)
    index.intend("arr", members("arr", "a"))
    index.submitted("arr", "7")
    whole = path.read_bytes()
    index.intend("other", members("other", "b"))
    path.write_bytes(path.read_bytes()[: len(whole) + 20])  # the crash tore the next append
    again = KeyIndex(path)
    assert again.member("a") is not None and again.member("b") is None
    assert again.request("arr") is not None and again.request("arr").job_id == "7"  # type: ignore[union-attr]


def test_a_known_job_id_is_never_forgotten(tmp_path: Path) -> None:
    index = KeyIndex(tmp_path / "index.jsonl")
    index.intend("arr", members("arr", "a"))
    index.submitted("arr", "7")
    index.intend("arr", members("arr", "a"))  # tried again (a retry after the answer came)
    for i in (index, KeyIndex(tmp_path / "index.jsonl")):
        rec = i.request("arr")
        assert rec is not None and rec.job_id == "7" and rec.tries == 2


async def test_first_submit_does_not_look_up(tmp_path: Path) -> None:
    index, prov = KeyIndex(tmp_path / "i.jsonl"), FakeProvider()
    before = index.intend("arr", members("arr", "a"))
    assert await submit_once(index, before, lambda: prov.submit("arr"), prov.find) == "100"
    assert (prov.submits, prov.finds) == (1, 0)
    assert index.request("arr").job_id == "100"  # type: ignore[union-attr]


async def test_a_retry_after_a_lost_answer_finds_the_first_job(tmp_path: Path) -> None:
    path = tmp_path / "i.jsonl"
    index, prov = KeyIndex(path), FakeProvider()
    prov.lose = True
    before = index.intend("arr", members("arr", "a", "b"))
    with pytest.raises(ProviderError) as e:
        await submit_once(index, before, lambda: prov.submit("arr"), prov.find)
    assert e.value.retryable and prov.submits == 1  # one try, nothing retried here
    # the caller retries with the same keys, even from a restarted control plane
    index = KeyIndex(path)
    before = index.intend("arr", members("arr", "a", "b"))
    assert before.tries == 1
    assert await submit_once(index, before, lambda: prov.submit("arr"), prov.find) == "100"
    assert (prov.submits, prov.finds, len(prov.jobs)) == (1, 1, 1)


async def test_a_retry_whose_first_try_never_reached_the_provider_submits(
    tmp_path: Path,
) -> None:
    index, prov = KeyIndex(tmp_path / "i.jsonl"), FakeProvider()
    index.intend("arr", members("arr", "a"))  # the control plane died before the submit
    before = index.intend("arr", members("arr", "a"))
    assert await submit_once(index, before, lambda: prov.submit("arr"), prov.find) == "100"
    assert (prov.submits, prov.finds) == (1, 1)


async def test_a_known_job_id_is_not_submitted_or_looked_up_again(tmp_path: Path) -> None:
    index, prov = KeyIndex(tmp_path / "i.jsonl"), FakeProvider()
    before = index.intend("arr", members("arr", "a"))
    await submit_once(index, before, lambda: prov.submit("arr"), prov.find)
    before = index.intend("arr", members("arr", "a"))
    assert await submit_once(index, before, lambda: prov.submit("arr"), prov.find) == "100"
    assert (prov.submits, prov.finds) == (1, 0)


async def test_without_find_the_submit_itself_looks_up(tmp_path: Path) -> None:
    """A backend whose submit finds the name under a lock (Slurm over SSH) is given no find."""
    index, prov = KeyIndex(tmp_path / "i.jsonl"), FakeProvider()
    index.intend("arr", members("arr", "a"))
    before = index.intend("arr", members("arr", "a"))
    await submit_once(index, before, lambda: prov.submit("arr"), None)
    assert (prov.submits, prov.finds) == (1, 0)


def test_earlier_names_the_other_requests_a_key_was_tried_in(tmp_path: Path) -> None:
    index = KeyIndex(tmp_path / "i.jsonl")
    index.intend("big", members("big", "a", "b", "c"))
    index.intend("solo", members("solo", "d"))
    assert index.earlier("small", ["a", "c", "d", "e"]) == {"big": ["a", "c"], "solo": ["d"]}
    assert index.earlier("big", ["a", "b"]) == {}
    index.intend("small", members("small", "a", "c"))
    assert index.earlier("small", ["a", "c"]) == {}
    assert index.member("a").request == "small"  # type: ignore[union-attr]


def test_learn_records_what_was_found_elsewhere(tmp_path: Path) -> None:
    from stowplan.providers.keyindex import RequestRecord

    path = tmp_path / "i.jsonl"
    index = KeyIndex(path)
    index.learn(members("arr", "a"), [RequestRecord(name="arr", job_id="9", tries=1)])
    index.learn(members("arr", "a"), [RequestRecord(name="arr", job_id="9", tries=1)])
    assert len(path.read_bytes().splitlines()) == 2  # nothing new the second time
    assert KeyIndex(path).request("arr").job_id == "9"  # type: ignore[union-attr]
