"""The simulator's what-if reports on the dashboard: ``stowplan whatif`` (a real process, the
shipped example cluster and workload) writes a report into the project's ``reports/``; a real
``stowplan serve --read-only`` lists it at ``/ui/reports``, shows its runs, changes, deltas and
plots to anyone logged in, and serves nothing outside the report's own folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.service.conftest import Service, auth, lab

pytestmark = pytest.mark.integration

CLUSTERS = Path(__file__).resolve().parents[3] / "examples" / "clusters"


@pytest.mark.timeout(300)
def test_a_whatif_report_is_listed_shown_and_its_plots_served(tmp_path: Path) -> None:
    tokens = lab(tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stowplan.cli.main",
            "whatif",
            str(CLUSTERS / "university-slurm.toml"),
            str(CLUSTERS / "sweep-workload.toml"),
            "--add",
            "pool=gpu-h100,count=8,like=gpu-a100,gpu_model=h100",
            "--policy",
            "greedy",
            "--out",
            "reports/more-h100",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    (tmp_path / "secret.svg").write_text("<svg>not a report's</svg>")
    svc = Service(tmp_path, read_only=True)
    try:
        svc.wait_healthy(60)
        with httpx.Client(base_url=svc.url, timeout=30) as c:
            vera = auth(tokens["vera"])  # a viewer: the lab's planning is everyone's to read
            page = c.get("/ui/reports", headers=vera)
            assert page.status_code == 200, page.text
            assert 'data-report="more-h100"' in page.text
            assert "what-if" in page.text and "add 8 x gpu-h100 (like gpu-a100)" in page.text

            one = c.get("/ui/reports/more-h100", headers=vera)
            assert one.status_code == 200, one.text
            assert "greedy (baseline)" in one.text and "greedy (variant)" in one.text
            deltas = one.text.split('<table id="deltas">', 1)[1].split("</table>", 1)[0]
            assert 'data-metric="cost"' in deltas and 'data-metric="utilization"' in deltas
            plots = [p for p in ("queue.svg", "wait_cdf.svg") if f"more-h100/{p}" in one.text]
            assert plots == ["queue.svg", "wait_cdf.svg"], one.text
            svg = c.get("/ui/reports/more-h100/queue.svg", headers=vera)
            assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg")
            assert svg.content.lstrip().startswith((b"<?xml", b"<svg"))

            # only a report's own plots: nothing else of the folder, nothing outside it
            for path in (
                "/ui/reports/more-h100/report.json",
                "/ui/reports/more-h100/jobs-greedy__baseline_.csv",
                "/ui/reports/more-h100/..%2Fsecret.svg",
                "/ui/reports/..%2Fsecret.svg",
                "/ui/reports/%2E%2E",
                "/ui/reports/nope",
            ):
                got = c.get(path, headers=vera)
                assert got.status_code == 404, (path, got.status_code, got.text[:200])
                assert b"not a report's" not in got.content

            # not logged in: to the login page
            anon = c.get("/ui/reports", follow_redirects=False)
            assert anon.status_code in (302, 303) and "/ui/login" in anon.headers["location"]
    finally:
        assert svc.stop() == 0, svc.text()
