"""Writes into its working directory the way unmodified training scripts do.

Prints one line `RUNDIR {json}` on rank 0 with what it found before writing: whether `made.txt`
(a file it creates) was there, the content of `shipped.txt` (a file it was shipped with, to
which it appends), the step it resumed from (`snapshot.pt` next to it, saved with torch.save)
and its cwd. With RUNDIR_CRASH_FIRST=1 the first attempt saves its snapshot and SIGKILLs itself.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

here = Path(__file__).resolve().parent
found = {
    "cwd": os.getcwd(),
    "here": str(here),
    "made": Path("made.txt").exists(),
    "shipped": Path("shipped.txt").read_text(),
    "resumed": torch.load("snapshot.pt")["step"] if Path("snapshot.pt").exists() else None,
    "attempt": int(os.environ.get("AVA_ATTEMPT", "0")),
}
sys.stdout.write("RUNDIR " + json.dumps(found, sort_keys=True) + "\n")
sys.stdout.flush()
Path("made.txt").write_text("made by a run\n")
with open("shipped.txt", "a") as handle:
    handle.write("appended by a run\n")
torch.save({"step": 7}, "snapshot.pt")
if os.environ.get("RUNDIR_CRASH_FIRST") == "1" and found["resumed"] is None:
    sys.stdout.write("killing myself on purpose\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
