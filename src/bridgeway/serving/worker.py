"""One worker process: an event loop (uvloop), the app's lifespan, connections on the shared
listening socket, a once-a-second sweep (the clock, the `date` header, time-outs) and the graceful
stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from types import FunctionType

import uvloop

from bridgeway.serving.http import HttpProtocol

log = logging.getLogger("bridgeway.serving")

STARTUP_FAILED = 3  # a worker's exit status when the app's start-up failed: the supervisor stops


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_header_size: int = 64 * 1024  # request line + headers; more is answered 431
    header_timeout: float = 60.0  # a head that started must be complete within this
    keepalive_timeout: float = 60.0  # an idle connection waiting for its next request
    body_timeout: float = 60.0  # a request body the server waits for that sends nothing this long
    grace: float = 10.0  # on SIGTERM, how long requests in flight get to finish
    ws_max_message_size: int = 16 * 1024 * 1024
    backlog: int = 2048


class Worker:
    """What one worker's connections share (read by `HttpProtocol` on every request)."""

    def __init__(self, app, settings: Settings, loop: asyncio.AbstractEventLoop):
        # An app object is called through its bound __call__: calling the instance looks the
        # method up again on every request.
        self.app = app.__call__ if isinstance(vars(type(app)).get("__call__"), FunctionType) else app
        self.settings = settings
        self.loop = loop
        self.max_header_size = settings.max_header_size
        self.header_timeout = settings.header_timeout
        self.keepalive_timeout = settings.keepalive_timeout
        self.body_timeout = settings.body_timeout
        self.ws_max_message_size = settings.ws_max_message_size
        # 2.3, not 2.4: `send` after the client left returns quietly instead of raising OSError,
        # and the client's leaving reaches the app as `http.disconnect` from `receive` (the proxy
        # and Starlette's streaming responses both watch for it there).
        self.asgi_http = {"version": "3.0", "spec_version": "2.3"}
        self.asgi_websocket = {"version": "3.0", "spec_version": "2.4"}
        self.state: dict | None = None  # the lifespan's state, copied into each scope when the app set some
        self.connections: set[HttpProtocol] = set()
        self.now = loop.time()
        self.server_header = b"server: bridgeway\r\n"
        self.date_header = b""
        self.common_headers = b""  # both
        self.ticker: asyncio.TimerHandle | None = None
        self.server: asyncio.Server | None = None

    def _tick(self) -> None:
        """Once a second: the coarse clock the connections read, the `date` header, time-outs."""
        self.now = now = self.loop.time()
        self.date_header = b"date: %b\r\n" % formatdate(usegmt=True).encode()
        self.common_headers = self.server_header + self.date_header
        for conn in [c for c in self.connections if c.head_since is not None]:
            conn.timed_out(now)
        self.ticker = self.loop.call_later(1.0, self._tick)

    def protocol(self) -> HttpProtocol:
        return HttpProtocol(self)

    async def serve(self, sock: socket.socket) -> int:
        """Lifespan start-up, serve until SIGTERM/SIGINT, stop gracefully, lifespan shutdown."""
        lifespan = Lifespan(self.app)
        if not await lifespan.startup():
            return STARTUP_FAILED
        self.state = lifespan.state or None
        await self.start(sock)
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        await self.stop()
        await lifespan.shutdown()
        return 0

    async def start(self, sock: socket.socket) -> None:
        self._tick()
        self.server = await self.loop.create_server(self.protocol, sock=sock, backlog=self.settings.backlog)

    async def stop(self) -> None:
        """Stop accepting (other workers' copies of the socket stay open); idle connections close
        now, requests in flight get `grace` seconds to finish; what is left is cut."""
        self.server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + self.settings.grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.transport.abort()
            for task in (conn.task, conn.ws and conn.ws.task):
                if task is not None:
                    task.cancel()
        await asyncio.sleep(0)
        if self.ticker is not None:
            self.ticker.cancel()


class Lifespan:
    """The ASGI lifespan protocol: start-up before the first connection, shutdown after the last.
    An app that raises on the lifespan scope before answering does not support it: serving goes on."""

    def __init__(self, app):
        self.app = app
        self.state: dict = {}
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.answer: asyncio.Future | None = None  # the app's answer to the phase under way
        self.phase = "startup"
        self.task: asyncio.Task | None = None

    async def startup(self) -> bool:
        loop = asyncio.get_running_loop()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self.answer = loop.create_future()
        self.task = loop.create_task(self._run(scope))
        self.inbox.put_nowait({"type": "lifespan.startup"})
        message = await self.answer
        if message["type"] == "lifespan.startup.failed":
            log.error("startup failed: %s", message.get("message") or "(no reason given)")
            return False
        return True

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return  # no lifespan support, or the app's lifespan already ended
        self.phase = "shutdown"
        self.answer = asyncio.get_running_loop().create_future()
        self.inbox.put_nowait({"type": "lifespan.shutdown"})
        message = await self.answer
        if message["type"] == "lifespan.shutdown.failed":
            log.error("shutdown failed: %s", message.get("message") or "(no reason given)")

    async def _run(self, scope: dict) -> None:
        try:
            await self.app(scope, self.inbox.get, self._send)
        except Exception as exc:
            if self.answer is None or self.answer.done():
                log.exception("the app's lifespan raised")
            elif self.phase == "startup":
                log.info("the app does not support the lifespan protocol (%r); serving without it", exc)
                self.answer.set_result({"type": "lifespan.startup.complete"})
            else:
                self.answer.set_result({"type": "lifespan.shutdown.failed", "message": repr(exc)})
        finally:
            if self.answer is not None and not self.answer.done():  # returned without answering
                self.answer.set_result({"type": f"lifespan.{self.phase}.complete"})

    async def _send(self, message: dict) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(message)


def run_worker(load_app: Callable[[], object], sock: socket.socket, settings: Settings) -> int:
    """The body of a worker process: load the app, serve until told to stop. Returns the exit status."""
    log_to_stderr()
    try:
        app = load_app()
    except Exception as exc:
        log.exception("could not load the app: %s", exc)
        return STARTUP_FAILED
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        worker = Worker(app, settings, runner.get_loop())
        return runner.run(worker.serve(sock))


def log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s bridgeway.serving[%(process)d] %(message)s")
        )
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
