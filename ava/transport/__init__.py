"""How ava reaches nodes: `connect(node)` gives the node's Transport, reused process-wide."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ava.transport.base import LineCallback, Result, Transport, run_all, shell_path

if TYPE_CHECKING:
    from ava.config import Node

__all__ = ["LineCallback", "Result", "Transport", "close_all", "connect", "open_early", "run_all", "shell_path"]

_pool: dict[tuple[str, str], Transport] = {}
_pool_lock = threading.Lock()


def connect(node: Node, *, host_keys: str | None = None) -> Transport:
    """The one transport for this node in this process (SSH connections are kept open)."""
    key = (node.name, host_keys or "")
    with _pool_lock:
        transport = _pool.get(key)
        if transport is None:
            if node.transport == "local":
                from ava.transport.local import LocalTransport

                transport = LocalTransport(node)
            else:
                # Imported here so that commands which never touch SSH stay fast to start.
                from ava.transport.ssh import SSHTransport

                transport = SSHTransport(node, host_keys=host_keys)
            _pool[key] = transport
        return transport


def open_early(nodes: list[Node]) -> None:
    """Start connecting to NODES in the background and return: the handshakes (sshd's fork, key
    exchange and authentication run on the nodes) go on while this process prepares the launch,
    and its first command to each node finds the connection open (or its failure)."""
    transports = [connect(node) for node in nodes]  # here: fabric's import is CPU, not waiting
    for transport in transports:
        threading.Thread(target=transport.open, name=f"ava-open-{transport.node.name}", daemon=True).start()


def close_all() -> None:
    with _pool_lock:
        for transport in _pool.values():
            transport.close()
        _pool.clear()
