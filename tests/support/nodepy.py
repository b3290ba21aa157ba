"""The test nodes' own Python: a venv with torch and nothing of ava's, as a user's GPU node has.

The test's interpreter has ava installed (editable), with fabric, s3fs and moto: a node running
it would find on its own everything ava is meant to ship, and hide a broken shipment. So nodes run
a venv made with the machine's `python3 -m venv` (no system site-packages) over which only
`pip install torch==TORCH` went (torch's own requirements come with it: fsspec among them, as on
every node where pip installed torch). A second flavour adds s3fs, for the tests whose training
scripts read S3 (a user who reads S3 keeps s3fs in the node's environment). Neither has ava,
fabric, paramiko, typer, rich or moto: `tests/cluster/test_nodes_like_users.py` checks that.

Each is built once per machine and cached outside the checkout under $AVA_TEST_NODEPY_CACHE
(default /var/cache/ava-test-nodepy), in a folder named by the hash of its inputs (the base
interpreter, the torch wheel, the pinned extras, the build code); builders take a lock,
so two sessions never build the same venv at once. The s3fs flavour is a hard-linked copy of
the torch one plus s3fs, so torch's 800 MB are on the disk once.

By hand:  python -m tests.support.nodepy   (builds both, prints their interpreters)
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import inspect
import os
import shutil
import subprocess
from pathlib import Path

TORCH = "2.13.0"
BASE_PYTHON = "/usr/bin/python3"  # the machine's python3, as a node has it (not the test's pyenv)
CACHE = Path(os.environ.get("AVA_TEST_NODEPY_CACHE", "/var/cache/ava-test-nodepy"))
READY = ".ready"
# Pinned to what the test's interpreter runs, so both sides read S3 with the same s3fs.
S3_EXTRAS = (f"s3fs=={importlib.metadata.version('s3fs')}",)
# What must never be importable on a node: ava and the controller side's dependencies.
FOREIGN = ("ava", "fabric", "paramiko", "invoke", "typer", "rich", "moto", "s3fs")


def clean_env() -> dict[str, str]:
    """This process's environment minus what would lead an interpreter to the test's packages."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")
    }
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _torch_wheel() -> str:
    """The local torch wheel's name and size (pip takes it from the find-links folder)."""
    folders = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()]
    for folder in folders:
        for wheel in sorted(folder.glob(f"torch-{TORCH}*.whl")) if folder.is_dir() else []:
            return f"{wheel.name}:{wheel.stat().st_size}"
    return f"torch=={TORCH}"


def _key(extras: tuple[str, ...]) -> str:
    version = subprocess.run(
        [BASE_PYTHON, "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout
    code = [inspect.getsource(f) for f in (clean_env, _pip, _build)]
    inputs = [BASE_PYTHON, version, _torch_wheel(), *code, *extras, *([_key(())] if extras else [])]
    return hashlib.sha256("\0".join(inputs).encode()).hexdigest()[:16]


def _pip(venv: Path, *args: str) -> None:
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-input", *args],
        check=True,
        env=clean_env(),
    )


def _build(target: Path, extras: tuple[str, ...]) -> None:
    work = target.with_name(target.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    made_in = [work]
    if extras:
        base = node_venv()
        made_in.append(base)
        # Hard links: torch is shared with the plain venv; pip replaces files, never edits them.
        subprocess.run(["cp", "-al", str(base), str(work)], check=True)
        (work / READY).unlink()
        _pip(work, *extras)
    else:
        subprocess.run([BASE_PYTHON, "-m", "venv", str(work)], check=True, env=clean_env())
        _pip(work, f"torch=={TORCH}")
    # The scripts' #! lines name where they were made (`work`, or the plain venv copied here).
    for script in (work / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        text = script.read_text(errors="surrogateescape")
        for made in made_in:
            if text.startswith(f"#!{made}/"):
                script.unlink()  # not written in place: it may be a hard link into the plain venv
                script.write_text(text.replace(f"#!{made}/", f"#!{target}/", 1), errors="surrogateescape")
                script.chmod(0o755)
                break
    (work / READY).write_text(" ".join(extras) + "\n")
    work.rename(target)


def node_venv(*, s3fs: bool = False) -> Path:
    """The node venv's folder (built on first use, then cached)."""
    extras = S3_EXTRAS if s3fs else ()
    target = CACHE / f"{'s3-' if s3fs else ''}{_key(extras)}"
    if (target / READY).exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / READY).exists():
            if subprocess.run([BASE_PYTHON, "-c", "import ensurepip, venv"], capture_output=True).returncode:
                raise RuntimeError(f"{BASE_PYTHON} cannot make a venv: apt-get install python3-venv")
            shutil.rmtree(target, ignore_errors=True)
            _build(target, extras)
    return target


def node_python(*, s3fs: bool = False) -> str:
    return str(node_venv(s3fs=s3fs) / "bin" / "python")


if __name__ == "__main__":
    print(node_python())
    print(node_python(s3fs=True))
