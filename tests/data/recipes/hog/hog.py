"""Misbehaves on purpose, as HOG_MODE says; knows nothing of ava (a plain torchrun script).

    alloc   touch HOG_MIB MiB of memory, 32 MiB at a time (default 1024), then exit 0
    spin    busy-loop for HOG_SECONDS (default 5), then exit 0
    escape  double-fork a child that calls setsid and sleeps an hour, then sleep HOG_SECONDS
    sleep   sleep HOG_SECONDS (default 5), printing a tick every half second; ends early,
            with exit 0, once the file HOG_UNTIL (when set) exists
Every rank prints `ready <rank> <pid>` first; `escape` also prints `escaped <pid>`.
"""

import os
import sys
import time


def say(line: str) -> None:
    # One write per line: processes sharing the output file never splice each other's lines.
    os.write(1, (line + "\n").encode())


rank = int(os.environ["RANK"])
mode = os.environ.get("HOG_MODE", "sleep")
seconds = float(os.environ.get("HOG_SECONDS", "5"))
say(f"ready {rank} {os.getpid()}")

if mode == "alloc":
    chunks = []
    for done in range(int(os.environ.get("HOG_MIB", "1024")) // 32):
        chunks.append(b"\x01" * (32 << 20))  # filled, so every page is really in use
        say(f"allocated {(done + 1) * 32} MiB")
    say(f"done {rank}")
    sys.exit(0)

if mode == "spin":
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    say(f"done {rank}")
    sys.exit(0)

if mode == "escape":
    child = os.fork()
    if child == 0:
        # A daemon-style escapee: its own session and process group, its parent gone.
        os.setsid()
        if os.fork() == 0:
            say(f"escaped {os.getpid()}")
            time.sleep(3600)
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)

until = os.environ.get("HOG_UNTIL")
end = time.monotonic() + seconds
while time.monotonic() < end and not (until and os.path.exists(until)):
    say(f"tick {rank}")
    time.sleep(0.5)
say(f"done {rank}")
