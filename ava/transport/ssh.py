"""SSH transport through fabric: the only module that imports fabric or paramiko.

One persistent connection per node, reused by every call in the process. Host keys are
verified against the node's known-hosts file: fabric trusts unknown keys by default, ava does
not. Paramiko and socket errors become a ConnectError with a plain reason right here.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
from fabric import Connection

from ava.errors import CommandError, ConnectError
from ava.transport.base import LineCallback, LineSplitter, Result

if TYPE_CHECKING:
    from ava.config import Node


# paramiko logs connect failures with tracebacks from its own threads; ava reports each failure
# once, as one line, through ConnectError.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


class UnknownHostKey(paramiko.SSHException):
    pass


class _StrictPolicy(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise UnknownHostKey(hostname)


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Record a key never seen before (OpenSSH's StrictHostKeyChecking=accept-new).

    A key that changed never reaches a policy: paramiko raises BadHostKeyException for it.
    """

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        # Append rather than let paramiko rewrite the user's whole file.
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.known_hosts, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def plain_reason(error: BaseException) -> str:
    """Words a user can act on, for an error raised while connecting."""
    if isinstance(error, UnknownHostKey):
        return (
            "unknown host key; refusing under host_keys = \"strict\" "
            "(trust it with `ava nodes --accept-new` or host_keys = \"accept-new\")"
        )
    if isinstance(error, paramiko.BadHostKeyException):
        return "host key changed since last connection; refusing (see `ava doctor`)"
    if isinstance(error, paramiko.AuthenticationException):
        return "authentication failed (check user and identity, or your ssh-agent)"
    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
        codes = {getattr(e, "errno", None) for e in error.errors.values()}
        if codes <= {errno.ECONNREFUSED}:
            return "connection refused"
        return "could not connect: " + "; ".join(sorted({str(e) for e in error.errors.values()}))
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return "could not resolve hostname"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to node"
    if isinstance(error, (EOFError, paramiko.SSHException)):
        text = str(error) or type(error).__name__
        if "banner" in text.lower() or isinstance(error, EOFError):
            return f"ssh handshake failed ({text})"
        return text
    return str(error) or type(error).__name__


class SSHTransport:
    def __init__(self, node: Node, *, host_keys: str | None = None) -> None:
        self.node = node
        self.host_keys = host_keys or node.host_keys
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    @property
    def _address(self) -> str:
        return f"{self.node.host}:{self.node.port}"

    def _connect(self) -> Connection:
        with self._lock:
            if self._connection is not None and self._connection.is_connected:
                return self._connection
            node = self.node
            connect_kwargs: dict[str, object] = {
                "banner_timeout": node.connect_timeout,
                "auth_timeout": node.connect_timeout,
            }
            if node.identity:
                connect_kwargs["key_filename"] = [os.path.expanduser(node.identity)]
            connection = Connection(
                node.host,
                user=node.user,
                port=node.port,
                # fabric takes whole seconds; never round a short timeout down to "none".
                connect_timeout=max(1, math.ceil(node.connect_timeout)),
                connect_kwargs=connect_kwargs,
            )
            known_hosts = Path(os.path.expanduser(node.known_hosts))
            client = connection.client
            if known_hosts.exists():
                client.load_host_keys(str(known_hosts))
            if self.host_keys == "accept-new":
                client.set_missing_host_key_policy(_AcceptNewPolicy(known_hosts))
            else:
                client.set_missing_host_key_policy(_StrictPolicy())
            try:
                connection.open()
                transport = connection.client.get_transport()
                if transport is not None:
                    # Notice a dead peer on an idle connection within a few seconds.
                    transport.set_keepalive(5)
            except Exception as error:  # every way a connect fails ends up here, once
                connection.close()
                raise ConnectError(node.name, self._address, plain_reason(error)) from error
            self._connection = connection
            return connection

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_line: LineCallback | None = None,
    ) -> Result:
        connection = self._connect()
        out, err = LineSplitter("out", on_line), LineSplitter("err", on_line)
        # Our own deadline: a command on a node whose link is cut blocks until TCP gives up
        # (minutes), and invoke's timeout waits for the channel too. Closing the connection is
        # what unblocks it; the node is then reported as not answering.
        expired = threading.Event()
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, lambda: (expired.set(), self._drop()))
            timer.daemon = True
            timer.start()
        try:
            result = connection.run(
                command, hide=True, warn=True, pty=False, in_stream=False, out_stream=out, err_stream=err,
            )
        except (paramiko.SSHException, EOFError, OSError) as error:
            self._drop()
            if expired.is_set():
                raise ConnectError(self.node.name, self._address, f"no answer within {timeout:g}s") from error
            raise ConnectError(self.node.name, self._address, "connection lost: " + plain_reason(error)) from error
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():
            raise ConnectError(self.node.name, self._address, f"no answer within {timeout:g}s")
        transport = connection.client.get_transport()
        if result.exited == -1 and (transport is None or not transport.is_active()):
            # The channel closed without an exit status: the connection itself went away.
            self._drop()
            raise ConnectError(self.node.name, self._address, "connection lost")
        out.flush()
        err.flush()
        return Result(self.node.name, command, result.exited, out.text(), err.text())

    def put(self, local: Path | bytes, remote: str, *, mode: int | None = None) -> None:
        connection = self._connect()
        target = _sftp_path(remote)
        temp = f"{target}.{os.getpid()}.part"
        try:
            sftp = connection.sftp()
            _makedirs(sftp, os.path.dirname(target))
            data = local if isinstance(local, bytes) else Path(local).read_bytes()
            with sftp.open(temp, "wb") as handle:
                # Restrict the file before any byte lands in it: specs carry the recipe's env.
                if mode is not None:
                    handle.chmod(mode)
                handle.set_pipelined(True)
                handle.write(data)
            # posix_rename replaces atomically, so a reader never sees half a file.
            sftp.posix_rename(temp, target)
        except (paramiko.SSHException, EOFError) as error:
            self._drop()
            raise ConnectError(self.node.name, self._address, "connection lost: " + plain_reason(error)) from error
        except OSError as error:
            # SFTP reports a refused write (permissions, full disk) as an OSError with an errno.
            raise CommandError(f"{self.node.name}: cannot write {remote}: {error.strerror or error}") from error

    def get(self, remote: str, local: Path) -> None:
        connection = self._connect()
        try:
            connection.sftp().get(_sftp_path(remote), str(local))
        except FileNotFoundError as error:
            raise CommandError(f"{self.node.name}: no such file {remote}") from error
        except (paramiko.SSHException, EOFError, OSError) as error:
            self._drop()
            raise ConnectError(self.node.name, self._address, "connection lost: " + plain_reason(error)) from error

    def _drop(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def close(self) -> None:
        self._drop()


def _sftp_path(remote: str) -> str:
    # SFTP starts in the user's home directory, so "~/x" is simply "x".
    if remote == "~":
        return "."
    if remote.startswith("~/"):
        return remote[2:]
    return remote


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    if path in ("", ".", "/"):
        return
    try:
        sftp.stat(path)
        return
    except FileNotFoundError:
        pass
    _makedirs(sftp, os.path.dirname(path))
    try:
        sftp.mkdir(path)
    except OSError:
        sftp.stat(path)  # made meanwhile by another thread: fine; otherwise this raises
