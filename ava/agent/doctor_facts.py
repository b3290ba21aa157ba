"""What `ava doctor` needs to know about a node, gathered on the node. Standard library only.

Sent as `python -c SOURCE ARGS_JSON` next to facts.py (which gives the basics: Python, torch,
GPUs, cgroups), it adds what a preflight needs: CUDA and NCCL versions read from package files
(never by importing torch), GPU health from nvidia-smi, Xid errors from the kernel log, free
disk, the interface that routes to the master, whether the master answers on it, and how long
name lookups take. Every probe is bounded in time: a doctor that hangs is worse than none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

HEALTH_FIELDS = (
    "index,name,uuid,ecc.errors.uncorrected.volatile.total,retired_pages.pending,"
    "remapped_rows.pending,remapped_rows.failure"
)
# Older drivers know no row remapping; they still report retired pages.
HEALTH_FIELDS_OLD = "index,name,uuid,ecc.errors.uncorrected.volatile.total,retired_pages.pending"
XID_RE = re.compile(r"NVRM: Xid \(([^)]*)\): (\d+)")
SIOCGIFADDR = 0x8915


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def torch_build() -> dict[str, str | None]:
    """CUDA from torch/version.py, read as text; NCCL from the nvidia-nccl wheel, if any."""
    import importlib.util

    cuda = None
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            try:
                with open(os.path.join(folder, "version.py"), encoding="utf-8") as handle:
                    text = handle.read()
            except OSError:
                continue
            match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
            cuda = match.group(1) if match else None
            break
    nccl = None
    for name in ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "nvidia-nccl-cu11"):
        nccl = package_version(name)
        if nccl:
            break
    return {"torch": package_version("torch"), "cuda": cuda, "nccl": nccl}


def _cell(text: str) -> str | None:
    text = text.strip()
    return None if not text or "N/A" in text or "Not Supported" in text else text


def gpu_health() -> dict[str, object]:
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": "missing", "gpus": []}
    for fields in (HEALTH_FIELDS, HEALTH_FIELDS_OLD):
        try:
            done = subprocess.run(
                ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.SubprocessError) as error:
            return {"nvidia_smi": f"error: {error}", "gpus": []}
        if done.returncode == 0:
            break
    else:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        return {"nvidia_smi": f"error: {' '.join(tail) or 'exit ' + str(done.returncode)}", "gpus": []}
    names = fields.split(",")
    gpus = []
    for line in done.stdout.strip().splitlines():
        cells = [_cell(c) for c in line.split(",")]
        if len(cells) == len(names):
            gpus.append(dict(zip(names, cells)))
    return {"nvidia_smi": "ok", "gpus": gpus}


def xid_events() -> dict[str, object]:
    """NVIDIA Xid lines in the kernel log, where this user may read it."""
    if shutil.which("dmesg") is None:
        return {"readable": False, "events": []}
    try:
        done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"readable": False, "events": []}
    if done.returncode != 0:
        return {"readable": False, "events": []}
    events = []
    for line in done.stdout.splitlines():
        match = XID_RE.search(line)
        if match:
            events.append({"pci": match.group(1), "xid": int(match.group(2)), "line": line.strip()[-200:]})
    return {"readable": True, "events": events[-20:]}


def _existing(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path) and path != "/":
        path = os.path.dirname(path)
    return path


def disk(path: str, *, count_used: bool = False, budget: float = 2.0) -> dict[str, object]:
    where = _existing(path)
    try:
        stat = os.statvfs(where)
        free = stat.f_bavail * stat.f_frsize
    except OSError as error:
        return {"path": where, "free": None, "error": str(error)}
    found: dict[str, object] = {"path": where, "free": free}
    if count_used:
        # What the cache holds already may be evicted, so it counts as room for the cache.
        used, deadline = 0, time.monotonic() + budget
        for folder, _, files in os.walk(os.path.expanduser(path)):
            for name in files:
                try:
                    used += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
            if time.monotonic() > deadline:
                break
        found["used"] = used
    return found


def interface_addresses() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                found.setdefault(name, []).append(socket.inet_ntoa(packed[20:24]))
            except OSError:
                found.setdefault(name, [])
    finally:
        probe.close()
    try:
        with open("/proc/net/if_inet6", encoding="utf-8") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 6:
                    text = ":".join(parts[0][i : i + 4] for i in range(0, 32, 4))
                    found.setdefault(parts[5], []).append(
                        socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
                    )
    except OSError:
        pass
    return found


def pick_interface(master: str | None, wanted: str) -> dict[str, object]:
    """The NIC for NCCL/Gloo: the one named, or the one holding the address that routes to
    the master (matched by address, so on the master itself it is its NIC, not `lo`)."""
    addresses = interface_addresses()
    if wanted != "auto":
        if wanted not in addresses:
            return {"name": wanted, "address": None, "error": f"no interface {wanted} on this node"}
        held = addresses[wanted]
        return {
            "name": wanted,
            "address": held[0] if held else None,
            "error": None if held else f"interface {wanted} has no address",
        }
    if not master:
        return {"name": None, "address": None, "error": "no master address"}
    family = socket.AF_INET6 if ":" in master else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect((master, 9))  # UDP: picks the route, sends nothing
        source = probe.getsockname()[0]
    except OSError as error:
        return {"name": None, "address": None, "error": f"no route to the master {master}: {error.strerror or error}"}
    finally:
        probe.close()
    for name, held in addresses.items():
        if source in held:
            return {"name": name, "address": source, "error": None}
    return {"name": None, "address": source, "error": f"no interface holds {source}"}


def reach(master: str | None, port: int | None, timeout: float) -> dict[str, object]:
    if not master or not port:
        return {"ok": None}
    started = time.monotonic()
    try:
        # On the master itself its SSH port may be a forwarded one that means nothing here (a
        # rented box, a VM): where the address is this node's own, listen on it and connect, as
        # the rendezvous will. Elsewhere, the master's SSH port is a port known to listen.
        target = (master, port)
        with contextlib.ExitStack() as stack:
            try:
                own = stack.enter_context(socket.create_server((master, 0)))
                target = own.getsockname()[:2]
            except OSError:
                pass
            with socket.create_connection(target, timeout=timeout):
                pass
    except OSError as error:
        reason = "timed out" if isinstance(error, (socket.timeout, TimeoutError)) else (error.strerror or str(error))
        return {"ok": False, "error": reason, "seconds": round(time.monotonic() - started, 3)}
    return {"ok": True, "seconds": round(time.monotonic() - started, 3)}


def timed_lookups(jobs: list[tuple[str, str, object]], timeout: float) -> list[dict[str, object]]:
    """Run lookups in parallel threads; one still running at `timeout` is reported stalled.

    The threads are daemons: a stalled resolver call never keeps this process alive.
    """
    results: list[dict[str, object]] = []
    threads = []
    for kind, name, call in jobs:
        entry: dict[str, object] = {"kind": kind, "name": name, "stalled": True}
        results.append(entry)

        def work(entry: dict[str, object] = entry, call: object = call) -> None:
            started = time.monotonic()
            try:
                entry["result"] = call()  # type: ignore[operator]
                entry["error"] = None
            except (OSError, UnicodeError) as error:
                entry["result"] = None
                entry["error"] = str(error)
            entry["seconds"] = round(time.monotonic() - started, 3)
            entry["stalled"] = False

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for entry in results:
        if entry["stalled"]:
            entry["seconds"] = timeout
    return results


def _is_address(text: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except OSError:
            pass
    return False


def gather(args: dict[str, object]) -> dict[str, object]:
    timeout = float(args.get("lookup_timeout", 2.0))  # type: ignore[arg-type]
    master = args.get("master") or None
    hostname = socket.gethostname()
    jobs: list[tuple[str, str, object]] = [
        ("forward", hostname, lambda: socket.getaddrinfo(hostname, None)[0][4][0]),
        ("fqdn", hostname, lambda: socket.getfqdn(hostname)),
    ]
    if isinstance(master, str) and not _is_address(master):
        jobs.append(("master", master, lambda: socket.getaddrinfo(master, None)[0][4][0]))
    lookups = timed_lookups(jobs, timeout)
    master_address = master if isinstance(master, str) and _is_address(master) else None
    for entry in lookups:
        if entry["kind"] == "master" and not entry["stalled"]:
            master_address = entry.get("result")  # type: ignore[assignment]
    interface = pick_interface(master_address, str(args.get("interface") or "auto"))
    if interface.get("address"):
        address = str(interface["address"])
        lookups += timed_lookups([("reverse", address, lambda: socket.gethostbyaddr(address)[0])], timeout)
    return {
        "hostname": hostname,
        "euid": os.geteuid(),
        "versions": {"python": ".".join(map(str, sys.version_info[:3])), **torch_build()},
        "gpu_health": gpu_health(),
        "xid": xid_events(),
        "disk": {
            "workdir": disk(str(args.get("workdir") or "~/.ava")),
            "cache_dir": disk(str(args.get("cache_dir") or "~/.ava/cache"), count_used=True),
        },
        "interface": interface,
        "master_reach": reach(master_address, args.get("master_port"), timeout),  # type: ignore[arg-type]
        "lookups": lookups,
    }


if __name__ == "__main__":
    print(json.dumps(gather(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})))
