"""How the one-file `ava` (built by `python -m ava.build`) starts, and how it starts itself again.

The file is a shiv zipapp: on its first start shiv unpacks the bundled site-packages once into
`~/.shiv/ava_<hash of the contents>/` ($SHIV_ROOT moves it); every later start only adds that
directory to `sys.path`. `start()` is its entry point. It runs under the system `python3` with
`-S -E` (no site-packages, no PYTHON* variables, see `INTERPRETER_FLAGS`), and it drops anything
else from `sys.path`, so the file imports only the standard library and what it carries.
Standard library only: this runs before anything else is importable.
"""

from __future__ import annotations

import os
import sys

# The shebang's flags: no site-packages (a system python3 may carry an old cryptography) and no
# PYTHONPATH/PYTHONHOME from the caller's environment.
INTERPRETER_FLAGS = "-SE"
# Hidden, for tests: a directory where each process of the file writes, as it exits, where
# every module it loaded came from (ROLE-PID.txt: ava, or the module it ran).
MODULES_ENV = "AVA_ONEFILE_MODULES"
# Set only for a child the file starts of itself (see python_module): the module it runs.
MODULE_ENV = "AVA_ONEFILE_MODULE"

_file: str | None = None


def python_module(module: str) -> list[str]:
    """The argv that runs `python -m MODULE` of this same ava in a new process: the installed
    package's interpreter, or, inside the one file, the system python3 on the file."""
    if _file is None:
        return [sys.executable, "-m", module]
    return [sys.executable, INTERPRETER_FLAGS, _file]


def child_env(module: str) -> dict[str, str]:
    """What to add to a child's environment for `python_module(module)` (nothing outside the file)."""
    return {} if _file is None else {MODULE_ENV: module}


def bundle_dir() -> str:
    """The unpacked site-packages this module was imported from."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _isolate() -> None:
    """Keep on sys.path only the standard library and the bundle (belt and braces to -S -E, for
    `python3 ava` run by hand without them)."""
    stdlib = os.path.dirname(os.__file__)
    bundle = bundle_dir()

    def own(entry: str) -> bool:
        path = os.path.abspath(entry or ".")
        if path in (_file, bundle) or path.startswith(bundle + os.sep):
            return True
        parts = path.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return False
        if path.endswith(".zip"):  # the stdlib as a zip (python311.zip), where there is one
            return path.startswith(sys.base_prefix)
        return path == stdlib or path.startswith(stdlib + os.sep)

    sys.path[:] = [entry for entry in sys.path if own(entry)]


def _check_python() -> None:
    """A python3 whose version the file carries no compiled modules for fails on the first of them:
    say so at once instead."""
    import importlib

    # ava/_build.py exists inside the one file only (ava.build writes it), so not for the checker.
    build: dict[str, str] = importlib.import_module("ava._build").BUILD
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if here not in build["pythons"].split(","):
        sys.stderr.write(
            f"ava: this file carries its dependencies for CPython {build['pythons']}, and "
            f"{sys.executable} is {here}: run it as `python3.X {_file} ...` with one of those, "
            "or install ava with pip\n"
        )
        sys.exit(2)


def _write_modules(directory: str, role: str) -> None:
    with open(os.path.join(directory, f"{role}-{os.getpid()}.txt"), "w", encoding="utf-8") as out:
        for name, module in sorted(sys.modules.items()):
            origin = getattr(getattr(module, "__spec__", None), "origin", None) or getattr(module, "__file__", None)
            out.write(f"{name}\t{origin or ''}\n")


def start() -> int:
    """The file's entry point: the CLI, or the module a parent asked for (python_module)."""
    global _file
    _file = os.path.abspath(sys.argv[0])
    _isolate()
    _check_python()
    module = os.environ.pop(MODULE_ENV, None)
    modules_out = os.environ.get(MODULES_ENV)
    if modules_out:
        import atexit

        atexit.register(_write_modules, modules_out, module or "ava")
    if module:
        import runpy

        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    from ava.cli import main

    main()
    return 0
