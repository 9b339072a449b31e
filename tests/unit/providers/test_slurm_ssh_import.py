"""Importing the SSH transport's library prints nothing to a user of the Slurm driver."""

from __future__ import annotations

import subprocess
import sys


def test_asyncssh_imported_by_the_transport_warns_nothing() -> None:
    # A fresh interpreter with every warning shown: cryptography 51 warns that DSA is
    # deprecated as asyncssh names DSA's classes, once per name, on stderr.
    code = (
        "from stowplan.providers.slurm.ssh import _quiet_dsa\n"
        "_quiet_dsa()\n"
        "import asyncssh\n"
        "import asyncssh.crypto\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
