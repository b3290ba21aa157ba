"""Build `dist/ava`: ava as one executable file for Linux (`python -m ava.build`).

    python -m ava.build [--out dist/ava] [--arch x86_64|aarch64] [--pythons 3.10,3.11,...]

The file is a shiv zipapp (shiv: LinkedIn's zipapp builder, the one that unpacks its
site-packages once into a cache keyed by the build's hash instead of on every start). It holds ava
and every dependency as platform wheels for each CPython in --pythons (compiled modules carry the
interpreter in their file name, so the builds of several versions lie side by side in one tree;
cryptography, bcrypt and pynacl are abi3 anyway), and it needs only the system `python3` of one
of those versions and glibc >= 2.28 (manylinux_2_28). torch is never inside: nodes bring their own.
The compiled wheels are downloaded for --arch, so an aarch64 file is built on any machine
(`--arch aarch64`), no cross toolchain needed.

Each version's dependencies are resolved by that version's own interpreter where one is found
(pip evaluates `python_version` markers against the interpreter that runs it), else by this one
with `--python-version` for versions not older than this one. The versions of the first resolution
pin the others, so one pure-Python file never differs between versions.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ava.onefile import INTERPRETER_FLAGS

REPO = Path(__file__).resolve().parent.parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
GLIBC = (2, 28)


class BuildError(Exception):
    """A step of the build failed; the message says which and what to do."""


def platforms(arch: str) -> list[str]:
    """Every manylinux tag a glibc-GLIBC machine runs (pip does not widen manylinux_2_X itself)."""
    tags = [f"manylinux_{GLIBC[0]}_{minor}_{arch}" for minor in range(GLIBC[1], 16, -1)]
    return tags + [f"manylinux2014_{arch}"]


def dependencies() -> list[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def interpreter_for(version: str) -> str | None:
    """A python of exactly this version here (PATH, then pyenv's versions), or None."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version == here:
        return sys.executable
    candidates = [shutil.which(f"python{version}") or ""]
    pyenv = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser() / "versions"
    if pyenv.is_dir():
        candidates += sorted((str(p / "bin" / f"python{version}") for p in pyenv.glob(f"{version}.*")), reverse=True)
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and "/shims/" not in candidate and _has_pip(candidate):
            return candidate
    return None


def _has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def _run(argv: Sequence[str], what: str) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {done.returncode}):\n{tail}")


def download_dependencies(version: str, arch: str, wheelhouse: Path, pins: Path | None) -> None:
    """The wheels of ava's dependencies for CPython VERSION on ARCH, into WHEELHOUSE."""
    python = interpreter_for(version)
    here = sys.version_info[:2]
    wanted = tuple(int(p) for p in version.split("."))
    if python is None and wanted < here:
        raise BuildError(
            f"Python {version}: no python{version} here to resolve its dependencies with "
            f"(pip reads markers such as python_version < '3.11' from the interpreter that runs it); "
            f"install one (pyenv install {version}) or leave {version} out of --pythons"
        )
    argv = [
        python or sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        version,
        "--dest",
        str(wheelhouse),
    ]
    for tag in platforms(arch):
        argv += ["--platform", tag]
    if pins is not None:
        argv += ["--constraint", str(pins)]
    _run(argv + dependencies(), f"resolving the dependencies for CPython {version} {arch}")


def pins_of(wheelhouse: Path) -> str:
    """`name==version` for every wheel in WHEELHOUSE."""
    return "".join(f"{'=='.join(wheel.name.split('-')[:2])}\n" for wheel in sorted(wheelhouse.glob("*.whl")))


