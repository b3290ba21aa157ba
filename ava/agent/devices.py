"""The GPU device files of this node: which /dev/nvidiaN exist and which GPU index each one is.

The back-ends turn these facts into their own rules (devices.deny lines on cgroup v1,
DeviceAllow entries for a systemd scope). Standard library only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NVIDIA_MAJOR = 195
# Device files every CUDA process opens besides its GPUs.
NVIDIA_CONTROL_DEVICES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
# Character-device groups a multi-node job may need besides the GPUs (RDMA for NCCL, MIG).
EXTRA_DEVICE_GROUPS = ("infiniband_verbs", "infiniband_mad", "nvidia-caps")


def nvidia_minors() -> dict[int, int]:
    """GPU index (nvidia-smi order, i.e. PCI bus order) -> /dev/nvidiaN minor.

    Minors need not follow indices, so read them from the driver; without it assume equal."""
    base = Path("/proc/driver/nvidia/gpus")
    try:
        buses = sorted(os.listdir(base))
    except OSError:
        buses = []
    minors: dict[int, int] = {}
    for index, bus in enumerate(buses):
        try:
            text = (base / bus / "information").read_text()
        except OSError:
            continue
        if m := re.search(r"Device Minor:\s*(\d+)", text):
            minors[index] = int(m.group(1))
    if minors:
        return minors
    present = gpu_device_minors()
    return {m: m for m in present}


def gpu_device_minors() -> list[int]:
    """Minors of the /dev/nvidiaN GPU device files on this node."""
    out: list[int] = []
    try:
        names = os.listdir("/dev")
    except OSError:
        return out
    for name in names:
        if re.fullmatch(r"nvidia[0-9]+", name):
            try:
                out.append(os.minor(os.stat(f"/dev/{name}").st_rdev))
            except OSError:
                pass
    return sorted(out)


def char_device_groups() -> set[str]:
    """Names of the character-device groups the kernel has (/proc/devices)."""
    try:
        text = Path("/proc/devices").read_text()
    except OSError:
        return set()
    block = text.split("Block devices:")[0]
    return {parts[1] for line in block.splitlines() if len(parts := line.split()) == 2}
