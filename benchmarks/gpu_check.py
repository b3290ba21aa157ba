"""The GPU path through ava, on this machine's NVIDIA GPUs and the embedded `local` node.

    python benchmarks/gpu_check.py [--dry-run] [--trials 2] [--sizes 256M,1G] [--budget 480] [--simulate N]

Runs the `ava` CLI (`python -m ava`) against an inventory that is the repository's ava.toml
(only `[nodes.local]`, `transport = "local"`) with this machine's GPU indices added (`gpus`:
placement reads them from the inventory), this interpreter as the node's python and a scratch
workdir and AVA_HOME, so nothing is left in ~/.ava. The job is benchmarks/gpu (recipe.toml and
allreduce.py). Checks, one row each:

- `ava nodes --json`: the local node's GPUs as nvidia-smi lists them;
- `ava doctor --json`: its GPU checks (gpus, models alike, health) and the isolation back-end;
- a 1-node NCCL job leasing 1 GPU, and 2 where there are 2: it succeeds and sees only its GPUs;
- while a first run holds GPU 0, a second run asking for it is refused, naming the holder;
- a run without that GPU (gpus_per_node = 0; and with 2 GPUs, one leased GPU 1) opens the
  /dev/nvidiaN files and reports: EPERM from its devices cgroup for every GPU it did not lease;
- `ava stop` of the holder frees its lease;
- NCCL all-reduce bandwidth (nccl-tests' busbw = algbw x 2(n-1)/n, on every GPU) inside ava's
  cgroup against the same script started by torchrun directly, without ava, in alternating trials
  (medians). Target: within 5%. On one GPU busbw is 0 by definition (and the all-reduce moves
  nothing), so the same job's device-to-device copy bandwidth of the largest size is compared.

Then one table: check, result (PASS, WARN, FAIL, SKIP; DRY on the CPU path), figure. A failed
step prints FAIL with its reason and the next check runs. Every subprocess has a timeout, runs
are stopped with `ava stop`, and the whole script keeps to `--budget` seconds (8 minutes,
installs included: ava, with `pip install -e .[local]`, and torch where they are missing).

Without a GPU (no nvidia-smi, or it lists none), or with --dry-run: one line saying so, then
what runs on CPU: argument parsing, ava itself, `ava nodes` and `ava doctor` on the local node,
the recipe through `ava train --dry-run` for 0, 1 and 2 GPUs, the device probe of allreduce.py,
and the table with placeholder rows. Exit 0 when nothing failed, else 1.

`--simulate N` (root, no GPU needed) tests the GPU path itself: N fake /dev/nvidiaN device files
(NVIDIA's major, minors from 240; removed at the end) stand for the GPUs, and the all-reduce runs
with Gloo on CPU. Everything but nvidia-smi's facts and NCCL runs as on a GPU machine: leases,
the refusal, the devices cgroup (a leased fake device gets ENXIO from the missing driver, past the
cgroup; one not leased gets EPERM), `ava stop`, and the bandwidth comparison.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "benchmarks" / "gpu"
RECIPE = JOB / "recipe.toml"
TARGET_RATIO = 0.95  # in ava's cgroup / without ava, bandwidth
PASS, WARN, FAIL, SKIP, DRY = "PASS", "WARN", "FAIL", "SKIP", "DRY"
GPU_CHECKS = ("gpus", "gpu models alike", "gpu health")
NVIDIA_MAJOR = 195  # /dev/nvidiaN character devices
SIMULATED_MINORS = 240  # --simulate's fake devices: from here up (tests use 200 and up)
NO_GPU_FIGURE = "(needs a GPU)"


class Failed(Exception):
    """A check failed: its one-line reason."""


@dataclass
class Row:
    check: str
    result: str
    figure: str


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int


@dataclass
class Done:
    """One finished command."""

    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err

    def last_line(self) -> str:
        lines = [l.strip() for l in self.text.splitlines() if l.strip()]
        return lines[-1][:240] if lines else f"exit {self.code}, no output"


# -- commands with timeouts ---------------------------------------------------------------------


def run(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> Done:
    """Run ARGV in a session of its own; on timeout SIGTERM its group (a foreground `ava train
    --stop-on-interrupt` then stops its run), and SIGKILL what is left 30 s later."""
    started = time.monotonic()
    process = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        out, err = _end(process)
        raise Failed(f"{_short(argv)} timed out after {timeout:.0f} s: {_tail(out + err)}") from None
    except BaseException:  # Ctrl-C or SIGTERM here: its own session did not get it
        _end(process)
        raise
    return Done(list(argv), process.returncode, out, err, time.monotonic() - started)


def _end(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM the command's group, SIGKILL it 30 s later; what it printed."""
    _signal_group(process, signal.SIGTERM)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        return process.communicate()


