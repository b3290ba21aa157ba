"""The agent's commands that serve ava's core outside any attempt. Standard library only.

  tree VERB ARGS...        the code store: treesync.py's verbs (missing, build, locked)
  bench-allreduce ARGS     the all-reduce benchmark (`ava doctor --bandwidth`); ARGS is JSON
  free-port                {"port": N}: a port free on this node now, for a rendezvous
  node-site VENV           let the new venv VENV see the node venv's packages

The zipapp carries these modules, so ava runs them as `python3 agent.pyz COMMAND ...` rather than
pasting their source into `python3 -c`. Each imports its module only when it runs, and runs with
the login's umask, as it did under `python3 -c`: trees and venvs keep the modes they always had.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import sys

from . import layout


def _login_umask() -> None:
    # The agent narrows its umask to 0o077 for its own records (main.main) and keeps the one it
    # was started with in layout.JOB_UMASK.
    os.umask(layout.JOB_UMASK)


def cmd_tree(args: argparse.Namespace) -> int:
    from . import treesync

    _login_umask()
    treesync.main(args.args)  # `locked` ends by SystemExit with its command's status
    return 0


def cmd_bench_allreduce(args: argparse.Namespace) -> int:
    from . import bench_allreduce

    _login_umask()
    print(json.dumps(bench_allreduce.main(json.loads(args.args))), flush=True)
    return 0


def cmd_free_port(args: argparse.Namespace) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    return 0


def cmd_node_site(args: argparse.Namespace) -> int:
    """A venv made by a venv's python is a venv over the base interpreter: its system
    site-packages are the base's, not those of the node's venv, which has torch. A .pth file in
    the new venv adds the node venv's. Run by the node's python, which made VENV."""
    _login_umask()
    pth = None
    if sys.prefix != sys.base_prefix:
        version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        lib = os.path.join(args.venv, "lib", version, "site-packages")
        pth = os.path.join(lib, "ava-node-site.pth")
        with open(pth, "w") as handle:  # the locale's encoding, as site.py reads it
            handle.write("\n".join(site.getsitepackages()) + "\n")
    print(json.dumps({"pth": pth}), flush=True)
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the commands above on the agent's parser."""
    s = sub.add_parser("tree", help="the code store: missing | build | locked (see treesync.py)")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_tree)
    s = sub.add_parser("bench-allreduce", help="one rank of the all-reduce benchmark (ARGS: JSON)")
    s.add_argument("args")
    s.set_defaults(func=cmd_bench_allreduce)
    s = sub.add_parser("free-port", help="a port free on this node now")
    s.set_defaults(func=cmd_free_port)
    s = sub.add_parser("node-site", help="let a new venv see the node venv's site-packages")
    s.add_argument("venv")
    s.set_defaults(func=cmd_node_site)
