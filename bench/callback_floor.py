"""What the gateway's stack costs with nothing on it: a bare HTTP/1.1 proxy on uvloop and
httptools (both sides), all callbacks, no task, no coroutine, no ASGI, no checks. It answers
`/bridge/bench/...` from one upstream over keep-alive connections, as the `bridgeway` row of
bench/proxy.py does, but does none of the gateway's work (no header pass, trace, balancer,
breaker, metrics or time-outs). It is a floor to read the gateway's instructions against, not a
peer: the distance between the two is the cost of the gateway's Python, not of the I/O.

    python bench/callback_floor.py PORT UPSTREAM_PORT
    OUT=/tmp/floor.cg ... (see bench/README.md for the callgrind line)
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

PREFIX = len(b"/bridge/bench")
DROPPED = frozenset((b"connection", b"server", b"content-length", b"keep-alive"))


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; answers the client it was lent to."""

    def __init__(self, idle: list[Upstream]):
        self.idle = idle
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.idle.append(self)

    def connection_lost(self, exc) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.client is not None:
            self.client.transport.close()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        self.idle.append(self)
        client.answer(self.parser.get_status_code(), self.headers, b"".join(self.body))


class Client(asyncio.Protocol):
    def __init__(self, idle: list[Upstream], upstream_port: int):
        self.idle = idle
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        lines = [b"GET %s HTTP/1.1" % (self.url[PREFIX:] or b"/"), *map(b": ".join, self.headers), b"", b""]
        head = b"\r\n".join(lines)
        if self.idle:
            self.send(self.idle.pop(), head)
        else:  # a new connection first (only while the pool grows)
            loop = asyncio.get_running_loop()
            connecting = loop.create_connection(lambda: Upstream([]), "127.0.0.1", self.upstream_port)
            loop.create_task(connecting).add_done_callback(lambda done: self.send(done.result()[1], head))

    def send(self, upstream: Upstream, head: bytes) -> None:
        upstream.idle = self.idle
        upstream.client = self
        upstream.transport.write(head)

    def answer(self, status: int, headers, body: bytes) -> None:
        lines = [b"HTTP/1.1 %d OK" % status]
        lines += [b"%s: %s" % (name.lower(), value) for name, value in headers if name.lower() not in DROPPED]
        lines += [b"content-length: %d" % len(body), b"", b""]
        self.transport.write(b"\r\n".join(lines) + body)


async def main(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    idle: list[Upstream] = []
    await loop.create_server(lambda: Client(idle, upstream_port), "127.0.0.1", port, backlog=4096)
    print(f"callback floor on 127.0.0.1:{port} -> 127.0.0.1:{upstream_port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