def _signal_group(process: subprocess.Popen[str], number: int) -> None:
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


def _short(argv: Sequence[str]) -> str:
    words = [Path(a).name if a == sys.executable else a for a in argv]
    return " ".join(w for w in words if not w.startswith("/"))[:80]


def _tail(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:200] if lines else "no output"


# -- this machine ---------------------------------------------------------------------------------


def find_gpus() -> tuple[list[Gpu], str]:
    """The GPUs nvidia-smi lists, or none and why."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        done = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return [], f"nvidia-smi did not answer: {error}"
    if done.returncode != 0:
        return [], f"nvidia-smi failed: {_tail(done.stdout + done.stderr)}"
    found = []
    for line in done.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            memory = int(parts[2]) if parts[2].isdigit() else 0
            found.append(Gpu(int(parts[0]), parts[1], memory))
    return found, "" if found else "nvidia-smi lists no GPU"


def device_paths(indices: Sequence[int]) -> dict[int, str]:
    """GPU index (nvidia-smi order: PCI bus order) -> its /dev/nvidiaN, by the driver's minors."""
    base = Path("/proc/driver/nvidia/gpus")
    minors: dict[int, int] = {}
    try:
        buses = sorted(os.listdir(base))
    except OSError:
        buses = []
    for index, bus in enumerate(buses):
        try:
            text = (base / bus / "information").read_text()
        except OSError:
            continue
        if match := re.search(r"Device Minor:\s*(\d+)", text):
            minors[index] = int(match.group(1))
    return {i: f"/dev/nvidia{minors.get(i, i)}" for i in indices}


def fake_gpus(count: int, made: list[str]) -> list[Gpu]:
    """COUNT /dev/nvidiaN character devices (NVIDIA's major) for minors nothing uses, noted in
    MADE for removal. No driver answers them: an open that the cgroup lets through fails with
    ENXIO, one it refuses with EPERM. Without the driver ava takes a device's minor as its index."""
    if os.geteuid() != 0:
        raise SystemExit("--simulate makes /dev/nvidiaN device files: run it as root")
    free = [m for m in range(SIMULATED_MINORS, 256) if not os.path.exists(f"/dev/nvidia{m}")][:count]
    for minor in free:
        os.mknod(f"/dev/nvidia{minor}", 0o666 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, minor))
        made.append(f"/dev/nvidia{minor}")
    return [Gpu(minor, "simulated", 0) for minor in free]


def toml_string(value: str) -> str:
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


def write_inventory(path: Path, scratch: Path, gpus: Sequence[int] | None) -> Path:
    """The repository's ava.toml (its local node only), with GPUs, this python and a scratch workdir."""
    shipped = (REPO / "ava.toml").read_text()
    if '[nodes.local]\ntransport = "local"' not in shipped:
        raise Failed(f'{REPO / "ava.toml"}: no [nodes.local] with transport = "local"')
    lines = [
        "# benchmarks/gpu_check.py: the repository's local node, with this machine's GPUs",
        "[nodes.local]",
        'transport = "local"',
        f"python = {toml_string(sys.executable)}",
        f"workdir = {toml_string(str(scratch / 'work'))}",
        f"cache_dir = {toml_string(str(scratch / 'cache'))}",
    ]
    if gpus is not None:
        lines.append(f"gpus = [{', '.join(str(g) for g in gpus)}]")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the checks --------------------------------------------------------------------------------------


