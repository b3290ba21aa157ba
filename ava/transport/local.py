"""The embedded `local` node: commands run on this machine through a subprocess, no SSH."""

from __future__ import annotations

import codecs
import os
import pwd
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ava.errors import CommandError
from ava.transport.base import LineCallback, LineSplitter, Result

if TYPE_CHECKING:
    from ava.config import Node


def _login_shell() -> str:
    # ssh runs a command with the user's login shell; do the same so both transports agree.
    try:
        return pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    except KeyError:
        return "/bin/sh"


def local_path(remote: str) -> Path:
    return Path(os.path.expanduser(remote))


class LocalTransport:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._shell = _login_shell()

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_line: LineCallback | None = None,
        stdin: bytes | None = None,
    ) -> Result:
        # Like sshd: the user's shell, started in the home directory, in its own session so a
        # timeout can end the whole tree it started.
        proc = subprocess.Popen(
            [self._shell, "-c", command],
            cwd=os.path.expanduser("~"),
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        out, err = LineSplitter("out", on_line), LineSplitter("err", on_line)
        readers = [
            threading.Thread(target=_pump, args=(proc.stdout, out), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, err), daemon=True),
        ]
        if stdin is not None:
            # Its own thread: a command that reads less than a pipe's worth must not block us.
            readers.append(threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True))
        for reader in readers:
            reader.start()
        try:
            exited = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise CommandError(f"{self.node.name}: command timed out after {timeout:g}s") from None
        finally:
            for reader in readers:
                reader.join(timeout=5)
        out.end()
        err.end()
        return Result(self.node.name, command, exited, out.text(), err.text())

    def put(self, local: Path | bytes, remote: str, *, mode: int | None = None) -> None:
        target = local_path(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{os.getpid()}.part")
        data = local if isinstance(local, bytes) else Path(local).read_bytes()
        # Created with its final mode, so no one can read it in between.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                if mode is not None:
                    os.fchmod(handle.fileno(), mode)  # the umask may have narrowed it
                handle.write(data)
            os.replace(temp, target)
        except OSError:
            temp.unlink(missing_ok=True)  # a partial file would keep a full disk full
            raise

    def get(self, remote: str, local: Path) -> None:
        shutil.copyfile(local_path(remote), local)

    def open(self) -> None:
        pass  # nothing to connect

    def close(self) -> None:
        pass


def _pump(stream: IO[bytes], splitter: LineSplitter) -> None:
    # Incremental, so a character split across two reads still decodes.
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
        splitter.write(decoder.decode(chunk))
    splitter.write(decoder.decode(b"", final=True))
    stream.close()


def _feed(stream: IO[bytes], data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except BrokenPipeError:
        pass  # it exited without reading all of it: its exit status says the rest
