"""A real, throw-away Slurm cluster on this machine, for the integration tests and the benchmark.

Everything lives under one directory: configuration, munge key and socket, state, spool, logs,
pid files, the MariaDB data directory, and an sshd (its own host key, a client key, a
known_hosts file) that stands in for the cluster's login node. Daemons listen on free ports of
127.0.0.1 picked at start, so a stale cluster from an interrupted run never collides with a new
one. Readiness is polled (a command that succeeds, a port that accepts), never slept for.

Layout: munged, MariaDB, slurmdbd, slurmctld, four slurmd (n1..n4 on one host, each its own
port), partitions ``cpu`` (n[1-4], default) and ``gpu`` (n[3-4], two fake GPUs of type
``fake`` per node: character devices made with mknod, announced in gres.conf), and sshd.

Needs root and the packages of ``install.sh``. ``python -m tests.slurmcluster.cluster up DIR``
starts one and prints its facts as JSON; ``down DIR`` stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

CLUSTER_NAME = "spcluster"
NODES = ("n1", "n2", "n3", "n4")
GPU_NODES = ("n3", "n4")
CPUS_PER_NODE = 8
MEMORY_MB_PER_NODE = 8192
GPUS_PER_NODE = 2
GPU_TYPE = "fake"
SBIN = Path("/usr/sbin")
REQUIRED = ("munged", "slurmctld", "slurmd", "slurmdbd", "sshd", "mariadbd", "sbatch")


def missing_programs() -> list[str]:
    return [p for p in REQUIRED if shutil.which(p, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]


PORTS = range(20000, 32000)
"""Where the daemons' ports are picked: below the kernel's ephemeral range (32768 and up here),
which every outgoing connection draws from, and above Ray's worker ports (10002-19999). A port
the kernel hands out (``bind(("", 0))``) is free only until the next connection takes it,
which, with Ray's processes connecting all the time beside the tests, a slurmd starting a
moment later lost now and then."""


def free_port() -> int:
    """A port nobody listens on now, from ``PORTS`` (randomly: two clusters started at once
    rarely try the same one)."""
    import random

    for port in random.sample(PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"slurm cluster: no free port among 200 tried in {PORTS}")


def wait_until(
    cond: Callable[[], bool], timeout: float, what: str, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"slurm cluster: timed out after {timeout:g}s waiting for {what}{tail}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class ClusterFacts:
    """What a client needs to reach the cluster: written to ``facts.json`` in the directory."""

    base: str
    slurm_conf: str
    ssh_port: int
    ssh_user: str
    identity_file: str
    known_hosts: str
    slurmctld_port: int
    cluster_name: str = CLUSTER_NAME
    accounting: bool = True

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": self.slurm_conf}


class SlurmCluster:
    def __init__(
        self, base: Path, *, accounting: bool = True, cpus_per_node: int = CPUS_PER_NODE
    ) -> None:
        self.base = base.absolute()
        self.accounting = accounting
        self.cpus_per_node = cpus_per_node
        self.etc = self.base / "etc"
        self.run = self.base / "run"
        self.logs = self.base / "log"
        self.munge = self.base / "munge"
        self.ssh = self.base / "ssh"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.facts: ClusterFacts | None = None

    # -- helpers ----------------------------------------------------------------------------

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    def slurm(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        """Run a Slurm client command against this cluster; its standard output."""
        proc = subprocess.run(
            list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def _spawn(self, name: str, argv: Sequence[str], log: Path) -> None:
        out = open(log, "ab")  # noqa: SIM115 -- held by the daemon for its lifetime
        self.procs[name] = subprocess.Popen(
            list(argv),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    def _ok(self, argv: Sequence[str]) -> bool:
        try:
            r = subprocess.run(list(argv), env=self.env(), capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    def _alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    # -- start ------------------------------------------------------------------------------

    def start(self) -> ClusterFacts:
        t0 = time.monotonic()
        for d in (
            self.etc,
            self.run,
            self.logs,
            self.munge,
            self.ssh,
            self.base / "state",
            self.base / "spool",
            self.base / "dev",
            self.base / "home",
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        ports = {n: free_port() for n in ("ctld", "dbd", "mysql", "ssh", *NODES)}
        self._write_configs(ports)
        self._start_munge()
        if self.accounting:
            self._start_mariadb(ports["mysql"])
            self._start_slurmdbd(ports["dbd"])
        self._spawn(
            "slurmctld",
            [str(SBIN / "slurmctld"), "-D", "-i", "-f", str(self.slurm_conf)],
            self.logs / "slurmctld.out",
        )
        for n in NODES:
            self._spawn(
                f"slurmd-{n}",
                [str(SBIN / "slurmd"), "-D", "-N", n, "-f", str(self.slurm_conf)],
                self.logs / f"slurmd-{n}.out",
            )
        self._start_sshd(ports["ssh"])
        wait_until(self._nodes_idle, 60, "four idle nodes", self.logs / "slurmctld.log")
        self.facts = ClusterFacts(
            base=str(self.base),
            slurm_conf=str(self.slurm_conf),
            ssh_port=ports["ssh"],
            ssh_user="root",
            identity_file=str(self.ssh / "id_ed25519"),
            known_hosts=str(self.ssh / "known_hosts"),
            slurmctld_port=ports["ctld"],
            accounting=self.accounting,
        )
        (self.base / "facts.json").write_text(json.dumps(asdict(self.facts), indent=1))
        (self.base / "startup_s").write_text(f"{time.monotonic() - t0:.2f}\n")
        return self.facts

    def _tail(self, name: str) -> str:
        """The last lines of ``name``'s logs, for the error (the fixture removes them)."""
        out = []
        for log in sorted(self.logs.glob(f"{name}.*")):
            lines = log.read_text(errors="replace").splitlines()[-10:]
            out.append(f"\n--- {log.name}\n" + "\n".join(lines))
        return "".join(out) or f" see {self.logs}"

    def _nodes_idle(self) -> bool:
        for name in self.procs:
            if not self._alive(name):
                raise RuntimeError(f"slurm cluster: {name} exited:{self._tail(name)}")
        try:
            out = self.slurm("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=5)
        except subprocess.TimeoutExpired:
            return False
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def _write_configs(self, ports: dict[str, int]) -> None:
        b = self.base
        sock = self.munge / "munge.socket.2"
        node_lines = []
        for i, n in enumerate(NODES):
            gres = f" Gres=gpu:{GPU_TYPE}:{GPUS_PER_NODE}" if n in GPU_NODES else ""
            node_lines.append(
                f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
                f"Port={ports[n]} CPUs={self.cpus_per_node} RealMemory={MEMORY_MB_PER_NODE}"
                f"{gres} State=UNKNOWN"
            )
            del i
        accounting = (
            f"AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=127.0.0.1\nAccountingStoragePort={ports['dbd']}\n"
            # NOTE: with munge's socket outside /run/munge, slurmctld finds it for slurmdbd
            # only through AccountingStoragePass; without it sacct retries for minutes.
            f"AccountingStoragePass={sock}\nAccountingStorageTRES=gres/gpu\n"
            if self.accounting
            else "AccountingStorageType=accounting_storage/none\n"
        )
        conf = f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports["ctld"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={self.run}/slurmctld.pid
SlurmdPidFile={self.run}/slurmd-%n.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5,batch_sched_delay=0,default_queue_depth=1000
MaxArraySize=10001
MaxJobCount=100000
MinJobAge=300
KillWait=2
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key={self.etc}/jwt_hs256.key
{accounting}{chr(10).join(node_lines)}
PartitionName=cpu Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={",".join(GPU_NODES)} MaxTime=1-00:00:00 State=UP
"""
        self.slurm_conf.write_text(conf)
        jwt_key = self.etc / "jwt_hs256.key"
        if not jwt_key.exists():
            jwt_key.write_bytes(os.urandom(32))
        jwt_key.chmod(0o600)
        devs = []
        for i in range(GPUS_PER_NODE):
            dev = b / "dev" / f"fakegpu{i}"
            if not dev.exists():
                # NOTE: gres.conf File= must name a character device; regular files are refused.
                subprocess.run(["mknod", str(dev), "c", "1", "3"], check=True)
            devs.append(str(dev))
        (self.etc / "gres.conf").write_text(
            "AutoDetect=off\n"
            f"NodeName={','.join(GPU_NODES)} Name=gpu Type={GPU_TYPE} "
            f"File={b}/dev/fakegpu[0-{GPUS_PER_NODE - 1}]\n"
        )
        if self.accounting:
            dbd = self.etc / "slurmdbd.conf"
            dbd.write_text(
                f"AuthType=auth/munge\nAuthInfo=socket={sock}\nDbdHost=localhost\n"
                f"DbdAddr=127.0.0.1\nDbdPort={ports['dbd']}\nSlurmUser=root\n"
                f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
                f"StoragePort={ports['mysql']}\nStorageUser=root\nStorageLoc=slurm_acct_db\n"
                f"PidFile={self.run}/slurmdbd.pid\nLogFile={self.logs}/slurmdbd.log\n"
                f"AuthAltTypes=auth/jwt\nAuthAltParameters=jwt_key={self.etc}/jwt_hs256.key\n"
            )
            dbd.chmod(0o600)

    def _start_munge(self) -> None:
        key = self.munge / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # NOTE: clients reach the socket only if its directory is world-readable (0755).
        self.munge.chmod(0o755)
        self._spawn(
            "munged",
            [
                str(SBIN / "munged"),
                "-F",
                "--force",
                f"--socket={self.munge / 'munge.socket.2'}",
                f"--key-file={key}",
                f"--pid-file={self.run / 'munged.pid'}",
                f"--log-file={self.logs / 'munged.log'}",
                f"--seed-file={self.munge / 'munge.seed'}",
            ],
            self.logs / "munged.out",
        )
        wait_until(
            lambda: (self.munge / "munge.socket.2").exists(),
            10,
            "munged's socket",
            self.logs / "munged.log",
        )

    def _start_mariadb(self, port: int) -> None:
        data = self.base / "mysql"
        if not (data / "mysql").exists():
            r = subprocess.run(
                [
                    "mariadb-install-db",
                    "--user=root",
                    f"--datadir={data}",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed: {r.stderr[-2000:]}")
        self._spawn(
            "mariadb",
            [
                str(SBIN / "mariadbd"),
                "--no-defaults",
                "--user=root",
                f"--datadir={data}",
                f"--socket={self.run / 'mysql.sock'}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={self.run / 'mysql.pid'}",
                "--skip-grant-tables",
                "--innodb-buffer-pool-size=64M",
                "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=0",
            ],
            self.logs / "mariadb.log",
        )
        wait_until(lambda: port_open(port), 60, "MariaDB", self.logs / "mariadb.log")

    def _start_slurmdbd(self, port: int) -> None:
        self._spawn("slurmdbd", [str(SBIN / "slurmdbd"), "-D"], self.logs / "slurmdbd.out")
        # slurmdbd reads SLURM_CONF's directory for slurmdbd.conf
        wait_until(lambda: port_open(port), 60, "slurmdbd", self.logs / "slurmdbd.log")
        if CLUSTER_NAME not in self.slurm("sacctmgr", "-n", "-P", "list", "cluster"):
            self.slurm("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME)

    def _start_sshd(self, port: int) -> None:
        host_key = self.ssh / "host_ed25519"
        user_key = self.ssh / "id_ed25519"
        for k in (host_key, user_key):
            if not k.exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True
                )
        shutil.copy(f"{user_key}.pub", self.ssh / "authorized_keys")
        pub = (Path(f"{host_key}.pub")).read_text().split()
        (self.ssh / "known_hosts").write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
        conf = self.ssh / "sshd_config"
        conf.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"PidFile {self.run / 'sshd.pid'}\nAuthorizedKeysFile {self.ssh / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "Subsystem sftp internal-sftp\nMaxStartups 100:30:200\nMaxSessions 100\n"
            # VERBOSE: one "Starting session:" line per command or SFTP session, one
            # "Accepted publickey" per login: what ssh_sessions() counts
            "ClientAliveInterval 0\nLogLevel VERBOSE\nAcceptEnv LANG LC_*\n"
        )
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self._spawn(
            "sshd", [str(SBIN / "sshd"), "-D", "-e", "-f", str(conf)], self.logs / "sshd.log"
        )
        wait_until(lambda: port_open(port), 20, "sshd", self.logs / "sshd.log")

    def ssh_sessions(self) -> tuple[int, int]:
        """(commands, logins) the login node's sshd has served since the cluster started.

        Counted on the server, from sshd's own VERBOSE log: every remote command and every SFTP
        session is one "Starting session:" line, every connection one "Accepted publickey". A
        client cannot under-count what it did, and the driver carries no counter for this.
        """
        log = self.logs / "sshd.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        commands = sum(1 for ln in text.splitlines() if ln.startswith("Starting session: "))
        logins = sum(1 for ln in text.splitlines() if ln.startswith("Accepted publickey for "))
        return commands, logins

    def start_rest(self, user: str = "nobody") -> tuple[str, str]:
        """Start slurmrestd (JWT auth) on a free port; its URL and a token for ``user``.

        NOTE: slurmrestd refuses root's tokens; jobs submitted through it run as ``user``.
        """
        port = free_port()
        # NOTE: slurmrestd refuses to run as root; -s without dbv0.0.38 when there is no slurmdbd
        plugins = "openapi/v0.0.38,openapi/dbv0.0.38" if self.accounting else "openapi/v0.0.38"
        self.etc.chmod(0o755)
        self.slurm_conf.chmod(0o644)
        # NOTE: SLURM_JWT=daemon makes slurmrestd speak auth/jwt to slurmctld; without it the
        # munge plugin rejects every client token ("Rejecting thread config token").
        os.environ["SLURM_JWT"] = "daemon"
        try:
            self._spawn(
                "slurmrestd",
                [
                    str(SBIN / "slurmrestd"),
                    "-u",
                    "nobody",
                    "-g",
                    "nogroup",
                    "-a",
                    "rest_auth/jwt",
                    "-s",
                    plugins,
                    f"127.0.0.1:{port}",
                ],
                self.logs / "slurmrestd.log",
            )
        finally:
            del os.environ["SLURM_JWT"]
        wait_until(lambda: port_open(port), 20, "slurmrestd", self.logs / "slurmrestd.log")
        out = self.slurm("scontrol", "token", f"username={user}", "lifespan=7200")
        token = out.strip().partition("=")[2]
        return f"http://127.0.0.1:{port}", token

    # -- control ----------------------------------------------------------------------------

    def restart_slurmctld(self) -> None:
        """Stop slurmctld and start it again, keeping its state (no ``-c``): jobs survive."""
        self._stop("slurmctld")
        self._spawn(
            "slurmctld",
            [str(SBIN / "slurmctld"), "-D", "-i", "-f", str(self.slurm_conf)],
            self.logs / "slurmctld.out",
        )
        wait_until(
            lambda: (
                self._ok(["scontrol", "ping"])
                and "UP" in self.slurm("scontrol", "ping", check=False)
            ),
            60,
            "slurmctld to answer again",
            self.logs / "slurmctld.log",
        )

    def _stop(self, name: str, timeout: float = 20) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def stop(self) -> None:
        """Stop everything this instance started, jobs included, in reverse order."""
        if self.procs.get("slurmctld") is not None and self._alive("slurmctld"):
            # jobs of every user, so no slurmstepd outlives its slurmd
            with contextlib.suppress(Exception):
                for part in ("cpu", "gpu"):
                    self.slurm("scancel", "--full", "-p", part, check=False, timeout=10)
                with contextlib.suppress(RuntimeError):
                    wait_until(
                        lambda: not self.slurm("squeue", "-h", check=False, timeout=5).strip(),
                        20,
                        "cancelled jobs to end",
                    )
        order = [
            "sshd",
            *[f"slurmd-{n}" for n in NODES],
            "slurmctld",
            "slurmdbd",
            "mariadb",
            "munged",
        ]
        for name in order:
            self._stop(name)
        for name in list(self.procs):
            self._stop(name)


def stop_from_pidfiles(base: Path) -> None:
    """``down``: stop a cluster started by another process, by the pid files it wrote."""
    run = base / "run"
    env = {**os.environ, "SLURM_CONF": str(base / "etc" / "slurm.conf")}
    for part in ("cpu", "gpu"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", "--full", "-p", part], env=env, timeout=10, check=False)
    for pidfile in sorted(run.glob("*.pid")):
        with contextlib.suppress(ValueError, ProcessLookupError, OSError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.slurmcluster.cluster up|down DIR", file=sys.stderr)
        return 2
    base = Path(argv[1])
    if argv[0] == "down":
        stop_from_pidfiles(base)
        return 0
    cluster = SlurmCluster(base)
    facts = cluster.start()
    print(json.dumps(asdict(facts)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
