"""Facts about a node, gathered on the node. Standard library only.

`ava nodes` and `ava doctor` send this file's source to the node as `python3 -c SOURCE WORKDIR`
and read back one JSON object. It is pasted, not run through the agent, because they report on
nodes that were never provisioned, which have no agent yet, and must leave such a node as it is
(its `agents` fact says which agent builds are there). The agent imports it for `route`. Each
fact is cheap: torch's version comes from package metadata, not from importing torch.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time

GPU_QUERY = "index,name,memory.total,memory.used,utilization.gpu"


def cgroup_mode() -> str | None:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2"
    v1 = os.path.isdir("/sys/fs/cgroup/memory") or os.path.isdir("/sys/fs/cgroup/cpu")
    if v1 and os.path.exists("/sys/fs/cgroup/unified/cgroup.controllers"):
        return "hybrid"
    return "v1" if v1 else None


def systemd_is_init() -> bool:
    try:
        with open("/proc/1/comm", encoding="utf-8") as handle:
            return handle.read().strip() == "systemd"
    except OSError:
        return False


def isolation_backend(mode: str | None) -> str:
    """Which fence a run gets here; the agent makes the same choice."""
    if mode == "v2":
        return "systemd" if systemd_is_init() and shutil.which("systemd-run") else "v2"
    if mode in ("v1", "hybrid"):
        return "v1"
    return "none"


def memory() -> tuple[int | None, int | None]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        return None, None
    return values.get("MemTotal"), values.get("MemAvailable", values.get("MemFree"))


def disk_free(path: str) -> int | None:
    path = os.path.expanduser(path)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        stat = os.statvfs(path or "/")
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def run_dirs(workdir: str) -> dict[str, int]:
    """How many run directories (WORKDIR/runs/RUN/work) the node keeps, and the disk they use."""
    runs = os.path.join(os.path.expanduser(workdir), "runs")
    count = used = 0
    try:
        names = os.listdir(runs)
    except OSError:
        return {"count": 0, "bytes": 0}
    for name in names:
        top = os.path.join(runs, name, "work")
        if not os.path.isdir(top):
            continue
        count += 1
        for directory, _, files in os.walk(top):
            for file in files:
                try:
                    used += os.lstat(os.path.join(directory, file)).st_blocks * 512
                except OSError:
                    pass  # removed while we looked
    return {"count": count, "bytes": used}


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def gpus() -> list[dict[str, object]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found: list[dict[str, object]] = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        found.append(
            {
                "index": _int(parts[0]),
                "name": parts[1],
                "memory_total": _mib(parts[2]),
                "memory_used": _mib(parts[3]),
                "utilization": _int(parts[4]),
            }
        )
    return found


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def _mib(text: str) -> int | None:
    value = _int(text)
    return None if value is None else value * 1024 * 1024


def leases(workdir: str) -> list[dict[str, object]]:
    try:
        with open(os.path.join(os.path.expanduser(workdir), "leases.json"), encoding="utf-8") as handle:
            return list(json.load(handle).get("holders", []))
    except (OSError, ValueError, AttributeError):
        return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def agents(workdir: str) -> list[str]:
    """The agent builds ava has placed here (agent-<hash>.pyz), newest first."""
    folder = os.path.join(os.path.expanduser(workdir), "agent")
    try:
        names = [n for n in os.listdir(folder) if n.startswith("agent-") and n.endswith(".pyz")]
    except OSError:
        return []
    return sorted(names, key=lambda n: os.path.getmtime(os.path.join(folder, n)), reverse=True)


def warm_spare(workdir: str) -> dict[str, object] | None:
    """The spare torchrun the node keeps for its next run (keep_warm, see warm.py): its pid,
    and whether it has imported torch and listens; None when there is none. The names are
    warm.NODE_DIR, NEXT and SOCKET, written out: this file runs alone (see the module doc)."""
    where = os.path.join(os.path.expanduser(workdir), "warm")
    try:
        with open(os.path.join(where, "next.json"), encoding="utf-8") as f:
            pid = json.load(f)["pid"]
        with open(f"/proc/{int(pid)}/stat", encoding="ascii") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return {"pid": int(pid), "ready": os.path.exists(os.path.join(where, "spare.sock"))}


def gather(workdir: str) -> dict[str, object]:
    mode = cgroup_mode()
    mem_total, mem_free = memory()
    return {
        "hostname": socket.gethostname(),
        "home": os.path.expanduser("~"),
        "user": os.environ.get("USER") or os.environ.get("LOGNAME"),
        "python": platform.python_version(),
        "python_path": sys.executable,
        "torch": package_version("torch"),
        "cpus": cpu_count(),
        "mem_total": mem_total,
        "mem_free": mem_free,
        "disk_free": disk_free(workdir),
        "run_dirs": run_dirs(workdir),
        "agents": agents(workdir),
        "gpus": gpus(),
        "cgroup": mode,
        "isolation": isolation_backend(mode),
        "leases": leases(workdir),
        "warm": warm_spare(workdir),
        "time": time.time(),
    }


def interface_of(address: str) -> str | None:
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        # "2: eth0    inet 10.0.0.11/24 brd ..." -> eth0
        if len(parts) > 3 and parts[2] in ("inet", "inet6") and parts[3].split("/")[0] == address:
            return parts[1].split("@")[0]
    return None


def route(master: str, interface: str, want_port: bool) -> dict[str, object]:
    """The address and interface this node uses toward the master, and a free port if asked.

    A UDP connect sends nothing: it only asks the kernel which source address it would use.
    """
    result: dict[str, object] = {
        "address": None,
        "interface": None,
        "port": None,
        "error": None,
        "home": os.path.expanduser("~"),
        "cpus": cpu_count(),
    }
    try:
        target = socket.getaddrinfo(master, None, proto=socket.IPPROTO_TCP)[0]
        with socket.socket(target[0], socket.SOCK_DGRAM) as probe:
            probe.connect((target[4][0], 9))
            result["address"] = probe.getsockname()[0]
    except OSError as error:
        result["error"] = f"cannot route to the master {master}: {error}"
        return result
    if interface != "auto":
        result["interface"] = interface
    else:
        result["interface"] = interface_of(str(result["address"]))
    if want_port:
        with socket.socket(socket.AF_INET6 if ":" in str(result["address"]) else socket.AF_INET) as sock:
            sock.bind(("", 0))
            result["port"] = sock.getsockname()[1]
    return result


if __name__ == "__main__":
    print(json.dumps(gather(sys.argv[1] if len(sys.argv) > 1 else "~/.ava")))
