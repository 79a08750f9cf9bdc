"""The supervisor: binds the listening socket once, forks N workers that share it, relays SIGHUP
to each (every worker reloads in place), starts a new worker when one dies, and stops them all on
SIGTERM/SIGINT. A worker that dies soon after it started is restarted after a back-off that
doubles each time its replacement dies soon too (a crash at start-up does not become a fork loop).

The socket is bound before any worker exists, so "port in use" fails the start loudly. Workers
are forked before any event loop exists in this process; the kernel hands each new connection to
one of the workers blocked in accept on the shared socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable

from bridgeway.serving.worker import STARTUP_FAILED, Settings, log_to_stderr, run_worker

log = logging.getLogger("bridgeway.serving")

HANDLED = {signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
QUICK_DEATH = 5.0  # a worker dying within this many seconds of its start is restarted after a back-off
BACKOFF_FIRST = 0.1  # seconds before the first restart after a quick death; doubles with each one after
BACKOFF_MAX = 5.0


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (a gateway holds many idle connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1_048_576:
        hard = 1_048_576
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Supervisor:
    def __init__(self, load_app: Callable[[], object], settings: Settings, workers: int):
        self.load_app = load_app
        self.settings = settings
        self.count = workers
        self.workers: dict[int, tuple[float, int]] = {}  # pid -> (when it started, quick deaths before it)
        self.pending: list[tuple[float, int]] = []  # restarts backing off: (when due, quick deaths so far)
        self.sock: socket.socket | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (0) or a worker's failed start-up (its status)."""
        log_to_stderr()
        raise_fd_limit()
        try:
            self.sock = bind(self.settings.host, self.settings.port, self.settings.backlog)
        except OSError as exc:
            log.error(
                "cannot listen on %s:%d: %s", self.settings.host, self.settings.port, exc.strerror or exc
            )
            return 1
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            for _ in range(self.count):
                self._spawn()
            return self._watch()
        finally:
            self._stop_all()
            self.sock.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

    def _spawn(self, quick_deaths: int = 0) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                # SIGHUP is relayed to every worker; an app that reloads on it installs its own
                # handler. Ignored before the mask lifts, so one already pending is dropped, not fatal.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                status = run_worker(self.load_app, self.sock, self.settings)
            except BaseException:
                log.exception("worker failed")
            finally:
                logging.shutdown()
                os._exit(status)
        self.workers[pid] = (time.monotonic(), quick_deaths)

    def _watch(self) -> int:
        while True:
            wait = 1.0
            if self.pending:
                wait = min(wait, max(0.0, min(due for due, _ in self.pending) - time.monotonic()))
            info = signal.sigtimedwait(HANDLED, wait)
            sig = info.si_signo if info is not None else None
            if sig == signal.SIGHUP:
                for pid in self.workers:
                    _kill(pid, signal.SIGHUP)
            elif sig in (signal.SIGTERM, signal.SIGINT):
                return 0
            for pid, status in _reap():
                if pid not in self.workers:
                    continue
                started, quick_deaths = self.workers.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                if code == STARTUP_FAILED:
                    log.error("worker %d could not start; stopping", pid)
                    return STARTUP_FAILED
                lived = time.monotonic() - started
                if lived >= QUICK_DEATH:
                    log.warning("worker %d died unexpectedly (exit status %d); starting a new one", pid, code)
                    self._spawn()
                    continue
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**quick_deaths)
                log.warning(
                    "worker %d died unexpectedly %.1fs after starting (exit status %d); "
                    "starting a new one in %.1fs",
                    pid,
                    lived,
                    code,
                    delay,
                )
                self.pending.append((time.monotonic() + delay, quick_deaths + 1))
            now = time.monotonic()
            for restart in [r for r in self.pending if r[0] <= now]:
                self.pending.remove(restart)
                self._spawn(restart[1])

    def _stop_all(self) -> None:
        """SIGTERM to every worker, then wait for their graceful stop (SIGKILL past it)."""
        for pid in self.workers:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace + 5.0
        while self.workers and time.monotonic() < deadline:
            for pid, _ in _reap():
                self.workers.pop(pid, None)
            time.sleep(0.02)
        for pid in self.workers:
            log.error("worker %d did not stop in time; killed", pid)
            _kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.workers.clear()


def _reap() -> list[tuple[int, int]]:
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def serve(load_app: Callable[[], object], settings: Settings, workers: int = 1) -> int:
    """Run `workers` processes serving the app `load_app()` builds in each; returns the exit status."""
    return Supervisor(load_app, settings, workers).run()
