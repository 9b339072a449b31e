"""The ``--server`` client's pure parts: the server-sent event parser and what a submission
sends beside its experiment file."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.service.client import _events, experiment_files


def test_events_are_split_on_blank_lines_and_keep_their_id() -> None:
    lines = [
        ": a comment",
        "event: chunk",
        "id: 12",
        "data: aGVsbG8K",
        "",
        "",  # a second blank line dispatches nothing
        "data: one",
        "data:two",
        "",
        "event: end",
        "id: 12",
        "data: ",
        "",
        "event: chunk",  # cut off before its blank line: never dispatched
        "data: partial",
    ]
    got = [(e.event, e.id, e.data) for e in _events(iter(lines))]
    assert got == [("chunk", "12", "aGVsbG8K"), ("message", None, "one\ntwo"), ("end", "12", "")]


def test_experiment_files_leave_out_hidden_and_the_file_itself(tmp_path: Path) -> None:
    (tmp_path / "exp.toml").write_text("x")
    (tmp_path / "work.py").write_text("print(1)")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("1,2")
    for hidden in (".git/HEAD", ".stowplan/stowplan.db", "__pycache__/w.pyc"):
        (tmp_path / hidden).parent.mkdir(exist_ok=True)
        (tmp_path / hidden).write_text("no")
    got = experiment_files(tmp_path / "exp.toml", limit=1 << 20)
    assert got == {"data/a.csv": b"1,2", "work.py": b"print(1)"}


def test_experiment_files_refuse_too_much_and_names_that_cannot_travel(tmp_path: Path) -> None:
    (tmp_path / "exp.toml").write_text("x")
    (tmp_path / "big.bin").write_bytes(b"x" * 2000)
    with pytest.raises(SpecError, match="add up to more than"):
        experiment_files(tmp_path / "exp.toml", limit=1000)
    (tmp_path / "big.bin").unlink()
    (tmp_path / "a file.py").write_text("")
    with pytest.raises(SpecError, match="cannot be sent"):
        experiment_files(tmp_path / "exp.toml", limit=1000)


def test_logs_follow_says_on_stderr_that_it_reconnects_while_the_service_is_away(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stream cut mid-log, then no answer, then the rest: the log is written once, whole,
    and standard error says once that the service went away and once that it is back."""
    import base64

    import httpx

    from stowplan.service import client

    def chunk(data: bytes, end: int) -> str:
        return f"event: chunk\nid: {end}\ndata: {base64.b64encode(data).decode()}\n\n"

    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        if len(seen) == 1:  # cut before the end event
            return httpx.Response(200, text=chunk(b"one\n", 4))
        if len(seen) in (2, 3):
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, text=chunk(b"two\n", 8) + "event: end\ndata: \n\n")

    def fake_client(url: str, *, timeout: float | None = None) -> httpx.Client:
        return httpx.Client(base_url=url, transport=httpx.MockTransport(answer))

    monkeypatch.setattr(client, "_client", fake_client)
    out: list[bytes] = []
    client.follow_logs("http://lab:8470", "abcdef12", out.append, follow=True, sleep=lambda s: None)
    assert b"".join(out) == b"one\ntwo\n"
    assert seen == [None, "4", "4", "4"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert "went away" in err[0] and "reconnecting" in err[0], err
    assert err[1] == "reconnected to http://lab:8470: the log goes on after byte 4", err