@dataclass
class Check:
    options: argparse.Namespace
    scratch: Path
    gpus: list[Gpu]
    began: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # every run started: stopped at the end
    inventory: Path = Path()
    isolation: str = "?"
    simulated: bool = False  # --simulate: fake /dev/nvidiaN files and Gloo on CPU

    def bench(self, sizes: str, *more: str) -> list[str]:
        """allreduce.py's arguments for an all-reduce of SIZES."""
        return ["bench", "--sizes", sizes, *more, *(["--backend", "gloo"] if self.simulated else [])]

    # -- plumbing -------------------------------------------------------------------------------

    def left(self) -> float:
        return float(self.options.budget) - (time.monotonic() - self.began)

    def timeout(self, most: float) -> float:
        left = self.left() - 20  # room to stop what runs and print the table
        if left < 10:
            raise Failed("out of time budget")
        return min(most, left)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "AVA_INVENTORY"}
        env.update({"AVA_HOME": str(self.scratch / "home"), "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
        return env

    def ava(self, *args: str, most: float = 120, inventory: Path | None = None) -> Done:
        argv = [sys.executable, "-m", "ava", "--inventory", str(inventory or self.inventory), *args]
        return run(argv, timeout=self.timeout(most), env=self.env())

    def step(self, name: str, body: Callable[[], tuple[str, str]]) -> None:
        """Run one check; a failure is its row, and the next check runs."""
        try:
            result, figure = body()
        except Failed as failure:
            result, figure = (SKIP if str(failure) == "out of time budget" else FAIL), str(failure)
        except Exception as failure:  # a defect here must not hide the other checks
            result, figure = FAIL, f"{type(failure).__name__}: {failure}"
        self.rows.append(Row(name, result, " ".join(figure.split())))
        print(f"  {result:4}  {name}: {self.rows[-1].figure}", flush=True)

    def train(self, *sets: str, args: Sequence[str], most: float = 180, detach: bool = False) -> Done:
        """`ava train` of the job with --set overrides, run.args = ARGS; foreground unless DETACH."""
        argv = ["train", str(RECIPE), "--set", f"run.args={json.dumps(list(args))}"]
        for item in sets:
            argv += ["--set", item]
        argv += ["--detach"] if detach else ["--stop-on-interrupt"]
        done = self.ava(*argv, most=most)
        found = re.search(r"\b(gpu-check-\d{8}-\d{6}-[0-9a-f]{4})\b", done.text)
        if found and found.group(1) not in self.runs:
            self.runs.append(found.group(1))
        return done

    # -- set-up -------------------------------------------------------------------------------

    def ensure_ava(self) -> tuple[str, str]:
        probe = [sys.executable, "-c", "import ava.cli, importlib.metadata as m; print(m.version('ava'))"]
        done = run(probe, timeout=self.timeout(60))
        if done.code == 0:
            return PASS, f"ava {done.out.strip()} in {sys.executable}"
        extra = "" if self.options.dry_run or not self.gpus else "[local]"
        install = [sys.executable, "-m", "pip", "install", "-q", "-e", f"{REPO}{extra}"]
        done = run(install, timeout=self.timeout(300))
        if done.code != 0:
            raise Failed(f"pip install -e .{extra} failed: {done.last_line()}")
        again = run(probe, timeout=self.timeout(60))
        if again.code != 0:
            raise Failed(f"ava still not importable after pip install: {again.last_line()}")
        return PASS, f"installed: pip install -e .{extra} ({done.seconds:.0f} s)"

    def ensure_torch(self) -> tuple[str, str]:
        probe = [
            sys.executable,
            "-c",
            "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
            " 'available': torch.cuda.is_available(), 'count': torch.cuda.device_count(),"
            " 'nccl': '.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}))",
        ]
        done = run(probe, timeout=self.timeout(120))
        installed = ""
        if done.code != 0 and "No module named 'torch'" in done.err:
            pip = run([sys.executable, "-m", "pip", "install", "-q", "torch"], timeout=self.timeout(360))
            if pip.code != 0:
                raise Failed(f"pip install torch failed: {pip.last_line()}")
            installed = f"; installed torch ({pip.seconds:.0f} s)"
            done = run(probe, timeout=self.timeout(120))
        if done.code != 0:
            raise Failed(f"import torch failed: {done.last_line()}")
        facts = json.loads(done.out.strip().splitlines()[-1])
        if self.simulated:
            return PASS, f"torch {facts['torch']} (simulated GPUs: Gloo on CPU){installed}"
        if not facts["available"]:
            raise Failed(f"torch {facts['torch']} sees no CUDA device (cuda {facts['cuda']}){installed}")
        return PASS, (
            f"torch {facts['torch']}, CUDA {facts['cuda']}, NCCL {facts['nccl']}, {facts['count']} devices{installed}"
        )

    # -- nodes and doctor ---------------------------------------------------------------------------

    def nodes(self, inventory: Path | None = None) -> dict[str, Any]:
        done = self.ava("nodes", "--json", inventory=inventory, most=90)
        try:
            listed = json.loads(done.out)
        except ValueError:
            raise Failed(f"ava nodes --json exited {done.code}: {done.last_line()}") from None
        local = next((n for n in listed if n.get("name") == "local"), None)
        if local is None or not local.get("reachable"):
            raise Failed(f"the local node did not answer: {(local or {}).get('error') or done.last_line()}")
        self.isolation = str(local.get("isolation") or "none")
        return dict(local)

    def reachable(self) -> tuple[str, str]:
        local = self.nodes()
        return PASS, f"local node reachable; isolation {self.isolation}, cgroup {local.get('cgroup')}"

    def check_nodes(self) -> tuple[str, str]:
        local = self.nodes()
        shown = [(int(g.get("index", -1)), str(g.get("name"))) for g in local.get("gpus") or []]
        expected = [(g.index, g.name) for g in self.gpus]
        figure = (
            f"{len(shown)} GPUs: {', '.join(sorted({n for _, n in shown})) or '-'}"
            f" ({self.gpus[0].memory_mib} MiB each); isolation {self.isolation}, cgroup {local.get('cgroup')}"
        )
        if shown != expected:
            raise Failed(f"ava nodes shows {shown}, nvidia-smi lists {expected}")
        return PASS, figure

    def check_doctor(self, *, expect_gpus: bool) -> tuple[str, str]:
        done = self.ava("doctor", "--json", most=150)
        try:
            report = json.loads(done.out)
        except ValueError:
            raise Failed(f"ava doctor --json exited {done.code}: {done.last_line()}") from None
        checks = [c for c in report.get("checks", []) if c.get("check") in GPU_CHECKS]
        isolation = next((c for c in report.get("checks", []) if c.get("check") == "isolation"), None)
        if not checks:
            raise Failed("ava doctor reported no GPU checks")
        parts = [f"{c['check']}: {c['status']} ({c['detail']})" for c in checks]
        if isolation:
            parts.append(f"isolation: {isolation['status']} ({isolation['detail']})")
        statuses = {c["status"] for c in checks}
        if expect_gpus and not any("no GPUs" not in c["detail"] for c in checks if c["check"] == "gpus"):
            raise Failed("ava doctor sees no GPUs: " + "; ".join(parts))
        result = FAIL if "fail" in statuses else WARN if "warn" in statuses else PASS
        return result, "; ".join(parts)

    # -- jobs ---------------------------------------------------------------------------------------

    def job(self, count: int) -> tuple[str, str]:
        done = self.train(f"resources.gpus_per_node={count}", args=self.bench("1M,64M"))
        result = _result(done)
        if done.code != 0 or result is None:
            raise Failed(f"ava train exited {done.code}: {_failure_line(done)}")
        visible = str(result.get("cuda_visible_devices"))
        if result["world"] != count or len(visible.split(",")) != count:
            raise Failed(
                f"asked for {count} GPUs, the job ran {result['world']} ranks on CUDA_VISIBLE_DEVICES={visible}"
            )
        row = result["rows"][-1]
        bandwidth = (
            f"all-reduce busbw {row['busbw'] / 1e9:.1f} GB/s"
            if count > 1
            else f"device copy {row['copy'] / 1e9:.1f} GB/s (one rank's all-reduce moves nothing)"
        )
        return PASS, (
            f"{count} rank(s) on CUDA_VISIBLE_DEVICES={visible} ({result['device']}, {_backend(result)}),"
            f" {_size(row['size'])}: {bandwidth}; ava train {done.seconds:.1f} s"
        )

    def hold_gpu(self) -> str:
        """Start a run that leases one GPU and keeps it; its run id once it holds the GPU."""
        done = self.train("resources.gpus_per_node=1", args=self.bench("1M", "--hold", "240"), detach=True)
        if done.code != 0 or not self.runs:
            raise Failed(f"ava train --detach exited {done.code}: {done.last_line()}")
        holder = self.runs[-1]
        deadline = time.monotonic() + self.timeout(150)
        while time.monotonic() < deadline:
            logs = self.ava("logs", holder, most=30)
            if "GPUCHECK-HOLDING" in logs.out:
                return holder
            state = self.ava("ps", holder, "--json", most=30)
            if '"state": "failed"' in state.out or '"state": "stopped"' in state.out:
                raise Failed(f"the holder {holder} ended: {_tail(logs.out)}")
            time.sleep(2)
        raise Failed(f"the holder {holder} did not take its GPU within the time allowed")

    def refused(self, holder: str) -> tuple[str, str]:
        count = len(self.gpus)  # every GPU: the holder's among them
        done = self.train(f"resources.gpus_per_node={count}", args=self.bench("1M"), most=120)
        busy = next((l.strip() for l in done.text.splitlines() if "busy" in l), "")
        if done.code == 0:
            raise Failed(
                f"not refused: a run asking for {count} GPU(s) ran while {holder} held GPU {self.gpus[0].index}"
            )
        if holder not in busy:
            raise Failed(f"refused (exit {done.code}) without naming {holder}: {busy or done.last_line()}")
        return PASS, f"exit {done.code} in {done.seconds:.1f} s: {busy.split('ava: ', 1)[-1]}"

    def fenced(self, holder: str) -> tuple[str, str]:
        paths = device_paths([g.index for g in self.gpus])
        outcomes = []
        # A run with no GPU: every GPU device refused by its cgroup.
        seen = self.probe(0, list(paths.values()))
        wrong = {p: r for p, r in seen.items() if r != "EPERM"}
        outcomes.append(f"no-GPU run: {', '.join(f'{p} {r}' for p, r in seen.items())}")
        if len(self.gpus) >= 2:
            # A run leasing one GPU while the holder has the first: it gets the second, and only
            # that one gets past the cgroup ("opened"; ENXIO where no driver backs a simulated one).
            own = paths[self.gpus[1].index]
            seen = self.probe(1, list(paths.values()))
            wrong.update({p: r for p, r in seen.items() if (r == "EPERM") == (p == own)})
            outcomes.append(f"run on GPU {self.gpus[1].index}: {', '.join(f'{p} {r}' for p, r in seen.items())}")
        if wrong:
            raise Failed(f"not fenced ({self.isolation}): {'; '.join(outcomes)}")
        return PASS, f"{'; '.join(outcomes)} (isolation {self.isolation}; {holder} holds GPU {self.gpus[0].index})"

    def probe(self, count: int, paths: list[str]) -> dict[str, str]:
        done = self.train(f"resources.gpus_per_node={count}", args=["open", *paths], most=120)
        line = next((l for l in done.out.splitlines() if "GPUCHECK-OPEN " in l), None)
        if done.code != 0 or line is None:
            raise Failed(f"the device probe ({count} GPUs) exited {done.code}: {_failure_line(done)}")
        return dict(json.loads(line.split("GPUCHECK-OPEN ", 1)[1])["paths"])

    def stop(self, holder: str) -> tuple[str, str]:
        done = self.ava("stop", holder, most=90)
        if done.code != 0:
            raise Failed(f"ava stop {holder} exited {done.code}: {done.last_line()}")
        leases = self.nodes().get("leases") or []
        if any(l.get("run") == holder for l in leases):
            raise Failed(f"{holder} still holds a lease after ava stop: {leases}")
        return PASS, f"ava stop {done.seconds:.1f} s; no lease left ({len(leases)} held)"

    # -- bandwidth ----------------------------------------------------------------------------------

    def bandwidth(self) -> tuple[str, str]:
        count = len(self.gpus)
        args = self.bench(self.options.sizes)
        figures: dict[str, list[float]] = {"ava": [], "direct": []}
        key = "busbw" if count > 1 else "copy"  # one rank's all-reduce moves nothing: its copy speed
        size = 0
        for trial in range(self.options.trials):
            for how in ("ava", "direct") if trial % 2 == 0 else ("direct", "ava"):
                if how == "ava":
                    done = self.train(f"resources.gpus_per_node={count}", args=args, most=240)
                else:
                    done = self.torchrun(count, args)
                result = _result(done)
                if done.code != 0 or result is None:
                    raise Failed(f"{how} trial {trial + 1} exited {done.code}: {_failure_line(done)}")
                row = result["rows"][-1]
                figures[how].append(float(row[key]))
                size = int(row["size"])
        ava, direct = statistics.median(figures["ava"]), statistics.median(figures["direct"])
        ratio = ava / direct if direct else float("nan")
        samples = f"ava {' '.join(f'{v / 1e9:.1f}' for v in figures['ava'])}; direct " + " ".join(
            f"{v / 1e9:.1f}" for v in figures["direct"]
        )
        figure = (
            f"{key} at {_size(size)} on {count} GPU(s): ava {ava / 1e9:.1f} GB/s / torchrun without ava"
            f" {direct / 1e9:.1f} GB/s = {ratio:.3f} (target >= {TARGET_RATIO}; samples {samples})"
        )
        if self.simulated:  # CPU memory on a machine shared with everything else: not judged
            return (PASS if ratio >= TARGET_RATIO else WARN), figure + " (simulated: Gloo on CPU, not judged)"
        return (PASS if ratio >= TARGET_RATIO else FAIL), figure

    def torchrun(self, count: int, args: list[str]) -> Done:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(count),
            str(JOB / "allreduce.py"),
            *args,
        ]
        env = self.env()
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g.index) for g in self.gpus)
        env["OMP_NUM_THREADS"] = "1"
        return run(argv, timeout=self.timeout(240), env=env)

    # -- the end --------------------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Stop every run this script started (a finished run's stop is a no-op)."""
        for run_id in self.runs:
            try:
                argv = [sys.executable, "-m", "ava", "--inventory", str(self.inventory), "stop", run_id]
                run(argv, timeout=60, env=self.env())
            except Failed as failure:
                print(f"  could not stop {run_id}: {failure}", file=sys.stderr)


