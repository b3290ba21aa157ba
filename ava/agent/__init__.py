"""ava's node agent: runs ON each node, standard library only, Python 3.10+.

It ships as one file (``build_zipapp()``) and is called over SSH as
``python3 agent.pyz CMD ...`` (in-tree: ``python3 -m ava.agent CMD ...``). Every command
prints ONE JSON object on stdout (``logs`` prints raw bytes). Exit codes (protocol.ExitCode):
0 success, 1 the attempt failed / run or attempt unknown / teardown left something, 2 bad spec
or usage, 4 busy (GPUs or CPU slots held by another run), 5 a spec of another protocol version.
What the core and the agent say to each other is typed in ``protocol.py``: the start spec, the
status, lease holders, every state and failure kind.

Commands
--------
``start SPEC_PATH [--wait-store ADDRESS PORT]``
    SPEC is JSON (protocol.StartSpec)::

        {"protocol": 1, "run": "ddp-20261123-101200-a3f1", "attempt": 1, "node": "n1",
         "workdir": "~/.ava",                              # ~ expanded by the agent
         "tree": "/home/u/.ava/trees/HASH",                # the run's code tree (immutable)
         "cwd": "/home/u/.ava/runs/RUN/work",              # the run directory, copied from tree
         "argv": ["python3", "-m", "torch.distributed.run", ...],   # exec'd as is, no shell
         "env": {"K": "V"},                                # added to the inherited env
         "limits": {"memory": bytes|null, "cpus": float|null, "pids": int|null},
         "gpus": {"want": 2, "allowed": [0, 1, 2, 3]},     # want 0: no GPU lease
         "cpu_slots": {"want": 2, "total": 8} | null,      # null: no CPU lease
         "cgroup_parent": "ava", "user": "alice",
         "isolation": "auto"}       # optional: auto | systemd | v2 | v1 | none

    Takes the leases (busy: exit 4, ``{"error": "busy", "holders": [{run, attempt, node,
    user, gpus, cpu_slots, pid, started}]}``), makes the run directory ``cwd`` from ``tree``
    at the run's first start on this node (kept for its later attempts; see rundir.py),
    creates ``WORKDIR/runs/RUN/attempt-N/``,
    starts a detached monitor (double fork, setsid, stdio off the SSH session) that fences
    the job in a cgroup, then prints the status once it is ``running`` (or final). The job
    gets the spec env plus ``CUDA_VISIBLE_DEVICES`` (leased indices; "" when want=0 on a
    node with allowed GPUs), ``AVA_PROGRESS_FILE``, ``AVA_METRICS_FILE``, ``AVA_RANK_ERRORS`` (where the rank hook,
    ava/rankhook.py, notes each rank's uncaught exception), ``AVA_RUN_ID`` and ``AVA_JOB_TAG``
    (``<run>.<node>.a<attempt>``, also the cgroup name). stdout+stderr go to
    ``attempt-N/output.log``. The status records each rank's exit code and when it failed.
    Starting the same attempt again reports it, starts nothing. With ``--wait-store`` (the
    master) it answers twice: a first line once its torchrun is started (``"store": "waiting"``;
    the launcher starts the other nodes on it), the last once the rendezvous store at
    ADDRESS:PORT listens (``"store": "ready"``) or why it never did.
``status WORKDIR RUN [--attempt N] [--since DIGEST --wait S] [--metrics-from K]``
    The status object (see ``status.py`` for every key, plus its ``digest``) of the given or
    latest attempt. A non-final attempt whose monitor is dead is ended and reported failed /
    agent-died. With ``--since``, a long poll: answers when the judged part of the status
    (state, rank failures, exit codes) differs from DIGEST, else after S seconds. With
    ``--metrics-from``, also the metric lines written past byte K (``metrics``, ``metrics_end``).
``stop WORKDIR RUN [--grace SECONDS]``
    SIGTERM, grace (default 10 s), kill the whole cgroup, verify it empty, remove it,
    release the run's leases. Prints ``{"run", "stopped", "remaining_pids", "cgroup_removed"}``.
    Idempotent; an unknown run stops fine.
``logs WORKDIR RUN --attempt N [--offset K] [--follow]``
    Raw bytes of output.log from offset K; ``--follow`` streams until the attempt is final
    and the file drained.
``leases WORKDIR``
    ``{"holders": [...]}`` after reclaiming holders whose monitor died.
``list WORKDIR``
    ``{"runs": [status of each run's latest attempt]}``.
``route MASTER INTERFACE [--port] [--tree HASH --workdir W]``
    This node's address and interface toward MASTER (and a free port), and which code trees
    it has (``trees_ready``).
``tree missing|build|locked ...``, ``bench-allreduce``, ``free-port``, ``node-site VENV``, ``cache``
    The core's node programs (programs.py, cachecli.py): code sync, the bandwidth check, a free
    port, a venv's view of the node's packages, the node cache's command line.

Modules: main (CLI), spec, monitor (monitor, reaper, job child), ranks (when each rank
failed), rundir (run directories), treesync (code store), teardown, status, leases,
layout (files under WORKDIR), procs, isolation (interface, probe, none back-end),
cgroupv1, cgroupv2 (v2 and systemd scope). Inside the zipapp the package is ``avaagent``,
so modules import each other relatively only.
"""

from __future__ import annotations

import os

# hashlib, io and zipfile are imported where the zipapp is built (by the CLI), not here: this
# module runs first in every agent call on the nodes.

ZIP_PACKAGE = "avaagent"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_MAIN = b"import sys\n\nfrom avaagent.main import main\n\nsys.exit(main())\n"


def build_zipapp() -> tuple[bytes, str]:
    """The agent as one runnable zip (``python3 agent.pyz CMD``) and its sha256 hex.

    Deterministic: fixed timestamps and modes, sorted entries, no compression, so the same
    sources always give the same digest (the core ships it only when the digest changed)."""
    import hashlib
    import io
    import zipfile

    here = os.path.dirname(os.path.abspath(__file__))
    entries = [("__main__.py", _MAIN)]
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                entries.append((f"{ZIP_PACKAGE}/{name}", f.read()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for arcname, data in sorted(entries):
            info = zipfile.ZipInfo(arcname, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, data)
    blob = buf.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


def with_bytecode(blob: bytes) -> bytes:
    """The zipapp BLOB with each module's bytecode beside its source (``x.pyc`` next to ``x.py``,
    where zipimport looks), for this interpreter. A zip cannot cache bytecode the way a directory
    does, so every agent call compiled the modules it imports again: ~0.05 s of CPU per call (a
    start, each status poll). Unchecked hash-based pycs (PEP 552): the zip's fixed timestamps say
    nothing of the source. A node whose Python differs ignores them (another magic number) and
    compiles from the sources, as before. The node's file keeps the sources' name (digest)."""
    import importlib.util
    import io
    import marshal
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for info in source.infolist():
            data = source.read(info)
            zf.writestr(info, data)
            if info.filename.endswith(".py"):
                code = compile(data, info.filename, "exec", dont_inherit=True)
                flags = (0b01).to_bytes(4, "little")  # hash-based, source not checked
                pyc = importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(data) + marshal.dumps(code)
                compiled = zipfile.ZipInfo(info.filename + "c", date_time=info.date_time)
                compiled.external_attr, compiled.create_system = info.external_attr, info.create_system
                zf.writestr(compiled, pyc)
    return out.getvalue()
