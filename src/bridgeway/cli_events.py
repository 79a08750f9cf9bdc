"""`bridgeway events tail | publish`: the event bus from a terminal, through a running gateway's API.

`tail` follows `/api/v1/events/stream` (SSE) and, when the connection drops, reconnects with the
last id it saw, so it misses nothing; on a terminal it shows a live table (rich), piped it prints
one JSON line per event (`--json` forces that).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from typing import Annotated

import aiohttp
import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

events_app = typer.Typer(
    help="The event bus: follow and publish events through a running gateway.", no_args_is_help=True
)
err = Console(stderr=True)

UrlOption = Annotated[str, typer.Option(envvar="BRIDGEWAY_URL", help="the gateway's address")]
TokenOption = Annotated[
    str | None,
    typer.Option(envvar="BRIDGEWAY_TOKEN", help="an admin token, API key or token (or $BRIDGEWAY_TOKEN)"),
]


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _fail(resp: aiohttp.ClientResponse) -> None:
    try:
        message = (await resp.json())["error"]["message"]
    except (aiohttp.ContentTypeError, KeyError, ValueError):
        message = (await resp.text())[:200]
    err.print(f"[bold red]{resp.status}[/] {message}", highlight=False)
    raise typer.Exit(1)


async def _follow(url: str, token: str | None, types: str, start: str, service: str | None):
    """(id, event) for ever, reconnecting with the last id after a dropped connection."""
    last = start
    params = {"types": types, **({"service": service} if service else {})}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as session:
        while True:
            query = {**params, "after": last}
            try:
                async with session.get(
                    f"{url}/api/v1/events/stream", params=query, headers=_headers(token)
                ) as resp:
                    if resp.status != 200:
                        await _fail(resp)
                    event_id, kind = None, None
                    async for raw in resp.content:
                        line = raw.rstrip(b"\r\n")
                        if line.startswith(b"id: "):
                            event_id = line[4:].decode()
                        elif line.startswith(b"event: "):
                            kind = line[7:]
                        elif line.startswith(b"data: ") and kind == b"gap":
                            gap = orjson.loads(line[6:])
                            err.print(
                                f"[yellow]missed[/] the events after {gap['after']} before {gap['first']}:"
                                " the log no longer holds them",
                                highlight=False,
                            )
                            last, kind = event_id or last, None
                        elif line.startswith(b"data: ") and event_id is not None:
                            last = event_id
                            yield event_id, orjson.loads(line[6:])
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                err.print(f"connection lost ({type(exc).__name__}); resuming after {last}", highlight=False)
                await asyncio.sleep(1.0)


@events_app.command("tail")
def tail(
    types: Annotated[str, typer.Option(help='comma-separated types or globs, e.g. "job.*"')] = "*",
    from_: Annotated[
        str, typer.Option("--from", help="an event id to resume after, earliest or latest")
    ] = "latest",
    service: Annotated[
        str | None, typer.Option(help="only events addressed to this service (or to all)")
    ] = None,
    count: Annotated[int | None, typer.Option(min=1, help="exit after this many events")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line per event, no live view")] = False,
    url: UrlOption = "http://127.0.0.1:8080",
    token: TokenOption = None,
) -> None:
    """Follow events live, from an id or from now."""
    plain = as_json or not sys.stdout.isatty()

    async def run() -> None:
        seen = 0
        recent: deque[tuple[str, dict]] = deque(maxlen=20)
        started = time.monotonic()
        live = None if plain else Live(_table(recent, 0, 0.0), refresh_per_second=8, console=Console())
        if live is not None:
            live.start()
        try:
            async for event_id, event in _follow(url.rstrip("/"), token, types, from_, service):
                seen += 1
                if plain:
                    sys.stdout.write(orjson.dumps({"id": event_id, "event": event}).decode() + "\n")
                    sys.stdout.flush()
                else:
                    recent.append((event_id, event))
                    live.update(_table(recent, seen, seen / max(time.monotonic() - started, 1e-6)))
                if count is not None and seen >= count:
                    return
        finally:
            if live is not None:
                live.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def _table(recent, seen: int, rate: float) -> Table:
    table = Table(title=f"events: {seen} seen, {rate:.1f}/s", expand=True)
    for column in ("id", "type", "source", "targets", "time", "payload"):
        table.add_column(column, overflow="ellipsis", no_wrap=True)
    for event_id, e in recent:
        payload = orjson.dumps(e.get("payload")).decode()
        targets = ",".join(e.get("target_services") or []) or "*"
        cells = (
            event_id,
            e.get("event_type", ""),
            e.get("source_service", ""),
            targets,
            e.get("timestamp", ""),
            payload[:120],
        )
        table.add_row(*map(Text, cells))
    return table


@events_app.command("publish")
def publish(
    event_type: Annotated[str, typer.Argument(help="e.g. job.completed")],
    source: Annotated[str, typer.Option(help="the publishing service")] = "cli",
    payload: Annotated[str, typer.Option(help="JSON")] = "null",
    targets: Annotated[str | None, typer.Option(help="comma-separated target services")] = None,
    event_id: Annotated[str | None, typer.Option(help="for dedupe; generated when absent")] = None,
    url: UrlOption = "http://127.0.0.1:8080",
    token: TokenOption = None,
) -> None:
    """Publish one event; prints its id."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        err.print(f"[bold red]--payload is not JSON[/]: {exc}", highlight=False)
        raise typer.Exit(1) from None
    event = {"event_type": event_type, "source_service": source, "payload": data}
    if targets:
        event["target_services"] = [t.strip() for t in targets.split(",") if t.strip()]
    if event_id:
        event["event_id"] = event_id

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{url.rstrip('/')}/api/v1/events", json=event, headers=_headers(token)) as resp,
        ):
            if resp.status != 200:
                await _fail(resp)
            [stored] = (await resp.json())["events"]
            note = " (duplicate: already stored)" if stored["duplicate"] else ""
            print(f"{stored['id']} {stored['event_id']}{note}")

    try:
        asyncio.run(run())
    except aiohttp.ClientConnectionError as exc:
        err.print(f"[bold red]cannot reach {url}[/]: {exc}", highlight=False)
        raise typer.Exit(1) from None