def _result(done: Done) -> dict[str, Any] | None:
    for line in done.out.splitlines():
        if "GPUCHECK {" in line:
            return dict(json.loads(line.split("GPUCHECK ", 1)[1]))
    return None


def _failure_line(done: Done) -> str:
    """The most telling line of a failed run: ava's cause, else the last line."""
    for line in reversed(done.err.splitlines()):
        if "failed" in line or "error" in line.lower() or "busy" in line:
            return line.strip()[:240]
    return done.last_line()


def _backend(result: dict[str, Any]) -> str:
    return f"NCCL {result['nccl']}" if result.get("nccl") else str(result.get("backend", "?"))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


# -- the two paths -----------------------------------------------------------------------------------


def gpu_path(check: Check) -> None:
    check.step("setup: ava importable", check.ensure_ava)
    check.step("setup: torch with CUDA", check.ensure_torch)
    check.inventory = write_inventory(check.scratch / "ava.toml", check.scratch, [g.index for g in check.gpus])
    if check.simulated:
        for name in ("ava nodes --json: GPU facts", "ava doctor: GPU checks"):
            check.rows.append(Row(name, SKIP, "simulated GPUs: nvidia-smi has none to show"))
        check.step("ava nodes --json (local node)", check.reachable)
    else:
        check.step("ava nodes --json: GPU facts", check.check_nodes)
        check.step("ava doctor: GPU checks", lambda: check.check_doctor(expect_gpus=True))
    check.step("NCCL job leasing 1 GPU", lambda: check.job(1))
    if len(check.gpus) >= 2:
        check.step("NCCL job leasing 2 GPUs", lambda: check.job(2))
    holder: list[str] = []

    def hold() -> tuple[str, str]:
        holder.append(check.hold_gpu())
        return PASS, f"{holder[0]} leased GPU {check.gpus[0].index} and holds it"

    check.step("a run holds the first GPU", hold)
    if holder:
        check.step("second run for that GPU refused, holder named", lambda: check.refused(holder[0]))
        check.step("run without that GPU denied /dev/nvidiaN", lambda: check.fenced(holder[0]))
        check.step("ava stop frees the lease", lambda: check.stop(holder[0]))
    else:
        for name in (
            "second run for that GPU refused, holder named",
            "run without that GPU denied /dev/nvidiaN",
            "ava stop frees the lease",
        ):
            check.rows.append(Row(name, SKIP, "no run holds the first GPU (see above)"))
    check.step("NCCL all-reduce: in ava's cgroup / without ava", check.bandwidth)


