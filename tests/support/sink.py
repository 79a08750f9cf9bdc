"""A recording HTTP server on loopback: push deliveries and callbacks land here.

    sink = Sink(answer=lambda req: 200)   # or 500, or sleep first to be slow
    ... sink.requests -> [Received(path, headers, body)], sink.url
    sink.close()

Threaded (one thread per connection, HTTP/1.1 keep-alive), so a gateway's pooled connections
are served concurrently; `answer` runs in those threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.procs import HOST


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes


class Sink:
    def __init__(self, answer: Callable[[Received], int] = lambda req: 200) -> None:
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                req = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with sink.lock:
                    sink.requests.append(req)
                status = answer(req)
                reply = b'{"ok": true}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_PUT = do_POST  # noqa: N815

            def do_GET(self) -> None:  # noqa: N802 - health checks
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}"

    def job_ids(self) -> list[str]:
        with self.lock:
            return [r.headers.get("x-bridgeway-job-id", "") for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
