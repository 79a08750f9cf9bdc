"""Run real processes on loopback for integration tests.

    with start_service("echo") as echo:
        urllib.request.urlopen(echo.url + "/anything")

Processes get their own process group (so a server's workers die with them), write stdout and
stderr to files (so a chatty process never blocks on a full pipe), and are stopped with SIGTERM,
then SIGKILL after a grace period. Log files live in one temporary directory per test session,
removed at interpreter exit; ``Proc.logs()`` works after the process has stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SERVICES = EXAMPLES / "services"
HOST = "127.0.0.1"

_LOG_DIR: Path | None = None


def _log_dir() -> Path:
    global _LOG_DIR
    if _LOG_DIR is None:
        _LOG_DIR = Path(tempfile.mkdtemp(prefix="bridgeway-procs-"))
        atexit.register(shutil.rmtree, _LOG_DIR, True)
    return _LOG_DIR


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it; tiny race with other binders)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Proc:
    """A subprocess in its own process group, with its output captured to files.

    ``args`` is the full command line. ``port`` is where it will listen (used for ``url``);
    ``env`` entries are added to (not replacing) the current environment.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
        host: str = HOST,
    ) -> None:
        self.args = [str(a) for a in args]
        self.port = port
        self.host = host
        self.name = name or Path(self.args[0]).name
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        fd, path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log", dir=_log_dir())
        os.close(fd)
        self.log_path = Path(path)
        # O_APPEND: stdout and stderr of every process in the group interleave safely.
        with open(self.log_path, "ab", buffering=0) as out:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )

    # -- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise AttributeError(f"{self.name}: no port known")
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:]

    @property
    def pid(self) -> int:
        return self.popen.pid

    # -- state -----------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def logs(self) -> str:
        """Everything the process (and its children) wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs_tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def wait_ready(self, path: str = "/health", timeout: float = 15.0) -> Proc:
        wait_http(self.url + path, timeout=timeout, proc=self)
        return self

    # -- stopping --------------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)  # start_new_session: the group id is our pid

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group; SIGKILL it if the leader is not gone after ``timeout``."""
        if self.alive:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait()
        self._signal_group(signal.SIGKILL)  # stragglers left in the group after the leader exited
        return self.popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (a crash, as far as clients can tell)."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait()
        return self.popen.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if exc_type is not None:  # shown by pytest with the failure
            sys.stderr.write(f"--- {self.name} log tail ---\n{self.logs_tail()}\n")

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.returncode}"
        return f"<Proc {self.name} pid={self.pid} port={self.port} {state}>"


def wait_http(url: str, timeout: float = 15.0, proc: Proc | None = None) -> int:
    """Poll ``url`` until it answers with any HTTP status; return that status.

    Raises ``RuntimeError`` (with the tail of ``proc``'s output when given) on timeout or when
    ``proc`` exits first.
    """
    parts = urllib.parse.urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if proc is not None and not proc.alive:
            raise RuntimeError(
                f"{proc.name} exited with {proc.returncode} before {url} answered\n{proc.logs_tail()}"
            )
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname or HOST, parts.port, timeout=2.0)
        try:
            conn.request("GET", target)
            return conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
        finally:
            conn.close()
        if time.monotonic() >= deadline:
            tail = f"\n{proc.logs_tail()}" if proc is not None else ""
            raise RuntimeError(f"{url} did not answer within {timeout}s (last error: {last_error!r}){tail}")
        time.sleep(0.05)


SERVICE_NAMES = ("echo", "sim")
_NAME_ENV = {"echo": "ECHO_NAME", "sim": "SIM_NAME"}


def service_command(name: str, port: int, *, workers: int = 1) -> list[str]:
    """The command line that serves ``examples/services/{name}.py`` on loopback (bridgeway.serving)."""
    return [
        sys.executable,
        "-m",
        "bridgeway.serving",
        "--host",
        HOST,
        "--port",
        str(port),
        "--app-dir",
        str(SERVICES),
        "--workers",
        str(workers),
        f"{name}:app",
    ]


def spawn_service(
    name: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    *,
    instance: str | None = None,
    workers: int = 1,
) -> Proc:
    """Start a sample service without waiting for it (see ``start_service``)."""
    if name not in SERVICE_NAMES:
        raise ValueError(f"unknown service {name!r}; expected one of {SERVICE_NAMES}")
    port = port or free_port()
    env = dict(env or {})
    if instance is not None:
        env[_NAME_ENV[name]] = instance
    label = env.get(_NAME_ENV[name], name)
    return Proc(
        service_command(name, port, workers=workers),
        port=port,
        env=env,
        cwd=SERVICES,
        name=label,
    )


def start_service(
    name: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    *,
    instance: str | None = None,
    workers: int = 1,
    timeout: float = 20.0,
) -> Proc:
    """Start ``echo`` or ``sim`` under bridgeway.serving on 127.0.0.1 and wait until ``/health`` answers.

    ``instance`` sets ``ECHO_NAME`` / ``SIM_NAME`` (the ``X-Instance`` header and ``instance``
    field). On failure to start, the process is stopped and ``RuntimeError`` carries its log.
    """
    proc = spawn_service(name, port, env, instance=instance, workers=workers)
    try:
        proc.wait_ready("/health", timeout=timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_services(
    name: str,
    count: int,
    *,
    prefix: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> list[Proc]:
    """Start ``count`` instances concurrently, named ``{prefix}-{i}`` (prefix defaults to name)."""
    prefix = prefix or name
    procs = [spawn_service(name, env=env, instance=f"{prefix}-{i}") for i in range(count)]
    try:
        for proc in procs:
            proc.wait_ready("/health", timeout=timeout)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs
