"""A real S3 API on loopback for tests and benchmarks: moto's server, plus a counting and
fault-injecting HTTP proxy in front of it.

    with moto_server() as s3:                      # ThreadedMotoServer on a free 127.0.0.1 port
        fs = s3fs.S3FileSystem(**s3.s3fs_kwargs())
        with s3_proxy(s3.url) as proxy:            # a separate process, so it costs us no GIL
            rfs = s3fs.S3FileSystem(**s3.s3fs_kwargs(endpoint=proxy.url))
            ...; proxy.stats()["get_bytes"]; proxy.set_faults([{"kind": "error", "count": 2}])

`moto_server(process=True)` runs moto in its own process instead (benchmarks, many readers).
Everything binds 127.0.0.1 only and is stopped on exit, also on failure. Uploads should go to
moto directly: the proxy forwards bodies by Content-Length only.

Run as a script: `python tests/support/s3server.py moto` or `... proxy UPSTREAM_URL` prints `PORT n`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

KEY_ID = "testing"
SECRET = "testing"
REGION = "us-east-1"


@dataclass
class S3Endpoint:
    """Where the test S3 API listens and how to reach it (credentials are moto's dummies)."""

    url: str
    env: dict[str, str] = field(default_factory=dict)

    def s3fs_kwargs(
        self, endpoint: str | None = None, retries: int | None = None, timeout: float | None = None, **extra: Any
    ) -> dict[str, Any]:
        """Keyword arguments for s3fs.S3FileSystem. `retries`/`timeout` shrink botocore's retry
        loop and socket timeouts so fault tests fail fast (s3fs's own loop is the instance
        attribute `retries`, not an argument: set it on the instance)."""
        kw: dict[str, Any] = {"key": KEY_ID, "secret": SECRET, "endpoint_url": endpoint or self.url}
        config: dict[str, Any] = {}
        if retries is not None:
            config["retries"] = {"max_attempts": retries, "mode": "standard"}
        if timeout is not None:
            config["read_timeout"] = timeout
            config["connect_timeout"] = timeout
        if config:
            kw["config_kwargs"] = config
        kw.update(extra)
        return kw

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).read()


def _env(url: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "FSSPEC_S3_ENDPOINT_URL": url,
    }


def _spawn(args: list[str]) -> tuple[subprocess.Popen, int]:
    """Start this script in a child process and read the port it prints."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"test S3 helper failed to start: {args[0]}")
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def moto_server(process: bool = False) -> Iterator[S3Endpoint]:
    """moto's S3 server on a free loopback port, in a thread (default) or its own process."""
    if process:
        proc, port = _spawn(["moto"])
        try:
            yield S3Endpoint(f"http://127.0.0.1:{port}", _env(f"http://127.0.0.1:{port}"))
        finally:
            _stop(proc)
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        yield S3Endpoint(url, _env(url))
    finally:
        server.stop()


@dataclass
class Proxy:
    """Handle on a running proxy process: counters and the fault plan, over its control path."""

    url: str

    def _call(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + "/_proxy/" + path, data=data, method="POST" if data is not None else "GET"
        )
        return json.loads(urllib.request.urlopen(req, timeout=10).read() or b"null")

    def stats(self) -> dict[str, int]:
        """{"get_bytes": object bytes sent for GETs, "gets": GET count, "requests": every request
        to the S3 API (HEADs and listings too), "faults": injected}."""
        return self._call("stats")

    def reset(self) -> None:
        self._call("reset", {})

    def set_faults(self, plan: list[dict[str, Any]]) -> None:
        """Each rule hits the next `count` ranged GETs (-1: all until cleared), in order.
        kind: "error" (HTTP 503), "timeout" (hold `delay` s, then drop the connection),
        "short" (send the full Content-Length but only half the body, then drop),
        "slow" (send the body at `rate` bytes/s)."""
        self._call("faults", plan)


@contextlib.contextmanager
def s3_proxy(upstream: str) -> Iterator[Proxy]:
    """The counting, fault-injecting proxy on a free loopback port, in its own process."""
    proc, port = _spawn(["proxy", upstream])
    try:
        yield Proxy(f"http://127.0.0.1:{port}")
    finally:
        _stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the proxy process --------------------------------------------------------------------------
class _ProxyState:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.lock = threading.Lock()
        self.get_bytes = self.gets = self.requests = self.faults_done = 0
        self.epoch = 0  # bumped by reset: responses to requests made before it are not counted
        self.plan: list[dict[str, Any]] = []
        self.local = threading.local()

    def take_fault(self) -> dict[str, Any] | None:
        with self.lock:
            while self.plan:
                rule = self.plan[0]
                if rule.get("count", 1) == 0:
                    self.plan.pop(0)
                    continue
                if rule.get("count", 1) > 0:
                    rule["count"] = rule.get("count", 1) - 1
                self.faults_done += 1
                return rule
            return None

    def upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        return conn


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _ProxyState

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _control(self, body: bytes) -> None:
        st = self.state
        what = self.path[len("/_proxy/") :]
        with st.lock:
            if what == "reset":
                st.get_bytes = st.gets = st.requests = st.faults_done = 0
                st.epoch += 1
                st.plan = []
            elif what == "faults":
                st.plan = [dict(r) for r in json.loads(body or b"[]")]
            out = json.dumps(
                {"get_bytes": st.get_bytes, "gets": st.gets, "requests": st.requests, "faults": st.faults_done}
            ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/_proxy/"):
            self._control(body)
            return
        st = self.state
        epoch = st.epoch
        with st.lock:
            st.requests += 1
        fault = st.take_fault() if self.command == "GET" and "Range" in self.headers else None
        if fault and fault["kind"] == "error":
            out = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        if fault and fault["kind"] == "timeout":
            time.sleep(float(fault.get("delay", 3.0)))
            self._drop()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        for attempt in range(2):  # a kept-alive upstream connection may have gone stale
            conn = st.upstream()
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                st.local.conn = None
                if attempt:
                    raise
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        # a HEAD's Content-Length is the object's size, not the (empty) body's
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault and fault["kind"] == "short":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop()
            return
        if fault and fault["kind"] == "slow":  # throttle the body to `rate` bytes/s
            step = 16384
            for i in range(0, len(data), step):
                self.wfile.write(data[i : i + step])
                time.sleep(step / float(fault.get("rate", 1 << 20)))
        else:
            self.wfile.write(data)
        if self.command == "GET":
            with st.lock:
                if st.epoch == epoch:
                    st.get_bytes += len(data)
                    st.gets += 1


def _serve_proxy(upstream: str) -> None:
    handler = type("Handler", (_ProxyHandler,), {"state": _ProxyState(upstream)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


def _serve_moto() -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    threading.Event().wait()


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the test process dies, so a killed test leaves no server."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    _die_with_parent()
    if sys.argv[1:2] == ["proxy"]:
        _serve_proxy(sys.argv[2])
    elif sys.argv[1:2] == ["moto"]:
        _serve_moto()
    else:
        sys.exit("usage: s3server.py moto | proxy UPSTREAM_URL")
