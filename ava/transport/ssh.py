"""SSH transport through fabric: the only module that imports fabric or paramiko.

One persistent connection per node, reused by every call in the process. Host keys are
verified against the node's known-hosts file: fabric trusts unknown keys by default, ava does
not, on the node and on every ProxyJump hop that fabric builds from ~/.ssh/config. Paramiko and
socket errors become a ConnectError with a plain reason right here.

Files move over SFTP; on a node whose sshd offers no SFTP subsystem (learnt once per connection)
they stream over the exec channel instead, as Ansible's piped transfer does: `cat` into a
temporary file beside the target, renamed over it.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import math
import os
import socket
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING

import paramiko  # type: ignore[import-untyped,unused-ignore]  # stubs: types-paramiko, not installed
from fabric import Connection  # type: ignore[import-untyped,unused-ignore]  # no stubs or py.typed
from fabric.runners import Remote  # type: ignore[import-untyped,unused-ignore]  # no stubs or py.typed

from ava.errors import CommandError, ConnectError
from ava.transport.base import LineCallback, LineSplitter, Result, shell_path

if TYPE_CHECKING:
    from ava.config import Node


# paramiko logs connect failures with tracebacks from its own threads; ava reports each failure
# once, as one line, through ConnectError.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False

# Precedes a file's bytes when it is read without SFTP (see _get_streamed).
_GET_START = "ava-file-start"


class UnknownHostKey(paramiko.SSHException):  # type: ignore[misc,unused-ignore]  # paramiko is untyped here
    pass


class _Remote(Remote):  # type: ignore[misc,unused-ignore]  # fabric is untyped here
    """fabric's runner, its command's input written whole, then its end: invoke reads a stream
    that is not a terminal one byte at a time, one SSH packet and a 10 ms sleep each."""

    def handle_stdin(self, input_: IO[bytes], output: object, echo: bool = False) -> None:
        data = input_.read()
        try:
            if data:
                self.channel.sendall(data)
            self.channel.shutdown_write()
        except OSError:
            pass  # it ended without reading it all: its exit status says why


class _StrictPolicy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc,unused-ignore]  # paramiko is untyped here
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise UnknownHostKey(hostname)


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc,unused-ignore]  # paramiko is untyped here
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


def _stalled(error: BaseException | None) -> bool:
    """A handshake that ran out of time (banner or authentication timeout), not one refused."""
    # The TCP connect's own timeout (a node that does not answer at all) is not retried.
    text = str(error).lower()
    return isinstance(error, paramiko.SSHException) and (
        "timeout" in text or "banner" in text or "no existing session" in text
    )


def plain_reason(error: BaseException) -> str:
    """Words a user can act on, for an error raised while connecting."""
    if isinstance(error, UnknownHostKey):
        return (
            'unknown host key; refusing under host_keys = "strict" '
            '(trust it with `ava nodes --accept-new` or host_keys = "accept-new")'
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
        # Learnt per connection: the node's sshd has no `Subsystem sftp` line (hardened configs),
        # so files stream over the exec channel instead.
        self._sftp_missing = False
        self._early: ConnectError | None = None  # open()'s failure, for the first command to raise

    @property
    def _address(self) -> str:
        return f"{self.node.host}:{self.node.port}"

    def open(self) -> None:
        """Connect now (from a thread of its own: see ava.transport.open_early). Its failure is
        the first command's, not tried twice: an unreachable node costs one connect timeout."""
        try:
            self._connect()
        except ConnectError as error:
            self._early = error

    def _connect(self) -> Connection:
        with self._lock:
            if self._connection is not None and self._connection.is_connected:
                return self._connection
            if self._early is not None:
                early, self._early = self._early, None
                raise early
            try:
                return self._open()
            except ConnectError as error:
                if not _stalled(error.__cause__):
                    raise
                # A handshake whose deadline passed while this process could not run (stopped,
                # or starved on a loaded machine) says nothing of the node: try once more.
                return self._open()

    def _open(self) -> Connection:
        """A new connection to the node (under _connect's lock), its host key checked."""
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
        connection.config.runners.remote = _Remote
        known_hosts = Path(os.path.expanduser(node.known_hosts))
        # Every hop of a ProxyJump chain (fabric builds one Connection per hop from
        # ~/.ssh/config, each trusting any key) is held to the same file and policy.
        for client in _clients(connection):
            try:
                if known_hosts.exists():
                    client.load_host_keys(str(known_hosts))
            except (OSError, paramiko.SSHException) as error:
                # This node's connect fails naming the file; the other nodes still report.
                why = getattr(error, "strerror", None) or str(error) or type(error).__name__
                raise ConnectError(node.name, self._address, f"cannot read known_hosts {known_hosts}: {why}") from error
            if self.host_keys == "accept-new":
                client.set_missing_host_key_policy(_AcceptNewPolicy(known_hosts))
            else:
                client.set_missing_host_key_policy(_StrictPolicy())
        for hop in _gateways(connection):
            if hop.connect_timeout is None:
                hop.connect_timeout = connection.connect_timeout
        try:
            connection.open()
            transport = connection.client.get_transport()
            if transport is not None:
                # Notice a dead peer on an idle connection within a few seconds.
                transport.set_keepalive(5)
        except Exception as error:  # every way a connect fails ends up here, once
            for hop in [connection, *_gateways(connection)]:
                hop.close()
            raise ConnectError(node.name, self._address, plain_reason(error) + _hop_note(error, node.host)) from error
        self._connection = connection
        self._sftp_missing = False
        return connection

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_line: LineCallback | None = None,
        stdin: bytes | None = None,
    ) -> Result:
        """COMMAND's result; STDIN, if given, is its standard input (then end of file): values
        that must not be on a command line, without a second channel to send them as a file."""
        connection = self._connect()
        out, err = LineSplitter("out", on_line), LineSplitter("err", on_line)
        # Our own deadline: a command on a node whose link is cut blocks until TCP gives up
        # (minutes), and invoke's timeout waits for the channel too. Closing the connection is
        # what unblocks it; the node is then reported as not answering.
        expired = threading.Event()
        timer = None
        if timeout is not None:

            def expire() -> None:
                expired.set()
                self._drop()

            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            result = connection.run(
                command,
                hide=True,
                warn=True,
                pty=False,
                in_stream=io.BytesIO(stdin) if stdin is not None else False,
                out_stream=out,
                err_stream=err,
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
        out.end()
        err.end()
        return Result(self.node.name, command, result.exited, out.text(), err.text())

    def sftp_offered(self) -> bool:
        """Whether the node's SSH server offers the SFTP subsystem (asked once per connection)."""
        return self._sftp(self._connect()) is not None

    def _sftp(self, connection: Connection) -> paramiko.SFTPClient | None:
        """The connection's SFTP session, or None where the server offers no SFTP subsystem."""
        if self._sftp_missing:
            return None
        try:
            sftp: paramiko.SFTPClient = connection.sftp()  # fabric is untyped
            return sftp
        except (paramiko.SSHException, EOFError) as error:
            transport = connection.client.get_transport()
            if transport is None or not transport.is_active():
                self._drop()
                raise ConnectError(self.node.name, self._address, "connection lost: " + plain_reason(error)) from error
            # The server refused the subsystem request on a live connection: it has no SFTP.
            self._sftp_missing = True
            return None

    def put(self, local: Path | bytes, remote: str, *, mode: int | None = None) -> None:
        connection = self._connect()
        data = local if isinstance(local, bytes) else Path(local).read_bytes()
        sftp = self._sftp(connection)
        if sftp is None:
            self._put_streamed(connection, data, remote, mode)
            return
        target = _sftp_path(remote)
        temp = f"{target}.{os.getpid()}.part"
        try:
            _makedirs(sftp, os.path.dirname(target))
            with sftp.open(temp, "wb") as handle:
                # Restrict the file before any byte lands in it: specs carry the recipe's env.
                if mode is not None:
                    handle.chmod(mode)
                handle.set_pipelined(True)
                handle.write(data)
            # A pipelined write that failed (full disk, quota) can go unreported: the size tells.
            written = sftp.stat(temp).st_size
            if written != len(data):
                raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written (disk full?)")
            # posix_rename replaces atomically, so a reader never sees half a file.
            sftp.posix_rename(temp, target)
        except (paramiko.SSHException, EOFError) as error:
            self._drop()
            raise ConnectError(self.node.name, self._address, "connection lost: " + plain_reason(error)) from error
        except OSError as error:
            # SFTP reports a refused write (permissions, full disk) as an OSError with an errno.
            # A partial .part file would keep a full disk full: remove it.
            try:
                sftp.remove(temp)
            except (OSError, paramiko.SSHException, EOFError):
                pass
            raise CommandError(f"{self.node.name}: cannot write {remote}: {error.strerror or error}") from error

    def get(self, remote: str, local: Path) -> None:
        connection = self._connect()
        sftp = self._sftp(connection)
        if sftp is None:
            self._get_streamed(connection, remote, local)
            return
        try:
            sftp.get(_sftp_path(remote), str(local))
        except FileNotFoundError as error:
            raise CommandError(f"{self.node.name}: no such file {remote}") from error
        except (paramiko.SSHException, EOFError, OSError) as error:
            self._drop()
            raise ConnectError(self.node.name, self._address, "connection lost: " + plain_reason(error)) from error

    def _put_streamed(self, connection: Connection, data: bytes, remote: str, mode: int | None) -> None:
        """Ansible's piped transfer: the bytes on stdin of `cat`, into a temporary file renamed over
        the target; with a mode, the file is created under umask 077 so no one reads it meanwhile."""
        target = remote.rstrip("/")
        folder = os.path.dirname(target) or "."
        temp = shell_path(f"{target}.{os.getpid()}.part")
        write = f"(umask 077 && cat > {temp}) && chmod {mode:o} {temp}" if mode is not None else f"cat > {temp}"
        command = f"mkdir -p {shell_path(folder)} && {write} && mv -f {temp} {shell_path(target)}"
        exited, _out, err = self._exec_bytes(connection, command, data)
        if exited != 0:
            self._exec_bytes(connection, f"rm -f {temp}", None)
            why = err.decode(errors="replace").strip().splitlines()
            raise CommandError(f"{self.node.name}: cannot write {remote}: {why[-1] if why else f'exit {exited}'}")

    def _get_streamed(self, connection: Connection, remote: str, local: Path) -> None:
        # The node's shell start-up files may print first (conda's init does): the file's bytes
        # are what follows the marker.
        exited, out, err = self._exec_bytes(connection, f"echo {_GET_START}; cat {shell_path(remote)}", None)
        if exited != 0:
            why = err.decode(errors="replace").strip().splitlines()
            if why and "No such file" in why[-1]:
                raise CommandError(f"{self.node.name}: no such file {remote}")
            raise CommandError(f"{self.node.name}: cannot read {remote}: {why[-1] if why else f'exit {exited}'}")
        Path(local).write_bytes(out.partition(f"{_GET_START}\n".encode())[2])

    def _exec_bytes(self, connection: Connection, command: str, data: bytes | None) -> tuple[int, bytes, bytes]:
        """Run `command` with `data` on its stdin; its exit status and exact output bytes."""
        try:
            transport = connection.client.get_transport()
            if transport is None:
                raise paramiko.SSHException("no transport")
            channel = transport.open_session()
            try:
                channel.exec_command(command)
                if data:
                    channel.sendall(data)
                channel.shutdown_write()  # EOF: `cat` finishes the file
                out = bytearray()
                err = bytearray()
                while True:
                    chunk = channel.recv(1 << 16)
                    if not chunk:
                        break
                    out += chunk
                    while channel.recv_stderr_ready():
                        err += channel.recv_stderr(1 << 16)
                exited = channel.recv_exit_status()
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 16)
            finally:
                channel.close()
        except (paramiko.SSHException, EOFError, OSError) as error:
            self._drop()
            raise ConnectError(self.node.name, self._address, "connection lost: " + plain_reason(error)) from error
        if exited == -1:
            self._drop()
            raise ConnectError(self.node.name, self._address, "connection lost")
        return exited, bytes(out), bytes(err)

    def _drop(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def close(self) -> None:
        self._drop()


def _gateways(connection: Connection) -> list[Connection]:
    """The ProxyJump hops fabric built for this connection, nearest first."""
    hops = []
    gateway = connection.gateway
    while isinstance(gateway, Connection):
        hops.append(gateway)
        gateway = gateway.gateway
    return hops


def _clients(connection: Connection) -> list[paramiko.SSHClient]:
    return [connection.client] + [hop.client for hop in _gateways(connection)]


def _hop_note(error: BaseException, host: str | None) -> str:
    """Name the ProxyJump hop when the refused key was the hop's, not the node's."""
    hostname = getattr(error, "hostname", None) or (
        error.args[0] if isinstance(error, UnknownHostKey) and error.args else None
    )
    if isinstance(error, (UnknownHostKey, paramiko.BadHostKeyException)) and hostname:
        bare = hostname[1:].split("]")[0] if hostname.startswith("[") else hostname
        if bare != host:
            return f" (ProxyJump hop {hostname})"
    return ""


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
