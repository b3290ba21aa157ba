"""npm's s3rver, an S3 API server that serves a ranged GET by streaming that range of a file (as
S3 does, unlike moto, which copies the whole object per request), behind a link shaped by netem.

    with s3rver_server(netem="20ms,1gbit") as s3:   # an S3Endpoint, as moto_server() gives
        fs = s3fs.S3FileSystem(**s3.s3fs_kwargs())

The server runs in a network namespace of its own, reached over a veth pair from this one; with
`netem` ("RTT,RATE", e.g. "20ms,1gbit") both ends of that pair get `tc netem` (half the RTT each
way, the rate on each direction). A kernel without netem (CONFIG_NET_SCH_NETEM unset, as in this
project's VMs) gets the rate from `tc tbf` on both ends instead, and the delay from a delay line
in the namespace: a TCP relay in front of s3rver that forwards each chunk, either way, half the
RTT after it arrived (`s3.shaping` says which). Only that pair is shaped: the machine's own
interfaces are never touched. Everything is removed on exit, also on failure; `clean_stale()` removes what a killed
process left. Needs root (ip netns, tc) and s3rver installed once, outside the checkout:

    npm install --prefix /var/cache/ava-test-s3rver s3rver      (S3RVER_PREFIX overrides the path)

s3rver knows one access key, S3RVER (secret S3RVER): the endpoint's s3fs_kwargs() and env say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.support.s3server import S3Endpoint, _env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = os.environ.get("S3RVER_PREFIX", "/var/cache/ava-test-s3rver")
SCRIPT = f"{PREFIX}/node_modules/s3rver/bin/s3rver.js"
LINK = "avas3-"  # + this process's pid: the root-side end of the veth pair
PORT = 4568  # where clients connect (s3rver itself, or the delay line)
SERVER_PORT = 4569  # s3rver behind the delay line, on the namespace's loopback


KEY = "S3RVER"  # s3rver's one access key (and secret)


@dataclass
class Shaped(S3Endpoint):
    shaping: str = "none"  # "netem 20ms,1gbit" | "tbf 1gbit + delay line 2 x 10ms" | "none"

    def s3fs_kwargs(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return {**super().s3fs_kwargs(*args, **kw), "key": KEY, "secret": KEY}


def available() -> str | None:
    """Why s3rver cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    if not os.path.exists(SCRIPT):
        return f"s3rver is not installed: npm install --prefix {PREFIX} s3rver"
    if shutil.which("node") is None or shutil.which("tc") is None:
        return "needs node and tc"
    return None


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def _qdisc(dev: str, ns: str | None, *spec: str) -> bool:
    where = ["ip", "netns", "exec", ns] if ns else []
    return _sh(*where, "tc", "qdisc", "add", "dev", dev, "root", *spec, check=False).returncode == 0


def _shape(link: str, ns: str, rtt_ms: float, rate: str) -> str:
    """Shape both ends of the pair: netem if the kernel has it, else tbf (the delay: a relay)."""
    # limit: packets queued in netem; its default (1000) drops below one RTT of data at 1 Gbit.
    netem = ("netem", "delay", f"{rtt_ms / 2}ms", "rate", rate, "limit", "100000")
    if _qdisc(link, None, *netem):
        if not _qdisc("eth0", ns, *netem):
            raise RuntimeError(f"tc netem on eth0 in namespace {ns} failed")
        return "netem"
    tbf = ("tbf", "rate", rate, "burst", "1mb", "latency", "100ms")
    if not (_qdisc(link, None, *tbf) and _qdisc("eth0", ns, *tbf)):
        raise RuntimeError(f"tc tbf on the veth pair {link} failed")
    return "tbf"