def unpack(wheel: Path, site: Path) -> None:
    """Install WHEEL into SITE as pip would for a library (no scripts, headers or data files).

    A file already there must be the same, but for a distribution's metadata and abi3 modules:
    wheels come oldest Python first, and an abi3 module of an older one runs on every newer one."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if info.is_dir():
                continue
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            rel = "/".join(parts)
            dest = site / rel
            data = archive.read(info)
            if dest.exists():
                kept = parts[0].endswith(".dist-info") or rel.endswith(".abi3.so") or dest.read_bytes() == data
                if not kept:
                    raise BuildError(
                        f"{rel}: differs between the wheels of {wheel.name.split('-')[0]} for two "
                        f"Python versions; the builds must agree"
                    )
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, 0o755 if mode & 0o111 else 0o644)


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "ava", "pyproject.toml")
    return commit + ("+dirty" if dirty else "")


def build_info(pythons: Sequence[str], arch: str) -> dict[str, str]:
    from ava import __version__

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        if epoch
        else datetime.datetime.now(datetime.timezone.utc)
    )
    return {
        "version": __version__,
        "commit": git_commit(),
        "date": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "pythons": ",".join(pythons),
        "platform": f"manylinux_{GLIBC[0]}_{GLIBC[1]}_{arch}",
    }


def stage_ava(staging: Path, info: dict[str, str]) -> Path:
    """A copy of the checkout's package with its build record (ava/_build.py) added."""
    source = staging / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "ava", source / "ava", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (source / "ava" / "_build.py").write_text(
        f'"""Written by `python -m ava.build` into the one file only: which build this is."""\n\nBUILD = {info!r}\n'
    )
    return source


def build(out: Path, arch: str = "x86_64", pythons: Sequence[str] = PYTHONS) -> dict[str, str]:
    """Build the file at OUT; returns its build record."""
    try:
        import shiv  # type: ignore[import-untyped,unused-ignore]  # noqa: F401  # shiv has no stubs or py.typed
    except ImportError:
        raise BuildError("shiv is not installed: pip install -e '.[build]' (or pip install shiv)") from None
    pythons = sorted(pythons, key=lambda v: tuple(int(p) for p in v.split(".")))
    info = build_info(pythons, arch)
    with tempfile.TemporaryDirectory(prefix="ava-build-") as scratch:
        staging = Path(scratch)
        site = staging / "site-packages"
        site.mkdir()
        # The oldest version's resolution pins the others, which then resolve side by side.
        houses = [staging / f"cp{version.replace('.', '')}" for version in pythons]
        download_dependencies(pythons[0], arch, houses[0], None)
        pins = staging / "pins.txt"
        pins.write_text(pins_of(houses[0]))
        with ThreadPoolExecutor(max_workers=4) as pool:
            for done in [pool.submit(download_dependencies, v, arch, h, pins) for v, h in zip(pythons[1:], houses[1:])]:
                done.result()
        unpacked = set()
        for house in houses:
            for wheel in sorted(house.glob("*.whl")):
                if wheel.name not in unpacked:
                    unpack(wheel, site)
                    unpacked.add(wheel.name)
        source = stage_ava(staging, info)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-compile",
                "--no-deps",
                "--target",
                str(site),
                str(source),
            ],
            "installing ava into the bundle",
        )
        shutil.rmtree(site / "bin", ignore_errors=True)  # ava's own console script
        out.parent.mkdir(parents=True, exist_ok=True)
        _run(
            [
                sys.executable,
                "-m",
                "shiv",
                "--site-packages",
                str(site),
                "--entry-point",
                "ava.onefile:start",
                "--output-file",
                str(out),
                "--python",
                f"/usr/bin/env -S python3 {INTERPRETER_FLAGS}",
                "--reproducible",
                "--compressed",
            ],
            "shiv",
        )
    info["size"] = str(out.stat().st_size)
    info["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ava.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "ava", help="where to write the file")
    parser.add_argument("--arch", choices=("x86_64", "aarch64"), default="x86_64")
    parser.add_argument(
        "--pythons", default=",".join(PYTHONS), help="CPython versions whose wheels the file carries (comma-separated)"
    )
    options = parser.parse_args(argv)
    pythons = [v.strip() for v in options.pythons.split(",") if v.strip()]
    if not all(re.fullmatch(r"3\.\d+", v) for v in pythons):
        parser.error(f"--pythons {options.pythons}: expected versions like 3.10,3.11")
    try:
        info = build(options.out, options.arch, pythons)
    except BuildError as failure:
        sys.stderr.write(f"ava.build: {failure}\n")
        return 1
    size = int(info["size"]) / 2**20
    print(
        f"{options.out}: {size:.1f} MiB, ava {info['version']} ({info['commit']}, {info['date']}), "
        f"CPython {info['pythons']}, {info['platform']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