def cpu_path(check: Check) -> None:
    """What runs without a GPU: every piece the GPU path uses, then placeholder rows."""
    check.step(
        "arguments",
        lambda: (
            PASS,
            f"trials {check.options.trials}, sizes {check.options.sizes}, budget {check.options.budget:.0f} s",
        ),
    )
    check.step("setup: ava importable", check.ensure_ava)
    plain = write_inventory(check.scratch / "ava-plain.toml", check.scratch, None)
    # Placeholder GPU indices: placement reads GPUs from the inventory, so the recipe can be planned.
    check.inventory = write_inventory(check.scratch / "ava.toml", check.scratch, [0, 1])

    def nodes() -> tuple[str, str]:
        local = check.nodes(plain)
        return PASS, f"local node reachable; {len(local.get('gpus') or [])} GPUs; isolation {check.isolation}"

    check.step("ava nodes --json (local node)", nodes)

    def doctor() -> tuple[str, str]:
        check.inventory, placeholder = plain, check.inventory
        try:
            return check.check_doctor(expect_gpus=False)
        finally:
            check.inventory = placeholder

    check.step("ava doctor --json: GPU checks present", doctor)
    for count in (0, 1, 2):
        check.step(f"recipe plans with {count} GPU(s): ava train --dry-run", functools.partial(dry_plan, check, count))
    check.step("allreduce.py open: the device probe", lambda: probe_here(check))
    check.step("bus bandwidth formula", busbw_formula)
    for name in (
        "ava nodes --json: GPU facts",
        "ava doctor: GPU checks",
        "NCCL job leasing 1 GPU",
        "NCCL job leasing 2 GPUs",
        "second run for that GPU refused, holder named",
        "run without that GPU denied /dev/nvidiaN",
        "ava stop frees the lease",
        "NCCL all-reduce: in ava's cgroup / without ava",
    ):
        check.rows.append(Row(name, DRY, NO_GPU_FIGURE))


def dry_plan(check: Check, count: int) -> tuple[str, str]:
    args = ["open", "/dev/nvidia0"] if count == 0 else ["bench", "--sizes", "1M,64M"]
    done = check.ava(
        "train",
        str(RECIPE),
        "--dry-run",
        "--json",
        "--set",
        f"resources.gpus_per_node={count}",
        "--set",
        f"run.args={json.dumps(args)}",
        most=90,
    )
    try:
        plan = json.loads(done.out)
        node = plan["nodes"][0]
    except (ValueError, KeyError, IndexError):
        raise Failed(f"ava train --dry-run exited {done.code}: {done.last_line()}") from None
    argv, spec = list(node["argv"]), node["spec"]
    procs = argv[argv.index("--nproc-per-node") + 1] if "--nproc-per-node" in argv else "?"
    want = (spec.get("gpus") or {}).get("want") if isinstance(spec, dict) else None
    if "torch.distributed.run" not in argv or procs != str(max(count, 1)) or want != count:
        raise Failed(f"planned nproc-per-node {procs}, gpus want {want}: expected {max(count, 1)} and {count}")
    return PASS, f"torchrun --nproc-per-node {procs}, spec gpus {spec.get('gpus')}, {plan['files']} file(s) shipped"


def probe_here(check: Check) -> tuple[str, str]:
    missing = "/dev/nvidia-gpucheck-none"
    done = run([sys.executable, str(JOB / "allreduce.py"), "open", "/dev/null", missing], timeout=check.timeout(30))
    line = next((l for l in done.out.splitlines() if l.startswith("GPUCHECK-OPEN ")), None)
    if done.code != 0 or line is None:
        raise Failed(f"allreduce.py open exited {done.code}: {done.last_line()}")
    seen = json.loads(line.split(" ", 1)[1])["paths"]
    if seen != {"/dev/null": "opened", missing: "ENOENT"}:
        raise Failed(f"unexpected probe result {seen}")
    return PASS, f"/dev/null opened, a missing device ENOENT (no torch imported: {done.seconds:.2f} s)"


