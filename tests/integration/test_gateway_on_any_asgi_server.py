"""The gateway is an ASGI app: on a server without `bridgeway.serving`'s RESPOND extension (any
other ASGI server, or a test driving it), /bridge answers with the standard messages."""

from __future__ import annotations

import orjson

from bridgeway.config import load_config
from bridgeway.server import Gateway
from tests.support.procs import Proc


async def test_a_bridge_answer_without_the_respond_extension_is_two_asgi_messages(echo: Proc, tmp_path):
    config = tmp_path / "bridgeway.yaml"
    config.write_text(f"listen: 127.0.0.1:1\nservices:\n  echo:\n    instances: ['{echo.url}']\n")
    gateway = Gateway(load_config(str(config)), str(config))
    await gateway.startup()
    scope = {  # as another server would make it: no "extensions"
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/bridge/echo/hello",
        "raw_path": b"/bridge/echo/hello",
        "query_string": b"a=1",
        "headers": [(b"host", b"gateway.test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    try:
        await gateway(scope, receive, send)
    finally:
        await gateway.shutdown()
    start, body = sent
    assert (start["type"], start["status"], body["type"]) == (
        "http.response.start",
        200,
        "http.response.body",
    )
    assert not body.get("more_body")
    seen = orjson.loads(body["body"])
    assert seen["path"] == "/hello" and seen["query"] == "a=1"
