"""Run `bridgeway serve` as a real process on loopback for integration tests.

    gw = start_gateway({"services": {"echo": {"instances": [echo.url]}}})
    status, headers, body = gw.request("GET", "/bridge/echo/hi")
    gw.rewrite(new_config); gw.sighup()
    gw.stop()

The config (a dict, dumped with ``yaml.safe_dump``, or YAML text) is written to a temporary
file. A free port is picked for ``listen`` and an admin token is generated unless the config
sets them, so the management API is usable through ``admin_headers``. ``start_gateway`` returns
once ``/health/ready`` answers 200.

Pytest fixture (registered through ``pytest_plugins`` in tests/conftest.py)
    gateway_factory   function scope: ``gateway_factory(config, workers=1, env=None)`` ->
                      ``GatewayProc``, every gateway stopped at teardown.
For module-scoped gateways call ``start_gateway`` from a module fixture and ``stop()`` it.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.procs import HOST, ROOT, Proc, _log_dir, free_port

__all__ = ["GatewayProc", "RawServer", "gateway_factory", "start_gateway", "wait_until"]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate!r} (last: {last!r})"
            )
        time.sleep(interval)


class Response:
    """A small synchronous response: status, headers (lower-cased names, last wins; ``all`` keeps
    every pair) and the body."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.all = [(k.lower(), v) for k, v in headers]
        self.headers = dict(self.all)
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


class GatewayProc(Proc):
    """A running ``bridgeway serve`` (the supervisor; workers are its child processes)."""

    def __init__(self, config_path: Path, port: int, token: str | None, workers: int, env: Mapping[str, str]):
        self.config_path = config_path
        self.token = token
        self.secrets: list[str] = []  # what must never appear in its logs
        self.workers = workers
        args = [
            sys.executable,
            "-m",
            "bridgeway",
            "serve",
            "--config",
            str(config_path),
            "--workers",
            str(workers),
        ]
        super().__init__(args, port=port, env=env, cwd=ROOT, name="bridgeway")

    # -- config ----------------------------------------------------------------------------

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def rewrite(self, config: dict | str) -> None:
        """Replace the config file. A dict keeps this gateway's ``listen`` and admin token unless
        it sets them; text is written as it is (to test invalid files)."""
        if isinstance(config, dict):
            config = copy.deepcopy(config)
            config.setdefault("listen", f"{HOST}:{self.port}")
            if self.token is not None:
                config.setdefault("admin", {"token": self.token})
            text = yaml.safe_dump(config, sort_keys=False)
        else:
            text = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)  # atomic: a reload never reads half a file

    def sighup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    # -- processes -------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Child processes of the supervisor running the gateway (bridgeway.serving workers)."""
        pids = []
        for pid in _children(self.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmdline:
                pids.append(pid)
        return pids

    def rss_bytes(self) -> int:
        """Resident memory of the supervisor and its workers, summed."""
        return sum(rss_bytes(pid) for pid in [self.pid, *self.worker_pids()])

    # -- HTTP --------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            r = conn.getresponse()
            return Response(r.status, r.getheaders(), r.read())
        finally:
            conn.close()

    def api(self, method: str, path: str, payload: Any = None, *, auth: bool = True) -> Response:
        """Management API call (``path`` under /api/v1) with the admin token."""
        headers = dict(self.admin_headers) if auth else {}
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        return self.request(method, "/api/v1" + path, body, headers)

    def service(self, name: str) -> dict:
        r = self.api("GET", f"/services/{name}")
        assert r.status == 200, r
        return r.json()

    def log_lines(self) -> list[dict]:
        """The JSON lines the gateway logged so far (other lines skipped)."""
        out = []
        for line in self.logs().splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def wait_ready(self, path: str = "/health/ready", timeout: float = 20.0) -> GatewayProc:
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            if not self.alive:
                raise RuntimeError(
                    f"bridgeway exited with {self.returncode} before ready\n{self.logs_tail()}"
                )
            try:
                r = self.request("GET", path, timeout=2.0)
                # /health/ready is answered by whichever worker is up first: with several, wait
                # until every one has logged its start (a SIGHUP sent before would be lost).
                if r.status == 200 and self.logs().count('"event":"gateway_started"') >= self.workers:
                    return self
                last = r
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"bridgeway not ready within {timeout}s (last: {last!r})\n{self.logs_tail()}"
                )
            time.sleep(0.05)