def busbw_formula() -> tuple[str, str]:
    # benchmarks/gpu/allreduce.py imports only the standard library at import time.
    spec = importlib.util.spec_from_file_location("allreduce", JOB / "allreduce.py")
    if spec is None or spec.loader is None:
        raise Failed(f"cannot load {JOB / 'allreduce.py'}")
    allreduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allreduce)
    sizes = [allreduce.size_of(s) for s in ("1M", "256M", "1G", "4096")]
    if sizes != [1 << 20, 256 << 20, 1 << 30, 4096]:
        raise Failed(f"size_of gave {sizes}")
    # nccl-tests: busbw = algbw * 2(n-1)/n, so 8 ranks at algbw 100 carry 175 on each link.
    factor = {n: 2 * (n - 1) / n for n in (1, 2, 8)}
    return PASS, f"sizes parse; busbw/algbw = {factor[1]:g} (1 rank), {factor[2]:g} (2), {factor[8]:g} (8)"


def print_table(rows: list[Row], title: str) -> None:
    headers = ("check", "result", "figure")
    widths = [max(len(h), *(len(getattr(r, h)) for r in rows)) for h in headers[:2]]
    print(f"\n{title}")
    print(f"{'check'.ljust(widths[0])}  {'result'.ljust(widths[1])}  figure")
    print(f"{'-' * widths[0]}  {'-' * widths[1]}  ------")
    for row in rows:
        print(f"{row.check.ljust(widths[0])}  {row.result.ljust(widths[1])}  {row.figure}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="only what runs without a GPU, even on a GPU machine")
    parser.add_argument("--trials", type=int, default=2, help="bandwidth trials each way (alternating)")
    parser.add_argument(
        "--sizes", default=None, help="all-reduce sizes of the bandwidth check, the last compared (256M,1G)"
    )
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything, installs included")
    parser.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="N",
        help="test this script without a GPU (root): N fake /dev/nvidiaN files, Gloo on CPU",
    )
    options = parser.parse_args(argv)
    options.sizes = options.sizes or ("1M,4M" if options.simulate else "256M,1G")
    made: list[str] = []
    if options.simulate:
        gpus, why = fake_gpus(options.simulate, made), ""
        print(f"simulating {len(gpus)} GPU(s): {', '.join(made)} (major {NVIDIA_MAJOR}), Gloo on CPU", flush=True)
    else:
        gpus, why = ([], "--dry-run") if options.dry_run else find_gpus()
    if options.dry_run:
        print("dry run: checking only what runs without a GPU", flush=True)
    elif not gpus:
        print(f"no NVIDIA GPU here ({why}); checking what runs without one", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="ava-gpu-check-"))
    check = Check(options, scratch, gpus, simulated=bool(options.simulate))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if gpus:
            print(f"{len(gpus)} GPU(s): {', '.join(f'{g.index}: {g.name}' for g in gpus)}", flush=True)
            gpu_path(check)
        else:
            cpu_path(check)
    except KeyboardInterrupt:
        check.rows.append(Row("interrupted", FAIL, "Ctrl-C or SIGTERM: the remaining checks did not run"))
    finally:
        check.stop_all()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(scratch, ignore_errors=True)
        for path in made:
            os.unlink(path)
    where = f"{len(gpus)} GPU(s)" if gpus else "dry run" if options.dry_run else f"no GPU ({why})"
    print_table(check.rows, f"ava GPU check on the local node: {where}; {time.monotonic() - check.began:.0f} s")
    return 1 if any(r.result == FAIL for r in check.rows) else 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
