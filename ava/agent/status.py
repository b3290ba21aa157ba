"""The status of one attempt: `WORKDIR/runs/RUN/attempt-N/status.json`.

Keys: run, attempt, node, state (starting|running|succeeded|failed|stopped), reason
(null|exit|oom|stopped|agent-died), pid (monitor), job_pid, started, ended, exit_code
(negative: killed by that signal), rank_exit_codes {"rank": code}, rank_fail_times
{"rank": unix time it failed: raised (see ava/rankhook.py), else exited}, heartbeat, progress
{step, time}|null, output_size, output_time, gpus, cpu_slots, cgroup {backend, path, ...},
limits, memory_limit, user, pid_start, job_start, reaper_pid, reaper_start (to tell a
reused pid from ours), warning (fencing weaker than asked), error (why the agent failed it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from . import layout, procs, protocol

FINAL = protocol.FINAL
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)", re.M)
_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.M)


def is_final(st: dict[str, Any] | None) -> bool:
    return st is not None and protocol.is_final(st.get("state"))


# What the supervisor judges by; a long poll answers when one of these changes.
_JUDGED = ("state", "reason", "exit_code", "rank_exit_codes", "rank_fail_times", "error", "disk_full")


def digest(st: dict[str, Any]) -> str:
    """A short fingerprint of the judged part of a status (heartbeat and progress left out)."""
    judged = json.dumps([st.get(key) for key in _JUDGED], sort_keys=True, default=str)
    return hashlib.sha1(judged.encode()).hexdigest()[:12]


def read(attempt_dir: Path) -> dict[str, Any] | None:
    found = layout.read_json(attempt_dir / layout.STATUS)
    return found if isinstance(found, dict) else None


def write(attempt_dir: Path, st: dict[str, Any]) -> None:
    layout.write_json_atomic(attempt_dir / layout.STATUS, st)


def finish(attempt_dir: Path, st: dict[str, Any], state: str, reason: str | None, **extra: Any) -> dict[str, Any]:
    """Write a final state unless one is there already; returns what is on disk after."""
    current = read(attempt_dir) or st
    if is_final(current):
        return current
    st = {**current, **extra, "state": state, "reason": reason, "ended": time.time()}
    st.update(output_fields(attempt_dir))
    write(attempt_dir, st)
    return st


def parse_progress(text: str) -> dict[str, Any] | None:
    """`"<step> <unix time>"`, as ava.env.progress writes it."""
    parts = text.split()
    try:
        return {"step": int(parts[0]), "time": float(parts[1])}
    except (IndexError, ValueError):
        return None


METRICS_BATCH = 1 << 20  # the most metric bytes one status answer carries


def read_metrics(attempt_dir: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The whole metric lines written since OFFSET (at most METRICS_BATCH bytes of them), and
    the offset after the last one; a line being written stays for the next answer."""
    try:
        with open(attempt_dir / layout.METRICS, "rb") as f:
            f.seek(offset)
            data = f.read(METRICS_BATCH)
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    lines: list[dict[str, Any]] = []
    for raw in data[:end].splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # a line the script garbled: skipped, not fatal
        if isinstance(line, dict):
            lines.append(line)
    return lines, offset + end


def read_progress(attempt_dir: Path) -> dict[str, Any] | None:
    try:
        return parse_progress((attempt_dir / layout.PROGRESS).read_text())
    except OSError:
        return None


def output_fields(attempt_dir: Path) -> dict[str, Any]:
    try:
        s = os.stat(attempt_dir / layout.OUTPUT)
        return {"output_size": s.st_size, "output_time": s.st_mtime}
    except OSError:
        return {"output_size": 0, "output_time": None}


def parse_rank_exit_codes(text: str) -> dict[str, int]:
    """Per-rank exit codes from torchrun's failure summary:
    `  rank      : 1 (local_rank: 1)` followed by `  exitcode  : 3 (pid: 2759)`."""
    codes: dict[str, int] = {}
    for m in _RANK.finditer(text):
        nxt = _EXIT.search(text, m.end())
        following = _RANK.search(text, m.end())
        if nxt and (not following or nxt.start() < following.start()):
            codes[m.group(1)] = int(nxt.group(1))
    return codes


def tail(path: Path, size: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def monitor_gone(st: dict[str, Any]) -> bool:
    """True when the attempt is not final yet no monitor lives to finish it."""
    if is_final(st):
        return False
    return not procs.alive(st.get("pid"), st.get("pid_start"))


def reaper_alive(st: dict[str, Any]) -> bool:
    return procs.alive(st.get("reaper_pid"), st.get("reaper_start"))