class RawServer:
    """A misbehaving upstream on loopback: for each connection it reads the request head, then
    sends ``reply`` and closes; closes without a word when ``reply`` is None; or, with
    ``hang=True``, never answers (until ``close()``, or 30 s). With ``answers=N`` it keeps each
    connection open for N answers, and closes it unanswered when the next request comes (a
    keep-alive connection that went stale as it was reused)."""

    def __init__(self, reply: bytes | None = None, *, hang: bool = False, answers: int | None = None) -> None:
        self.reply = reply
        self.hang = hang
        self.answers = answers
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(2.0 if self.answers is None else 30.0)
            data = b""
            answered = 0
            while True:
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data.partition(b"\r\n\r\n")[2]
                if self.hang:
                    self._stop.wait(30)
                if self.hang or self.reply is None or answered == self.answers:
                    return
                conn.sendall(self.reply)
                answered += 1
                if self.answers is None:
                    return  # one answer, then the close

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def start_gateway(
    config: dict | str,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 20.0,
) -> GatewayProc:
    """Write the config, run ``python -m bridgeway serve`` and wait for ``/health/ready``."""
    data = yaml.safe_load(config) if isinstance(config, str) else copy.deepcopy(config)
    if not isinstance(data, dict):
        raise TypeError("the config must be a mapping")
    if "listen" not in data:
        data["listen"] = f"{HOST}:{free_port()}"
    port = int(str(data["listen"]).rpartition(":")[2])
    admin = data.setdefault("admin", {})
    if "token" not in admin:
        admin["token"] = secrets.token_urlsafe(16)
    token = admin["token"]
    fd, path = tempfile.mkstemp(prefix="bridgeway-", suffix=".yaml", dir=_log_dir())
    os.close(fd)
    config_path = Path(path)
    # Each gateway gets its own embedded state file next to its config, unless the test chose one.
    data.setdefault("state", f"sqlite:///{config_path.with_suffix('.db')}")
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    gw = GatewayProc(config_path, port, token, workers, env or {})
    gw.secrets = [token, *_config_secrets(data)]
    STARTED.append(gw)
    try:
        gw.wait_ready(timeout=ready_timeout)
    except BaseException:
        gw.stop()
        raise
    return gw


def _config_secrets(data: dict) -> list[str]:
    auth = data.get("auth") or {}
    issuers = (auth.get("jwt") or {}).get("issuers") or []
    found = [c.get("secret") for c in (data.get("clients") or {}).values()] + [
        i.get("secret") for i in issuers
    ]
    return [str(s) for s in found if s]


# Every gateway the suite started, for the closing scan of everything they logged.
STARTED: list[GatewayProc] = []
# A full API key (bw_<id>_<43-character secret>) or a signed JWT, wherever it appears.
_SECRET_SHAPES = re.compile(r"bw_[0-9a-f]{10}_[A-Za-z0-9_-]{20,}|eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{16,}")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_gateway_log() -> Iterator[None]:
    """After the suite: no gateway logged a key, a token, the admin token or a configured secret."""
    yield
    leaks = []
    for gw in STARTED:
        text = gw.logs()
        leaks += [f"{gw.log_path}: {m[:12]}..." for m in _SECRET_SHAPES.findall(text)]
        leaks += [f"{gw.log_path}: a configured secret" for secret in gw.secrets if secret in text]
    if leaks:
        pytest.fail(f"secrets in gateway logs ({len(leaks)}):\n" + "\n".join(leaks[:20]))


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayProc]]:
    started: list[GatewayProc] = []

    def factory(config: dict | str, *, workers: int = 1, env: Mapping[str, str] | None = None) -> GatewayProc:
        gw = start_gateway(config, workers=workers, env=env)
        started.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in started:
            gw.stop()


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out