def parse_netem(spec: str) -> tuple[float, str]:
    """("20ms,1gbit") -> (20.0, "1gbit"): the round trip in ms and the rate, as tc writes it."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)ms\s*,\s*(\d+(?:\.\d+)?[kmg]?bit)\s*", spec)
    if m is None:
        raise ValueError(f'netem: expected "RTT,RATE" like "20ms,1gbit", got {spec!r}')
    return float(m.group(1)), m.group(2)


def _free_subnet() -> str:
    used = set(re.findall(r"inet 10\.214\.(\d+)\.", _sh("ip", "-o", "-4", "addr", "show", check=False).stdout))
    third = os.getpid() % 250 + 1
    while str(third) in used:
        third = third % 250 + 1
    return f"10.214.{third}"


def clean_stale() -> None:
    """Remove the namespaces and links of s3rver helpers whose process is gone."""
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(LINK) and not os.path.exists(f"/proc/{name[len(LINK) :]}"):
            for pid in _sh("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _sh("ip", "netns", "del", name, check=False)
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith(LINK) and not os.path.exists(f"/proc/{name[len(LINK) :]}"):
            _sh("ip", "link", "del", name, check=False)


def _answers(ns: str | None, host: str, port: int) -> bool:
    """Whether host:port (in namespace `ns`, else here) accepts a TCP connection."""
    if ns is None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return True
        return False
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1)"
    return _sh("ip", "netns", "exec", ns, sys.executable, "-c", probe, check=False).returncode == 0


@contextlib.contextmanager
def s3rver_server(netem: str | None = None, buckets: tuple[str, ...] = ("ava-bench",)) -> Iterator[Shaped]:
    """s3rver in its own namespace on a veth pair, shaped by `netem` ("20ms,1gbit") if given."""
    why = available()
    if why is not None:
        raise RuntimeError(f"s3rver: {why}")
    clean_stale()
    name = f"{LINK}{os.getpid()}"  # the namespace and the root-side link (15 characters at most)
    subnet = _free_subnet()
    here, there = f"{subnet}.1", f"{subnet}.2"
    data = tempfile.mkdtemp(prefix="ava-s3rver-")
    proc: subprocess.Popen[bytes] | None = None
    relay: subprocess.Popen[bytes] | None = None
    try:
        _sh("ip", "netns", "add", name)
        _sh("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        _sh("ip", "link", "set", f"{name}p", "netns", name)
        _sh("ip", "-n", name, "link", "set", f"{name}p", "name", "eth0")
        _sh("ip", "-n", name, "addr", "add", f"{there}/30", "dev", "eth0")
        _sh("ip", "-n", name, "link", "set", "eth0", "up")
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh("ip", "addr", "add", f"{here}/30", "dev", name)
        _sh("ip", "link", "set", name, "up")
        shaping, relay = "none", None
        if netem:
            rtt, rate = parse_netem(netem)
            shaping = f"netem {rtt:g}ms,{rate}"
            if _shape(name, name, rtt, rate) == "tbf":
                shaping = f"tbf {rate} + delay line 2 x {rtt / 2:g}ms"
                relay = subprocess.Popen(
                    ["ip", "netns", "exec", name, sys.executable, "-m", "tests.support.s3rver", "delay"]
                    + [there, str(PORT), str(SERVER_PORT), str(rtt / 2)],
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
        host, port = ("127.0.0.1", SERVER_PORT) if relay else (there, PORT)
        args = ["ip", "netns", "exec", name, "node", SCRIPT, "-d", data, "-a", host, "-p", str(port), "-s"]
        for bucket in buckets:
            args += ["--configure-bucket", bucket]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not _answers(name, host, port) or (relay and not _answers(None, there, PORT)):
            if proc.poll() is not None or (relay and relay.poll() is not None) or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr and proc.poll() else ""
                raise RuntimeError(f"s3rver did not start in namespace {name}: {err}")
            time.sleep(0.1)
        url = f"http://{there}:{PORT}"
        yield Shaped(url, {**_env(url), "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": KEY}, shaping)
    finally:
        for child in (relay, proc):
            if child is not None:
                child.terminate()
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        _sh("ip", "netns", "del", name, check=False)
        _sh("ip", "link", "del", name, check=False)
        shutil.rmtree(data, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The delay line: run in the namespace as `python -m tests.support.s3rver delay HOST PORT UPSTREAM_PORT MS`.


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward what `reader` gives to `writer`, each chunk `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def take() -> None:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))

    async def give() -> None:
        while True:
            due, data = await queue.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    with contextlib.suppress(OSError):
        await asyncio.gather(take(), give())


async def _delay_line(host: str, port: int, upstream: int, delay: float) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_carry(reader, up_writer, delay), _carry(up_reader, writer, delay))
        for w in (writer, up_writer):
            w.close()

    server = await asyncio.start_server(serve, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__" and sys.argv[1:2] == ["delay"]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _host, _port, _upstream, _ms = sys.argv[2:6]
    asyncio.run(_delay_line(_host, int(_port), int(_upstream), float(_ms) / 1000))
