"""A real systemd + cgroup v2 node for the test cluster: a Debian bookworm guest under qemu.

This machine's own cgroups are v1 (hybrid) without systemd, so the back-ends most users get —
systemd scopes on cgroup v2, and plain cgroup v2 — need a kernel and an init of their own.

The image is built once (debootstrap, then torch from the local wheel into /opt/nodepy) and
cached outside the checkout under $AVA_TEST_VM_CACHE (default /var/cache/ava-test-vm), in a
folder named by the hash of its inputs: this module's build code and constants. Builders take a
lock, so two sessions never build the same image at once. Each test session boots its own guest
from that image with `-snapshot` (writes go to a throw-away overlay, the image stays pristine),
as a child process killed and waited for at teardown (and killed by the kernel if this process
dies first). The guest is reached over ava's real SSH transport like any node, through qemu's
user-mode network: 127.0.0.1:PORT on this machine is the guest's port 22, with `restrict=on`
so the guest reaches nothing else. Its host key is generated with the image and written into
a known_hosts the inventory names (strict checking stays on).

Inside the guest: `root` and `ubuntu` (uid 1000) both accept the image's key; systemd keeps the
memory, cpu and pids controllers on in the root cgroup (Default*Accounting=yes), so the plain
v2 back-end's `/sys/fs/cgroup/ava` subtree, which systemd did not create and never touches,
gets them too.

By hand:  python -m tests.support.vm build | up  (up prints an inventory; Ctrl-C stops the guest)
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import inspect
import os
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

SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "openssh-server",
    "python3",
    "python3-venv",
    "linux-image-amd64",
    "iproute2",
    "udev",
    "dbus",
    "libpam-systemd",
    "procps",
)
TORCH = "2.13.0"
NODE_PYTHON = "/opt/nodepy/bin/python"
USER = "ubuntu"
HOSTNAME = "avavm"
IMAGE_SIZE = "5G"
MEMORY_MIB = 2048
CPUS = 2
CACHE = Path(os.environ.get("AVA_TEST_VM_CACHE", "/var/cache/ava-test-vm"))
# One file per live guest, holding its owner's pid (as tests.support.cluster does for its clusters).
OWNERS = Path(tempfile.gettempdir()) / "ava-test-vms"


def _sh(*argv: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    return done


def missing_tools() -> list[str]:
    """What this machine lacks to build and boot the guest (empty: all there)."""
    need = ["qemu-system-x86_64", "debootstrap", "mkfs.ext4", "ssh-keygen", "ssh"]
    gone = [tool for tool in need if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]
    if os.geteuid() != 0:
        gone.append("root (debootstrap, chroot)")
    return gone


# -- the image ------------------------------------------------------------------------------

GUEST_FILES = {
    "etc/hostname": f"{HOSTNAME}\n",
    "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n",
    # Nothing to ask: a lookup fails at once instead of stalling torch's rendezvous.
    "etc/resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    "etc/fstab": "/dev/vda / ext4 rw,relatime 0 1\n",
    "etc/systemd/network/50-dhcp.network": "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n",
    # Controllers stay enabled in the root cgroup whatever units run, for the plain v2 subtree.
    "etc/systemd/system.conf.d/ava-accounting.conf": "[Manager]\nDefaultMemoryAccounting=yes\nDefaultCPUAccounting=yes\nDefaultTasksAccounting=yes\n",
    "etc/ssh/sshd_config.d/ava.conf": "HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\n"
    "PermitRootLogin prohibit-password\nMaxSessions 200\nMaxStartups 200:30:400\n"
    "UseDNS no\n",
}


def image_key() -> str:
    """Hash of everything the image is made from: the build code and its constants."""
    parts = [
        SUITE,
        ",".join(PACKAGES),
        TORCH,
        NODE_PYTHON,
        USER,
        HOSTNAME,
        IMAGE_SIZE,
        repr(sorted(GUEST_FILES.items())),
        inspect.getsource(_build_root),
        inspect.getsource(_install_torch),
        inspect.getsource(_make_disk),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "disk.img"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def host_key_pub(self) -> Path:
        return self.dir / "ssh_host_ed25519_key.pub"

    @property
    def ready(self) -> bool:
        return (self.dir / "complete").exists()


def build(log: bool = True) -> Image:
    """The cached image for the current inputs, built first if needed (under a lock)."""
    key = image_key()
    image = Image(CACHE / key)
    if image.ready:
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image.ready:  # another builder finished while we waited
            return image
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f"{key}.build-", dir=CACHE))
        try:
            out = Image(work / "image")
            out.dir.mkdir()
            root = work / "root"
            _build_root(root, out)
            _install_torch(root)
            _make_disk(root, out)
            (out.dir / "complete").write_text(f"built in {time.monotonic() - started:.0f}s\n")
            shutil.rmtree(image.dir, ignore_errors=True)
            out.dir.rename(image.dir)
        finally:
            _unmount_all(work)
            shutil.rmtree(work, ignore_errors=True)
        if log:
            print(f"ava test VM image {key} built in {time.monotonic() - started:.0f}s", file=sys.stderr)
        _remove_old_images(keep=key)
    return image


def _build_root(root: Path, out: Image) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root))
    for attempt in range(3):  # the mirror now and then fails a download; a retry finds it
        _unmount_all(root)
        shutil.rmtree(root, ignore_errors=True)
        if _sh(*argv, env=env, check=attempt == 2).returncode == 0:
            break
    for rel, text in GUEST_FILES.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.write_text(text)
    # One host key, generated here: the test's known_hosts line names exactly it.
    for old in (root / "etc/ssh").glob("ssh_host_*"):
        old.unlink()
    _sh(
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "ava-test-vm",
        "-f",
        str(root / "etc/ssh/ssh_host_ed25519_key"),
    )
    shutil.copy(root / "etc/ssh/ssh_host_ed25519_key.pub", out.host_key_pub)
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ava-test-vm-client", "-f", str(out.key))
    public = Path(f"{out.key}.pub").read_text()
    _chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", "--uid", "1000", USER)
    for home, owner in (("root", "root"), (f"home/{USER}", USER)):
        ssh_dir = root / home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(public)
        _chroot(root, "chown", "-R", f"{owner}:{owner}", f"/{home}/.ssh")
        _chroot(root, "chmod", "600", f"/{home}/.ssh/authorized_keys")
    _chroot(root, "systemctl", "enable", "systemd-networkd", "ssh")
    # A login prompt on the serial console is not needed, and a wait for the network only delays boot.
    _chroot(
        root,
        "systemctl",
        "mask",
        "serial-getty@ttyS0.service",
        "systemd-networkd-wait-online.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
    )
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy(os.path.realpath(root / name), out.dir / name)


def _install_torch(root: Path) -> None:
    """torch from this machine's wheel into a venv in the image, before it ever boots."""
    wheels = root / "tmp/wh"
    wheels.mkdir(parents=True)
    _sh(sys.executable, "-m", "pip", "download", "-q", f"torch=={TORCH}", "-d", str(wheels))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean.update(PIP_CONFIG_FILE="/dev/null", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _chroot(root, "python3", "-m", "venv", "/opt/nodepy", env=clean)
    _chroot(
        root,
        "/opt/nodepy/bin/pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        "/tmp/wh",
        f"torch=={TORCH}",
        env=clean,
    )
    shutil.rmtree(wheels)
    _chroot(root, "/opt/nodepy/bin/python", "-c", "import torch", env=clean)


def _make_disk(root: Path, out: Image) -> None:
    _unmount_all(root)
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (root / cache).glob("*.deb" if "archives" in cache else "*_*"):
            item.unlink()
    _sh("mkfs.ext4", "-q", "-F", "-L", "avavm", "-d", str(root), str(out.disk), IMAGE_SIZE)


def _chroot(root: Path, *argv: str, env: dict[str, str] | None = None) -> None:
    """Run ARGV in the image, with /proc, /sys and /dev mounted for it (undone at the end)."""
    for point, kind in (("proc", "proc"), ("sys", "sysfs"), ("dev", "devtmpfs")):
        target = root / point
        if not os.path.ismount(target):
            _sh("mount", "-t", kind, kind, str(target))
    _sh("chroot", str(root), *argv, env=env or {**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _unmount_all(under: Path) -> None:
    """Every mount below UNDER, deepest first (a failed build leaves its chroot mounts)."""
    with contextlib.suppress(OSError):
        points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((p for p in points if p.startswith(str(under) + "/")), key=len, reverse=True):
            _sh("umount", "-l", point, check=False)


def _remove_old_images(keep: str) -> None:
    """Images of older inputs (each ~2.5 GB); one being built by another session has no
    folder of its own key yet, and a lock file is never removed."""
    for entry in CACHE.iterdir():
        if entry.is_dir() and len(entry.name) == 16 and entry.name != keep and (entry / "complete").exists():
            shutil.rmtree(entry, ignore_errors=True)


# -- a booted guest ---------------------------------------------------------------------------


@dataclass
class VM:
    image: Image
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="avavm-")))
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    boot_seconds: float = 0.0

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def console(self) -> Path:
        return self.root / "console.log"

    def up(self, timeout: float = 300.0) -> VM:
        OWNERS.mkdir(exist_ok=True)
        started = time.monotonic()
        try:
            self.port = _free_port()
            key = self.image.host_key_pub.read_text().split()[:2]
            self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {key[0]} {key[1]}\n")
            argv = [
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-smp",
                str(CPUS),
                "-m",
                str(MEMORY_MIB),
                "-kernel",
                str(self.image.kernel),
                "-initrd",
                str(self.image.initrd),
                # mitigations=off: page-table isolation and retpolines cost most under emulation.
                "-append",
                "root=/dev/vda rw console=ttyS0 quiet mitigations=off",
                # cache=unsafe: the guest's fsyncs (ledger, status files) stop at the throw-away overlay.
                "-drive",
                f"file={self.image.disk},format=raw,if=virtio,snapshot=on,cache=unsafe",
                "-netdev",
                f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                "-device",
                "virtio-net-pci,netdev=net0",
                "-display",
                "none",
                "-serial",
                f"file:{self.console}",
                "-monitor",
                "none",
                "-no-reboot",
            ]
            with open(self.root / "qemu.log", "wb") as log:
                self.process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_die_with_parent
                )
            (OWNERS / str(self.process.pid)).write_text(str(os.getpid()))
            self._wait_ssh(timeout)
            self.boot_seconds = time.monotonic() - started
        except BaseException:
            self.down()
            raise
        return self

    def _wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"qemu exited {self.process.returncode}: {self._tail()}")
            if self.ssh("true", check=False, timeout=20).returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"the test VM's sshd did not answer within {timeout:g}s: {self._tail()}")

    def _tail(self) -> str:
        text = ""
        for log in (self.root / "qemu.log", self.console):
            with contextlib.suppress(OSError):
                text += log.read_text(errors="replace")[-1500:]
        return text

    def down(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            (OWNERS / str(self.process.pid)).unlink(missing_ok=True)
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def ssh_argv(self, user: str = "root") -> list[str]:
        return [
            "ssh",
            "-p",
            str(self.port),
            "-i",
            str(self.image.key),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            f"{user}@127.0.0.1",
        ]

    def ssh(
        self, command: str, *, user: str = "root", check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """COMMAND run by a shell in the guest (a test's look inside; ava goes through its own transport)."""
        try:
            done = subprocess.run(
                self.ssh_argv(user) + [command],
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            if check:
                raise RuntimeError(f"in the VM: {command!r} took over {timeout:g}s") from exc
            return subprocess.CompletedProcess(exc.cmd, 124, "", "timed out")
        if check and done.returncode != 0:
            raise RuntimeError(f"in the VM: {command!r} exited {done.returncode}: {done.stderr[-1000:]}")
        return done

    def inventory(self, path: Path, *, user: str = "root", name: str = "vm", **defaults: object) -> Path:
        """An ava.toml with the guest as node NAME, logged into as USER."""
        settings: dict[str, object] = {
            "user": user,
            "identity": str(self.image.key),
            "known_hosts": str(self.known_hosts),
            "python": NODE_PYTHON,
            "connect_timeout": "20s",  # an emulated CPU: a handshake takes a while
            "keep_warm": "0s",  # no spare left between tests' runs (as on the test cluster)
        }
        settings.update(defaults)
        settings = {k: v for k, v in settings.items() if v is not None}
        lines = ["[defaults]"] + [f"{k} = {_toml(v)}" for k, v in settings.items()]
        lines += ["", f"[nodes.{name}]", 'host = "127.0.0.1"', f"port = {self.port}"]
        path.write_text("\n".join(lines) + "\n")
        return path


def _die_with_parent() -> None:
    """In qemu's child, before exec: the kernel kills it if the test session dies first, and
    it runs ahead of the host's other work (the guest's clock runs on while its emulated CPUs
    wait for the host's, and a starved node looks hung to ava's heartbeat checks)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.geteuid() == 0:
        os.nice(-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def clean_stale() -> None:
    """Kill guests whose owning session died without tearing them down."""
    for entry in OWNERS.glob("*") if OWNERS.exists() else []:
        with contextlib.suppress(ValueError, OSError):
            owner = int(entry.read_text())
            try:
                os.kill(owner, 0)
                continue
            except ProcessLookupError:
                pass
            with contextlib.suppress(ProcessLookupError):
                if "qemu" in Path(f"/proc/{entry.name}/comm").read_text():
                    os.kill(int(entry.name), signal.SIGKILL)
        entry.unlink(missing_ok=True)


@contextlib.contextmanager
def running_vm() -> Iterator[VM]:
    vm = VM(build()).up()
    try:
        yield vm
    finally:
        vm.down()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "up", "clean"):
        print("usage: python -m tests.support.vm build | up | clean", file=sys.stderr)
        return 2
    if argv[0] == "clean":
        clean_stale()
        return 0
    started = time.monotonic()
    image = build()
    print(f"image: {image.dir} ({time.monotonic() - started:.0f}s)", flush=True)
    if argv[0] == "build":
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    with running_vm() as vm:
        print(f"booted in {vm.boot_seconds:.0f}s", flush=True)
        print(f"inventory: {vm.inventory(vm.root / 'ava.toml')}", flush=True)
        print(f"as {USER}: {vm.inventory(vm.root / 'ava-user.toml', user=USER)}", flush=True)
        print("an emulated node answers slowly: export AVA_LIVENESS_SCALE=5 for ava commands aimed at it", flush=True)
        print("Ctrl-C stops the VM.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
