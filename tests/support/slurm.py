"""A real Slurm on the test cluster: munge, slurmctld and one slurmd per test node.

Debian's slurm-wlm and munge must be installed (.ci/run does it); this module only configures
and starts them, and removes everything it made on teardown, even when a test failed:
- munged with a key of its own and a private socket (slurm.conf's AuthInfo names it);
- slurmctld in this machine's network namespace, listening on the cluster's bridge address,
  which every node's namespace reaches;
- one slurmd per test node, started inside that node's network, UTS and mount namespaces (those
  of its sshd), so it has the node's hostname and address; spool, pid and log paths carry %n;
- /etc/slurm/slurm.conf (the path every Slurm command reads), so `sbatch`, `squeue`, `sinfo`,
  `scancel` work on the login node, a test node reached over SSH like any other.

Plugins that work here (cgroup v1 hybrid, no systemd, several slurmd on one kernel):
proctrack/linuxproc and task/none (the cgroup ones would make every slurmd share one cgroup
tree). Accounting: `sacct` needs slurmdbd, and slurmdbd a database (jobcomp/filetxt does not
feed sacct in 22.05): where slurmdbd and MariaDB are installed, a MariaDB of its own (data dir
under the cluster's folder, 127.0.0.1) and slurmdbd run too; else accounting is off and
`SlurmCluster.completed()` reads the jobcomp/filetxt lines.

By hand:  python -m tests.support.slurm up 3   (prints the Slurm inventory; Ctrl-C tears down)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, TestNode, clean_stale, have_sshd, is_root

CONF_DIR = Path("/etc/slurm")
CONF = CONF_DIR / "slurm.conf"
DBD_CONF = CONF_DIR / "slurmdbd.conf"  # beside slurm.conf: where slurmdbd and sacct look
MARKER = "# ava test slurm cluster"
LOCK = Path("/tmp/ava-test-slurm.lock")  # one test Slurm per machine: /etc/slurm/slurm.conf is global
# The daemons a test Slurm started, one "pid name" line each: what a killed session left is
# ended by the next one (which holds LOCK, so no live test Slurm owns them).
PIDS = Path("/tmp/ava-test-slurm.pids")
PARTITION = "debug"
LOGIN = "n1"


def have_accounting() -> bool:
    """slurmdbd and MariaDB installed: `sacct` can answer (else jobcomp/filetxt only)."""
    return all(shutil.which(b) or os.path.exists(b) for b in ("slurmdbd", "/usr/sbin/mariadbd", "mariadb-install-db"))


def have_slurm() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch"))


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@dataclass
class SlurmCluster:
    """Slurm over an up test cluster (root, a network namespace per node)."""

    cluster: Cluster
    login: str = LOGIN
    partition: str = PARTITION
    dir: Path = field(init=False)
    accounting: bool = False  # slurmdbd runs: sacct answers
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _lock: int | None = None

    def __post_init__(self) -> None:
        self.dir = self.cluster.root / "slurm"
        self.shared = self.cluster.root / "shared"  # the shared filesystem every node sees

    # -- life cycle -------------------------------------------------------------------------

    def up(self) -> SlurmCluster:
        if not is_root() or not self.cluster.use_namespaces:
            raise RuntimeError("a test Slurm needs root and a network namespace per node")
        self._lock = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise RuntimeError("another test Slurm runs on this machine (/etc/slurm/slurm.conf is global)") from None
        clean_stale_slurm()
        try:
            self.dir.mkdir(mode=0o700)
            self.shared.mkdir(mode=0o755)
            self._start_munge()
            self.accounting = have_accounting()
            if self.accounting:
                self._start_accounting()
            self._write_conf()
            if self.accounting:
                self._register_cluster()
            self._start_ctld()
            for node in self.cluster.nodes:
                self.start_slurmd(node.name)
            self.wait_idle()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        # Jobs first (their steps' processes live in the nodes' namespaces), then the daemons.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", "--full", "--partition", self.partition], capture_output=True, timeout=10)
        for name in [n for n in self.daemons if n.startswith("slurmd-")]:
            self._stop(name)
        for name in reversed(list(self.daemons)):  # slurmctld, slurmdbd, MariaDB, munged
            self._stop(name)
        for conf in (CONF, DBD_CONF):
            if conf.exists() and MARKER in conf.read_text(errors="replace"):
                conf.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.shared, ignore_errors=True)
        PIDS.unlink(missing_ok=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _stop(self, name: str) -> None:
        proc = self.daemons.pop(name)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _start_munge(self) -> None:
        munge = self.dir / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = munge / "munge.socket"
        argv = [
            "munged",
            "--foreground",
            "--force",  # a socket dir under /tmp is world-writable higher up
            f"--socket={self.socket}",
            f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
            "--num-threads=1",
        ]
        self._spawn("munged", argv, munge / "munged.out")
        _wait(lambda: self.socket.exists(), 10, "munged did not make its socket", munge / "munged.log")

    def _start_accounting(self) -> None:
        """MariaDB (its own data dir, on the bridge address) and slurmdbd: what `sacct` reads."""
        gateway = self.cluster.gateway
        data, db = self.dir / "mariadb", self.dir / "mariadb-data"
        data.mkdir()
        self.db_port = _free_port("127.0.0.1")
        install = subprocess.run(
            [
                "mariadb-install-db",
                "--user=root",
                f"--datadir={db}",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {install.stderr[-800:]}")
        argv = [
            "/usr/sbin/mariadbd",
            "--no-defaults",
            "--user=root",
            f"--datadir={db}",
            f"--socket={data / 'mysqld.sock'}",
            f"--pid-file={data / 'mysqld.pid'}",
            "--bind-address=127.0.0.1",
            f"--port={self.db_port}",
            "--innodb-buffer-pool-size=32M",
            "--performance-schema=OFF",
            "--skip-log-bin",
            f"--log-error={data / 'mysqld.log'}",
        ]
        self._spawn("mariadbd", argv, data / "mysqld.out")
        _wait(lambda: (data / "mysqld.sock").exists(), 60, "MariaDB did not start", data / "mysqld.log")
        self.dbd_port = _free_port(gateway)
        text = "\n".join(
            [
                MARKER,
                "AuthType=auth/munge",
                f"AuthInfo=socket={self.socket}",
                f"DbdHost={socket.gethostname()}",
                f"DbdAddr={gateway}",
                f"DbdPort={self.dbd_port}",
                "SlurmUser=root",
                f"PidFile={self.dir / 'slurmdbd.pid'}",
                f"LogFile={self.dir / 'slurmdbd.log'}",
                "DebugLevel=info",
                "StorageType=accounting_storage/mysql",
                "StorageHost=127.0.0.1",
                f"StoragePort={self.db_port}",
                "StorageUser=root",
                f"StorageLoc=ava_slurm_{self.cluster.id}",
            ]
        )
        if DBD_CONF.exists() and MARKER not in DBD_CONF.read_text(errors="replace"):
            raise RuntimeError(f"{DBD_CONF} exists and is not a test Slurm's: refusing to replace it")
        CONF_DIR.mkdir(exist_ok=True)
        DBD_CONF.write_text(text + "\n")
        DBD_CONF.chmod(0o600)
        self._spawn("slurmdbd", ["slurmdbd", "-D"], self.dir / "slurmdbd.out")

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection((gateway, self.dbd_port), timeout=1):
                return True
            return False

        _wait(listening, 90, "slurmdbd did not listen", self.dir / "slurmdbd.log")

    def _register_cluster(self) -> None:
        # slurmctld needs its cluster known to slurmdbd before jobs are accounted.
        self.sh("sacctmgr", "-i", "add", "cluster", f"ava{self.cluster.id}", check=False, timeout=60)

    def _conf_text(self) -> str:
        gateway = self.cluster.gateway
        self.ctld_port = _free_port(gateway)
        lines = [
            MARKER,
            f"ClusterName=ava{self.cluster.id}",
            f"SlurmctldHost={socket.gethostname()}({gateway})",  # must name this host
            "MailProg=/bin/true",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmdPort=6818",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.dir / 'state'}",
            f"SlurmdSpoolDir={self.dir / 'spool-%n'}",
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.dir / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.dir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            *(
                [
                    "AccountingStorageType=accounting_storage/slurmdbd",
                    f"AccountingStorageHost={gateway}",
                    f"AccountingStoragePort={self.dbd_port}",
                    f"AccountingStoragePass={self.socket}",  # for slurmdbd: the munge socket
                ]
                if self.accounting
                else ["AccountingStorageType=accounting_storage/none"]
            ),
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.dir / 'jobcomp.txt'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # A batch job is scheduled at slurmctld's next pass (within a second), not within the
            # default 3 s batching window: launch times (benchmarks/slurm_launch.py) then measure
            # launchers more than that window.
            "SchedulerParameters=batch_sched_delay=0",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "LaunchParameters=use_interactive_step",
            "ReturnToService=2",
            "SlurmdTimeout=10",
            "SlurmctldTimeout=10",
            "MessageTimeout=5",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdParameters=config_overrides",  # every test node declares the same CPUs and memory
        ]
        for node in self.cluster.nodes:
            lines.append(
                f"NodeName={node.name} NodeHostname={node.hostname} NodeAddr={node.address} "
                "CPUs=4 RealMemory=8000 State=UNKNOWN"
            )
        names = ",".join(n.name for n in self.cluster.nodes)
        lines.append(f"PartitionName={self.partition} Nodes={names} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _write_conf(self) -> None:
        (self.dir / "state").mkdir()
        if CONF.exists() and MARKER not in CONF.read_text(errors="replace"):
            raise RuntimeError(f"{CONF} exists and is not a test Slurm's: refusing to replace it")
        CONF_DIR.mkdir(exist_ok=True)
        CONF.write_text(self._conf_text())

    def _start_ctld(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(CONF)], self.dir / "slurmctld.out")

    def start_slurmd(self, name: str) -> None:
        """slurmd of node NAME in its sshd's namespaces (network, hostname, mount)."""
        node = self.cluster.node(name)
        assert node.sshd is not None, f"{name} is down"
        argv = [
            "nsenter",
            f"--target={node.sshd.pid}",
            "--net",
            "--uts",
            "--mount",
            "--",
            "slurmd",
            "-D",
            "-N",
            name,
            "-f",
            str(CONF),
        ]
        self._spawn(f"slurmd-{name}", argv, self.dir / f"slurmd-{name}.out")

    def _spawn(self, name: str, argv: list[str], out: Path) -> None:
        with open(out, "ab") as log:
            self.daemons[name] = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        with open(PIDS, "a") as pids:
            pids.write(f"{self.daemons[name].pid} {argv[0]}\n")

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until every node is idle in the partition."""

        def idle() -> bool:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    tail = (self.dir / f"{name}.out").read_text(errors="replace")[-800:]
                    raise RuntimeError(f"{name} exited {proc.returncode}: {tail}")
            out = self.sh("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return len(states) == len(self.cluster.nodes) and all(s == "idle" for s in states.values())

        _wait(idle, timeout, "Slurm nodes did not become idle", self.dir / "slurmctld.log")

    # -- use ---------------------------------------------------------------------------------

    def sh(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A Slurm command here (slurmctld's namespace; the login node sees the same daemons)."""
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)

    def inventory(self, *, path: Path | None = None, **slurm: object) -> Path:
        """An ava.toml with the login node and a [slurm] table for this cluster."""
        base = self.cluster.inventory([self.login], path=path or self.cluster.root / "ava-slurm.toml")
        settings: dict[str, object] = {
            "login": self.login,
            "partition": self.partition,
            "shared_dir": str(self.shared / "ava"),
            "python": self.cluster.python,
        }
        settings.update(slurm)
        lines = ["", "[slurm]"] + [f"{k} = {_toml(v)}" for k, v in settings.items()]
        with open(base, "a") as f:
            f.write("\n".join(lines) + "\n")
        return base

    def completed(self) -> str:
        """The jobcomp file: one line per ended job (JobId=… JobState=…)."""
        path = self.dir / "jobcomp.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def job_state(self, job: str) -> str:
        out = self.sh("scontrol", "show", "job", "-o", job, check=False).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return ""

    def kill_node(self, name: str) -> None:
        """The node's slurmd and every process in its namespaces (its sshd too), at once."""
        proc = self.daemons.pop(f"slurmd-{name}", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.cluster.kill_node(name)

    def node(self, name: str) -> TestNode:
        return self.cluster.node(name)


def clean_stale_slurm() -> None:
    """End the daemons and remove the config a killed test session left (call holding LOCK)."""
    lines = PIDS.read_text().splitlines() if PIDS.exists() else []
    for line in lines:
        pid, _, name = line.partition(" ")
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if os.path.basename(name).encode() in cmdline:  # still that daemon, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    PIDS.unlink(missing_ok=True)
    for conf in (CONF, DBD_CONF):
        if conf.exists() and MARKER in conf.read_text(errors="replace"):
            conf.unlink()


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _wait(ready: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
    raise RuntimeError(f"{what} within {timeout}s: {tail}")


@contextlib.contextmanager
def running_slurm(size: int = 3) -> Iterator[SlurmCluster]:
    cluster = Cluster(size)
    cluster.up()
    try:
        slurm = SlurmCluster(cluster).up()
        try:
            yield slurm
        finally:
            slurm.down()
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A 3-node test cluster (n1 is also the login node) with Slurm on it, for one test module."""
    if not have_sshd() or not have_slurm():
        pytest.fail("slurm-wlm, munge and openssh-server must be installed (.ci/run installs them)")
    if not is_root():
        pytest.skip("a test Slurm needs root (a network namespace per node)")
    clean_stale()
    with running_slurm(3) as slurm:
        yield slurm


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "up":
        print("usage: python -m tests.support.slurm up [N]", file=sys.stderr)
        return 2
    with running_slurm(int(argv[1]) if len(argv) > 1 else 3) as slurm:
        print(f"inventory: {slurm.inventory()}", flush=True)
        print("Ctrl-C tears Slurm and the cluster down.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
