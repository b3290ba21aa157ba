"""Hit and miss counters of a cache directory.

Each process counts in memory and flushes its own file, stats/<pid>.json, at most once a
second (and at exit); `status` sums the files, first folding those of long-gone processes
into stats/archive.json. Counters are advisory: failing to write one never fails a read.
Standard library only.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from ava.cache.files import STALE_S, atomic_write, pid_alive, unlink

KEYS = ("hits", "misses", "fetched_bytes")


class Counters:
    """This process's counters for one cache directory, flushed to <directory>/<pid>.json.

    One per cache directory per process (see `counters_for`), so two filesystem instances on
    the same directory do not overwrite each other's file.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.hits = self.misses = self.fetched = 0
        self._flushed = 0.0
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def add(self, hits: int = 0, misses: int = 0, fetched: int = 0) -> None:
        with self._lock:
            if os.getpid() != self._pid:  # forked: the parent's counts are the parent's
                self.hits = self.misses = self.fetched = 0
                self._pid = os.getpid()
            self.hits += hits
            self.misses += misses
            self.fetched += fetched
            due = time.monotonic() - self._flushed > 1.0
        if due:
            self.flush()

    def flush(self) -> None:
        self._flushed = time.monotonic()
        if not (self.hits or self.misses):
            return
        path = os.path.join(self.directory, f"{self._pid}.json")
        try:
            if not os.path.isdir(self.directory):
                os.mkdir(self.directory)  # never re-creates a cache directory removed meanwhile
            atomic_write(
                path, json.dumps({"hits": self.hits, "misses": self.misses, "fetched_bytes": self.fetched}).encode()
            )
        except OSError:
            pass  # counters are advisory; a full disk must not fail a read


_all_counters: dict[str, Counters] = {}
_counters_lock = threading.Lock()


def _flush_all() -> None:
    for counters in list(_all_counters.values()):
        counters.flush()


def counters_for(directory: str) -> Counters:
    """This process's one Counters for DIRECTORY, flushed at exit."""
    with _counters_lock:
        if directory not in _all_counters:
            if not _all_counters:
                atexit.register(_flush_all)
            _all_counters[directory] = Counters(directory)
        return _all_counters[directory]


def totals(directory: str, exclusive: Callable[[], AbstractContextManager[object]]) -> dict[str, int]:
    """Hits, misses and fetched bytes summed over every process that used DIRECTORY.

    EXCLUSIVE() is held while folding the files of gone processes: one compactor at a time."""
    compact(directory, exclusive)
    total = dict.fromkeys(KEYS, 0)
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                rec = json.loads(f.read())
            counts = [int(rec.get(key, 0)) for key in KEYS]
        except (OSError, ValueError):
            continue
        for key, count in zip(KEYS, counts):
            total[key] += count
    return total


def compact(directory: str, exclusive: Callable[[], AbstractContextManager[object]]) -> None:
    """Fold counter files of long-gone processes into archive.json."""
    try:
        names = [n for n in os.listdir(directory) if n[:-5].isdigit() and n.endswith(".json")]
    except OSError:
        return
    now = time.time()
    stale = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime > STALE_S and not pid_alive(int(name[:-5])):
                stale.append(path)
        except OSError:
            continue
    if not stale:
        return
    try:
        with exclusive():
            archive = os.path.join(directory, "archive.json")
            try:
                with open(archive, "rb") as f:
                    total = json.loads(f.read())
            except (OSError, ValueError):
                total = {}
            for path in stale:
                try:
                    with open(path, "rb") as f:
                        rec = json.loads(f.read())
                except (OSError, ValueError):
                    continue
                for key in KEYS:
                    total[key] = int(total.get(key, 0)) + int(rec.get(key, 0))
                atomic_write(archive, json.dumps(total).encode())
                unlink(path)
    except OSError:
        pass
