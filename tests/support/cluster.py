"""A real multi-node test cluster on this one machine: an OpenSSH sshd per node.

As root (as CI runs): one network namespace per node, each with its own address on a bridge,
its own hostname (a UTS namespace, and an /etc/hosts entry so every node resolves every other),
its own sshd and host key, and a resolv.conf that fails fast (a DNS server that cannot be reached
stalls every reverse lookup torch's rendezvous makes). Not root: sshd on distinct loopback
addresses and high ports, without the faults that need namespaces.

Nodes are set up the way users' nodes are (as root, where each node has a mount namespace):
- they run the node venv of tests/support/nodepy.py (torch, nothing of ava's), never the test's
  interpreter, so everything ava needs there must arrive through ava's own shipping;
- each node's ~/.bashrc (its own file, bind-mounted in its namespace) puts that venv first on
  PATH, as users activate their environment;
- n3 uses ava's defaults: no `python`, `workdir` or `cache_dir` in the inventory, so it runs
  `python3` from its login PATH in `~/.ava` (its own folder, bind-mounted over ~/.ava);
- n2's ~/.bashrc is noisy the way conda's and pyenv's init are: it prints to stdout and stderr on
  every SSH command, and puts another bin folder (a conda-like `python3`) first on PATH.

Everything it makes (namespaces, links, sshd processes, /etc edits, files) is removed by
`Cluster.down()`, which the pytest fixture calls even when a test fails.

By hand, for benchmarks:  python -m tests.support.cluster up 3   (prints the inventory; Ctrl-C tears down)
With the systemd + cgroup v2 VM node of tests/support/vm.py too:  python -m tests.support.cluster up 3 --vm
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import nodepy

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PREFIX = "avat"  # every namespace, link and hosts entry this module makes starts with it
HOSTS_FILE = Path("/etc/hosts")
# One file per live cluster, holding its owner's pid: only clusters whose owner died are stale.
OWNERS = Path(tempfile.gettempdir()) / "ava-test-clusters"
_CLUSTERS = itertools.count()
DEFAULTS_NODE = "n3"  # uses ava's defaults: python3 from its login PATH, workdir ~/.ava
NOISY_NODE = "n2"  # its ~/.bashrc prints and changes PATH, as conda's and pyenv's init do
NOISE_OUT = "conda: base environment activated"
NOISE_ERR = "pyenv: shell integration is not enabled in this shell"


def is_root() -> bool:
    return os.geteuid() == 0


def have_sshd() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class TestNode:
    name: str
    address: str
    port: int
    hostname: str
    dir: Path
    namespace: str | None = None
    link: str | None = None  # the root-side end of the node's veth
    sshd: subprocess.Popen[bytes] | None = None
    sftp: bool = True  # False: its sshd_config has no `Subsystem sftp` line (a hardened node)
    defaults: bool = False  # the inventory names no python, workdir or cache_dir for it
    noisy: bool = False  # its ~/.bashrc prints on every command and puts a conda-like bin first

    @property
    def workdir(self) -> Path:
        """The node's workdir as this machine sees it (for the defaults node: what is ~/.ava there)."""
        return self.dir / ("home-ava" if self.defaults else "work")

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache" if self.defaults else self.dir / "cache"

    @property
    def node_cache_dir(self) -> str:
        """The cache dir as the node names it (~ expanded there, where ava reports it)."""
        return os.path.expanduser("~/.ava/cache") if self.defaults else str(self.cache_dir)

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"


@dataclass
class Cluster:
    size: int
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="avacluster-")))
    nodes: list[TestNode] = field(default_factory=list)
    use_namespaces: bool = field(default_factory=is_root)

    def __post_init__(self) -> None:
        number = (os.getpid() * 8 + next(_CLUSTERS)) % 0xFFFF
        self.id = f"{number:04x}"
        self.bridge = f"{PREFIX}{self.id}br"
        # A /24 of our own, used only inside namespaces this cluster makes.
        self.subnet = f"10.213.{number % 200 + 20}"
        self.key = self.root / "id_ed25519"
        self.known_hosts = self.root / "known_hosts"
        self.python = ""  # the node venv's interpreter (tests/support/nodepy.py), set by up()

    # -- life cycle -------------------------------------------------------------------------

    def up(self) -> Cluster:
        if not have_sshd():
            raise RuntimeError("openssh-server is not installed (apt-get install openssh-server)")
        OWNERS.mkdir(exist_ok=True)
        (OWNERS / self.id).write_text(str(os.getpid()))
        try:
            self.python = nodepy.node_python()
            os.makedirs("/run/sshd", exist_ok=True) if is_root() else None
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ava-test", "-f", str(self.key))
            (self.root / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
            if self.use_namespaces:
                self._make_bridge()
            for index in range(1, self.size + 1):
                self.nodes.append(self._make_node(f"n{index}", index))
            if self.use_namespaces:
                self._write_hosts()
            for node in self.nodes:
                self._start_sshd(node)
            self._write_known_hosts()
            for node in self.nodes:
                self.wait_ssh(node)
        except BaseException:
            self.down()
            raise
        return self

    def _make_bridge(self) -> None:
        """The bridge, on a /24 no other live cluster on this machine uses (chosen under a lock)."""
        with _clusters_lock():
            used = set(re.findall(r"inet 10\.213\.(\d+)\.", _sh("ip", "-o", "-4", "addr", "show", check=False).stdout))
            third = int(self.subnet.rsplit(".", 1)[1])
            while str(third) in used:
                third = third % 250 + 1
            self.subnet = f"10.213.{third}"
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            _sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")

    def down(self) -> None:
        for node in self.nodes:
            self._kill_namespace_processes(node)
            if node.sshd is not None:
                _terminate(node.sshd)
            if node.namespace:
                _sh("ip", "netns", "del", node.namespace, check=False)
                shutil.rmtree(f"/etc/netns/{node.namespace}", ignore_errors=True)
            if node.link:
                _sh("ip", "link", "del", node.link, check=False)
        if self.use_namespaces:
            _sh("ip", "link", "del", self.bridge, check=False)
            self._remove_hosts()
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        (OWNERS / self.id).unlink(missing_ok=True)

    def _make_node(self, name: str, index: int) -> TestNode:
        folder = self.root / name
        folder.mkdir(parents=True)
        if self.use_namespaces:
            node = TestNode(
                name=name,
                address=f"{self.subnet}.{10 + index}",
                port=22,
                hostname=f"{PREFIX}-{self.id}-{name}",
                dir=folder,
                namespace=f"{PREFIX}-{self.id}-{name}",
                link=f"{PREFIX}{self.id}{name}",
            )
            ns, link, peer = node.namespace, node.link, f"{node.link}p"
            assert ns and link
            _sh("ip", "netns", "add", ns)
            # `ip netns exec` bind-mounts these over /etc: lookups fail at once, never stall.
            etc = Path(f"/etc/netns/{ns}")
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            _sh("ip", "link", "add", link, "type", "veth", "peer", "name", peer)
            _sh("ip", "link", "set", peer, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", peer, "name", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "link", "set", link, "master", self.bridge)
            _sh("ip", "link", "set", link, "up")
        else:
            node = TestNode(
                name=name,
                address=f"127.0.0.{10 + index}",
                port=_free_port(),
                hostname="localhost",
                dir=folder,
            )
        if self.use_namespaces:  # a ~/.bashrc and ~/.ava of its own need its mount namespace
            node.defaults = name == DEFAULTS_NODE
            node.noisy = name == NOISY_NODE
        node.workdir.mkdir()
        node.cache_dir.mkdir()
        self._write_bashrc(node)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(node.host_key))
        return node

    def _write_bashrc(self, node: TestNode) -> None:
        """The node's ~/.bashrc (Debian's bash reads it for SSH commands too): the node venv first
        on PATH; on the noisy node, output on both streams and a conda-like bin before it."""
        lines = [
            "# ava test node: its environment first on PATH, as users activate theirs",
            f"export PATH={shlex.quote(str(Path(self.python).parent))}:$PATH",
        ]
        if node.noisy:
            conda = node.dir / "conda" / "bin"
            conda.mkdir(parents=True)
            for name in ("python3", "python"):
                (conda / name).write_text(f'#!/bin/sh\nexec {shlex.quote(self.python)} "$@"\n')
                (conda / name).chmod(0o755)
            lines += [
                f"echo {shlex.quote(NOISE_OUT)}",
                f"echo {shlex.quote(NOISE_ERR)} >&2",
                f"export PATH={shlex.quote(str(conda))}:$PATH",
            ]
        (node.dir / "bashrc").write_text("\n".join(lines) + "\n")

    def _sshd_config(self, node: TestNode) -> Path:
        config = node.dir / "sshd_config"
        lines = [
            f"Port {node.port}",
            f"ListenAddress {node.address}",
            f"HostKey {node.host_key}",
            f"PidFile {node.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            "X11Forwarding no",
            "MaxSessions 200",
            "MaxStartups 200:30:400",
            "LogLevel ERROR",
        ]
        if node.sftp:
            lines.append("Subsystem sftp internal-sftp")
        config.write_text("\n".join(lines) + "\n")
        return config

    def _start_sshd(self, node: TestNode) -> None:
        config = self._sshd_config(node)
        log = open(node.dir / "sshd.log", "ab")
        argv = [SSHD, "-D", "-e", "-f", str(config)]
        if node.namespace:
            # A node of its own: its network namespace (entered with nsenter, which unlike
            # `ip netns exec` keeps /sys and so the real cgroup tree), its hostname (UTS), and a
            # mount namespace where its resolv.conf fails fast and a plain ~/.bashrc replaces
            # this machine's (which runs pyenv's rehash on every SSH command).
            bashrc = node.dir / "bashrc"
            steps = [
                f"mount --bind /etc/netns/{node.namespace}/resolv.conf /etc/resolv.conf",
                f"{{ [ -e ~/.bashrc ] || touch ~/.bashrc; }} && mount --bind {shlex.quote(str(bashrc))} ~/.bashrc",
                *(
                    [f"mkdir -p ~/.ava && mount --bind {shlex.quote(str(node.workdir))} ~/.ava"]
                    if node.defaults
                    else []
                ),
                f"hostname {node.hostname}",
                "exec " + shlex.join(argv),
            ]
            argv = [
                "nsenter",
                f"--net=/run/netns/{node.namespace}",
                "--",
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                " && ".join(steps),
            ]
        node.sshd = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def wait_ssh(self, node: TestNode, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection((node.address, node.port), timeout=1) as sock:
                    if sock.recv(4) == b"SSH-":
                        return
            if node.sshd is not None and node.sshd.poll() is not None:
                log = (node.dir / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd of {node.name} exited: {log[-500:]}")
            time.sleep(0.1)
        raise RuntimeError(f"sshd of {node.name} did not answer within {timeout}s")

    def _write_known_hosts(self) -> None:
        lines = []
        for node in self.nodes:
            key = Path(f"{node.host_key}.pub").read_text().split()[:2]
            name = node.address if node.port == 22 else f"[{node.address}]:{node.port}"
            lines.append(f"{name} {key[0]} {key[1]}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    # -- /etc/hosts: every node resolves every other by name ----------------------------------

    def _marker(self) -> str:
        return f"# ava test cluster {self.id}"

    def _write_hosts(self) -> None:
        entries = "".join(f"{n.address} {n.hostname}  {self._marker()}\n" for n in self.nodes)
        with _clusters_lock():
            text = HOSTS_FILE.read_text()
            if text and not text.endswith("\n"):
                text += "\n"
            HOSTS_FILE.write_text(text + entries)

    def _remove_hosts(self) -> None:
        with _clusters_lock(), contextlib.suppress(OSError):
            lines = HOSTS_FILE.read_text().splitlines(keepends=True)
            HOSTS_FILE.write_text("".join(l for l in lines if self._marker() not in l))

    # -- inventories ------------------------------------------------------------------------

    def inventory(
        self, names: list[str] | None = None, *, path: Path | None = None, s3fs: bool = False, **defaults: object
    ) -> Path:
        """Write an ava.toml for these nodes (all when None) and return its path.

        Nodes run the node venv; `s3fs=True` gives them its flavour with s3fs, for training
        scripts that read or write S3 (the defaults node then names it as its python too: its
        PATH has the plain one). A `python` in `defaults` applies to every node.
        Nodes keep no spare between runs (`keep_warm = "0s"`: the leak check would count it)
        unless `keep_warm` says otherwise; None leaves ava's default.
        """
        chosen = [n for n in self.nodes if names is None or n.name in names]
        settings: dict[str, object] = {
            "user": os.environ.get("USER") or _current_user(),
            "identity": str(self.key),
            "known_hosts": str(self.known_hosts),
            "connect_timeout": "3s",
            "keep_warm": "0s",
        }
        settings.update(defaults)
        settings = {k: v for k, v in settings.items() if v is not None}
        python = nodepy.node_python(s3fs=True) if s3fs else self.python
        lines = ["[defaults]"] + [f"{k} = {_toml(v)}" for k, v in settings.items()]
        for node in chosen:
            lines += ["", f"[nodes.{node.name}]", f"host = {_toml(node.address)}", f"port = {node.port}"]
            if "python" not in defaults and (s3fs or not node.defaults):
                lines.append(f"python = {_toml(python)}")
            if not node.defaults:
                lines += [f"workdir = {_toml(str(node.workdir))}", f"cache_dir = {_toml(str(node.cache_dir))}"]
        target = path or self.root / f"ava-{'-'.join(n.name for n in chosen)}.toml"
        target.write_text("\n".join(lines) + "\n")
        return target

    @property
    def gateway(self) -> str:
        """This machine's address as every node sees it (for servers the tests run, e.g. S3)."""
        return f"{self.subnet}.1" if self.use_namespaces else "127.0.0.1"

    def node(self, name: str) -> TestNode:
        return next(n for n in self.nodes if n.name == name)

    # -- faults -----------------------------------------------------------------------------

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's sshd and every process started through it."""
        node = self.node(name)
        self._kill_namespace_processes(node)
        if node.sshd is not None:
            node.sshd.kill()
            node.sshd.wait()
            node.sshd = None

    def restart_node(self, name: str) -> None:
        node = self.node(name)
        if node.sshd is None or node.sshd.poll() is not None:
            self._start_sshd(node)
        self.wait_ssh(node)

    def cut_link(self, name: str) -> None:
        node = self.node(name)
        if not node.link:
            raise RuntimeError("cutting a link needs network namespaces (run as root)")
        _sh("ip", "link", "set", node.link, "down")

    def restore_link(self, name: str) -> None:
        node = self.node(name)
        if node.link:
            _sh("ip", "link", "set", node.link, "up")

    def regenerate_host_key(self, name: str) -> None:
        node = self.node(name)
        if node.sshd is not None:
            _terminate(node.sshd)
            node.sshd = None
        node.host_key.unlink()
        Path(f"{node.host_key}.pub").unlink()
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(node.host_key))
        self._start_sshd(node)
        self.wait_ssh(node)

    def set_sftp(self, name: str, offered: bool) -> None:
        """Restart the node's sshd with or without the SFTP subsystem (sessions already open go on)."""
        node = self.node(name)
        node.sftp = offered
        if node.sshd is not None:
            _terminate(node.sshd)
            node.sshd = None
        self._start_sshd(node)
        self.wait_ssh(node)

    def namespace_pids(self, name: str) -> list[int]:
        node = self.node(name)
        if not node.namespace:
            return []
        out = _sh("ip", "netns", "pids", node.namespace, check=False).stdout
        return [int(p) for p in out.split()]

    def _kill_namespace_processes(self, node: TestNode) -> None:
        for _ in range(5):
            pids = self.namespace_pids(node.name)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                # A process in a frozen cgroup (an agent killed halfway through a teardown)
                # only dies once thawed.
                _thaw(pid)
            time.sleep(0.1)


def _thaw(pid: int) -> None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "freezer" in controllers.split(",") and path not in ("", "/"):
                state = Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state"
                if state.read_text().strip() != "THAWED":
                    state.write_text("THAWED")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _stale_ids() -> set[str]:
    """Clusters whose owning process is gone (other live test sessions are left alone)."""
    stale = set()
    for owner in OWNERS.glob("*") if OWNERS.exists() else []:
        try:
            os.kill(int(owner.read_text()), 0)
        except (ProcessLookupError, ValueError):
            stale.add(owner.name)
    return stale


@contextlib.contextmanager
def _clusters_lock() -> Iterator[None]:
    """The lock every test session on this machine takes to choose a subnet or edit /etc/hosts
    (a read-modify-write that two sessions starting at once would otherwise interleave)."""
    OWNERS.mkdir(exist_ok=True)
    with open(OWNERS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def clean_stale() -> None:
    """Remove what a killed earlier test session left: namespaces, links, hosts entries."""
    if not is_root():
        return
    live = {p.name for p in OWNERS.glob("*")} - _stale_ids() if OWNERS.exists() else set()

    def is_stale(cluster_id: str) -> bool:
        return cluster_id not in live

    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(f"{PREFIX}-") and is_stale(ns.split("-")[1]):
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith(PREFIX) and is_stale(name[len(PREFIX) : len(PREFIX) + 4]):
            _sh("ip", "link", "del", name, check=False)
    with _clusters_lock(), contextlib.suppress(OSError):
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        kept = [l for l in lines if "# ava test cluster " not in l or not is_stale(l.rsplit(" ", 1)[-1].strip())]
        if kept != lines:
            HOSTS_FILE.write_text("".join(kept))
    for cluster_id in _stale_ids():
        (OWNERS / cluster_id).unlink(missing_ok=True)


@contextlib.contextmanager
def running_cluster(size: int) -> Iterator[Cluster]:
    cluster = Cluster(size)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("up", "clean"):
        print("usage: python -m tests.support.cluster up N [--vm] | clean", file=sys.stderr)
        return 2
    if argv[0] == "clean":
        clean_stale()
        return 0
    with_vm = "--vm" in argv  # also the systemd + cgroup v2 node of tests/support/vm.py
    argv = [a for a in argv if a != "--vm"]
    size = int(argv[1]) if len(argv) > 1 else 3
    with running_cluster(size) as cluster, contextlib.ExitStack() as extra:
        print(f"inventory: {cluster.inventory()}", flush=True)
        if with_vm:
            from tests.support.vm import USER, running_vm

            vm = extra.enter_context(running_vm())
            print(f"VM node (root): {vm.inventory(vm.root / 'ava.toml')}", flush=True)
            print(f"VM node ({USER}): {vm.inventory(vm.root / 'ava-user.toml', user=USER)}", flush=True)
        print("Ctrl-C tears the cluster down.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
