"""`bridgeway serve | check | demo | keys | audit | events | jobs | spend`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bridgeway import __version__
from bridgeway.config import Config, ConfigError, load_config
from bridgeway.config.units import format_duration

app = typer.Typer(help="Bridgeway: one front door for AI services and LLM providers.", no_args_is_help=True)
# Piped output (CI, `| less`) gets a width that keeps the route table on one line per route.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="bridgeway.yaml to use")]


def _load_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]invalid config[/] {path}:")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False, highlight=False)
        raise typer.Exit(1) from None


@app.command()
def check(config: ConfigOption = Path("bridgeway.yaml")) -> None:
    """Validate a config and print the routes it compiles to."""
    cfg = _load_or_exit(config)
    table = Table(
        title=f"{config}: {len(cfg.services)} services, listening on {cfg.listen}, state in {cfg.state}"
    )
    for column in (
        "route",
        "instances",
        "balancer",
        "timeout",
        "retries",
        "breaker",
        "health",
        "limits",
        "cache",
        "max body",
    ):
        table.add_column(column)
    for name, svc in cfg.services.items():
        table.add_row(
            f"/bridge/{name}/*",
            "\n".join(svc.instances) or "(registered at run time)",
            svc.balancer,
            format_duration(svc.timeout),
            f"{svc.retries.attempts} tries, budget {svc.retries.budget:.0%}",
            f"{svc.breaker.failures} fails -> open {format_duration(svc.breaker.open_for)}",
            f"{svc.health.path} every {format_duration(svc.health.interval)}"
            if svc.health
            else "passive only",
            "\n".join(
                (f"{lim.rate}" if lim.rate else f"{lim.concurrency} in flight")
                + f" per {lim.per}"
                + (f" on {lim.path}" if lim.path else "")
                for lim in svc.limits
            )
            or "-",
            f"{format_duration(svc.cache.ttl)} per {svc.cache.scope}"
            + (f" on {svc.cache.path}" if svc.cache.path else "")
            if svc.cache
            else "-",
            f"{svc.max_body:,} B",
        )
    console.print(table)
    console.print("[green]config is valid[/]")


@app.command()
def serve(
    config: ConfigOption = Path("bridgeway.yaml"),
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
) -> None:
    """Run the gateway. SIGHUP (or POST /api/v1/admin/reload) reloads the config in place."""
    cfg = _load_or_exit(config)
    run_server(cfg, config, workers)


def run_server(cfg: Config, config_path: Path, workers: int) -> None:
    from bridgeway.workers import serve_gateway

    status = serve_gateway(cfg, str(config_path.resolve()), workers)
    if status:
        raise typer.Exit(status)


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="gateway port")] = 8080,
) -> None:
    """Run the gateway with examples/bridgeway.yaml and the sample services; Ctrl-C stops all."""
    from bridgeway.demo import run_demo

    run_demo(port)


keys_app = typer.Typer(help="API keys, stored hashed in the config's state backend.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _with_state(config: Path, action):
    """Run `action(KeyStore, AuditLog)` against the state the gateway with this config uses.
    The CLI writes there directly, so it records its changes in the audit log itself."""
    import asyncio

    from bridgeway.governance.audit import AuditLog
    from bridgeway.observability import logs
    from bridgeway.security.keys import KeyStore
    from bridgeway.state import open_state

    cfg = _load_or_exit(config)
    if cfg.state.startswith("memory:"):
        err.print("keys and the audit log need shared state: set state to sqlite:///... or redis://...")
        raise typer.Exit(1)
    logs.configure("warning", sys.stderr.buffer)  # stdout carries what the command prints

    async def run():
        kv = open_state(cfg.state)
        audit = AuditLog(kv, retention=cfg.audit.retention, enabled=cfg.audit.enabled)
        audit.start()
        try:
            return await action(KeyStore(kv), audit)
        finally:
            await audit.stop()
            await kv.close()
            if audit.dropped:
                err.print(f"[red]{audit.dropped} audit record(s) could not be written[/]")

    return asyncio.run(run())


def _audited(event: str, change, **details):
    """An action for `_with_state` that makes `change(keys)` and records `event` for it: a
    success when it returns the key's record (or a token and the record), else a failure."""
    from bridgeway.governance.audit import cli_actor, key_fields

    async def action(keys, audit):
        result = await change(keys)
        record = result[1] if isinstance(result, tuple) else result
        facts = {**details, **key_fields(record)} if record is not None else details
        outcome = "success" if record is not None else "failure"
        audit.record(event, actor=cli_actor(), outcome=outcome, **facts)
        return result

    return action


def _print_secret(token: str) -> None:
    console.print(token, markup=False, highlight=False, soft_wrap=True)
    err.print("[yellow]Store this key now: it is shown only once.[/]")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="who or what the key is for")],
    role: Annotated[str | None, typer.Option(help="role it acts with (admin for the management API)")] = None,
    client: Annotated[
        str | None, typer.Option(help="a client of the config's clients table: the key acts as it")
    ] = None,
    services: Annotated[str | None, typer.Option(help="comma-separated services it may call")] = None,
    expires: Annotated[str | None, typer.Option(help="lifetime, e.g. 90d")] = None,
    models: Annotated[
        str | None, typer.Option(help="comma-separated LLM model names (globs) it may use, within its role's")
    ] = None,
    budget: Annotated[
        list[str] | None,
        typer.Option(help="its own LLM budget, e.g. 5usd/1d or 2000000tokens/30d; repeatable"),
    ] = None,
    config: ConfigOption = Path("bridgeway.yaml"),
) -> None:
    """Create a key and print it, once."""
    from pydantic import TypeAdapter, ValidationError

    from bridgeway.config.models import BudgetConfig
    from bridgeway.config.units import parse_duration

    try:
        lifetime = parse_duration(expires) if expires else None
    except ValueError as exc:
        err.print(f"--expires: {exc}")
        raise typer.Exit(1) from None
    try:
        checked = TypeAdapter(list[BudgetConfig]).validate_python(budget or [])
        budgets = [b.model_dump(exclude_none=True) for b in checked]
    except ValidationError as exc:
        err.print(f"--budget: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", markup=False)
        raise typer.Exit(1) from None
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    wanted = [s.strip() for s in services.split(",") if s.strip()] if services else None
    if client is not None:
        clients = _load_or_exit(config).clients
        if client not in clients:
            err.print(f"--client: no client named {client!r} in {config}")
            raise typer.Exit(1)
        role = clients[client].role
    elif role is None:
        err.print("--role is required (or --client, to act as a client of the config)")
        raise typer.Exit(1)
    token, _ = _with_state(
        config,
        _audited(
            "key.created",
            lambda keys: keys.create(
                name,
                role,
                services=wanted,
                expires_in=lifetime,
                client=client,
                models=allowed,
                budgets=budgets,
            ),
        ),
    )
    _print_secret(token)


@keys_app.command("list")
def keys_list(config: ConfigOption = Path("bridgeway.yaml")) -> None:
    """Every key, without secrets."""
    from datetime import UTC, datetime

    def when(ts: float | None) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else "-"

    records = _with_state(config, lambda keys, audit: keys.list())
    table = Table(title=f"{len(records)} keys")
    from bridgeway.llm.budgets import format_budget

    for column in ("id", "name", "role", "services", "models", "budgets", "created", "expires", "revoked"):
        table.add_column(column)
    for r in sorted(records, key=lambda r: r.created_at):
        services = ",".join(r.services) if r.services is not None else "(role's)"
        models = ",".join(r.models) if r.models is not None else "(role's)"
        budgets = " ".join(format_budget(b) for b in r.budgets) or "(role's)"
        cells = (r.id, r.name, r.role, services, models, budgets)
        table.add_row(*map(Text, cells), when(r.created_at), when(r.expires_at), when(r.revoked_at))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOption = Path("bridgeway.yaml")) -> None:
    """Revoke a key by its id: refused by every gateway sharing this state."""
    if _with_state(config, _audited("key.revoked", lambda keys: keys.revoke(key_id), key_id=key_id)) is None:
        err.print(f"no key with id {key_id}")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    grace: Annotated[str, typer.Option(help="how long the old secret keeps working")] = "1h",
    config: ConfigOption = Path("bridgeway.yaml"),
) -> None:
    """Give a key a new secret; the old one works for the grace period."""
    from bridgeway.config.units import parse_duration

    try:
        seconds = parse_duration(grace)
    except ValueError as exc:
        err.print(f"--grace: {exc}")
        raise typer.Exit(1) from None
    rotated = _with_state(
        config,
        _audited("key.rotated", lambda keys: keys.rotate(key_id, seconds), key_id=key_id, grace=seconds),
    )
    if rotated is None:
        err.print(f"no active key with id {key_id}")
        raise typer.Exit(1)
    _print_secret(rotated[0])


@app.command()
def audit(
    event: Annotated[str | None, typer.Option(help="only this event, e.g. key.revoked")] = None,
    actor: Annotated[str | None, typer.Option(help='only this actor, e.g. "key:0123456789"')] = None,
    since: Annotated[str | None, typer.Option(help="from: 1h (ago), ISO 8601 or epoch seconds")] = None,
    until: Annotated[str | None, typer.Option(help="to: 10m (ago), ISO 8601 or epoch seconds")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="records to show")] = 50,
    cursor: Annotated[str | None, typer.Option(help="go on from a previous listing")] = None,
    config: ConfigOption = Path("bridgeway.yaml"),
) -> None:
    """Security events from the audit log, newest first."""
    import time

    from bridgeway.governance.audit import parse_window

    try:
        start, end = parse_window(since, until, time.time())
    except ValueError as exc:
        err.print(f"--{exc}", markup=False)
        raise typer.Exit(1) from None

    async def query(keys, log):
        return await log.query(event, actor, start, end, limit, cursor)

    try:
        records, after = _with_state(config, query)
    except ValueError as exc:
        err.print(str(exc), markup=False)
        raise typer.Exit(1) from None
    table = Table(title=f"{len(records)} audit records, newest first")
    for column in ("time", "event", "outcome", "actor", "request", "address", "details"):
        table.add_column(column)
    for r in records:
        request = f"{r['method']} {r['path']}" if r["path"] else "-"
        details = ", ".join(f"{k}={v}" for k, v in r["details"].items() if v is not None)
        cells = (
            r["time"],
            r["event"],
            r["outcome"],
            r["actor"] or "-",
            request,
            r["address"] or "-",
            details,
        )
        table.add_row(*map(Text, cells))  # as text: a value such as "[redacted]" is not markup
    console.print(table, highlight=False)
    if after is not None:
        err.print(f"more: --cursor {after}", markup=False)


from bridgeway.cli_events import events_app  # noqa: E402 - after `app`, to add to it

app.add_typer(events_app, name="events")


@app.command()
def spend(
    key: Annotated[str | None, typer.Option(help="a key id, or a caller id")] = None,
    team: Annotated[str | None, typer.Option(help="a client of the clients table")] = None,
    model: Annotated[str | None, typer.Option(help="a public model name")] = None,
    since: Annotated[
        str | None, typer.Option("--from", help="first UTC day, YYYY-MM-DD (default: 29 days ago)")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--to", help="last UTC day, YYYY-MM-DD (default: today)")
    ] = None,
    group_by: Annotated[
        str, typer.Option(help="columns to sum by: day,key,team,model,deployment")
    ] = "key,model",
    config: ConfigOption = Path("bridgeway.yaml"),
) -> None:
    """LLM spend from the state backend: totals and rows per key, team, model and day."""
    from bridgeway.api.spend import parse_day, spend_report
    from bridgeway.errors import GatewayError
    from bridgeway.llm.ledger import open_ledger
    from bridgeway.llm.spend import Spending, today

    cfg = _load_or_exit(config)
    if cfg.state.startswith("memory:"):
        err.print("spend is kept in the gateway's memory with state memory://: use the API")
        raise typer.Exit(1)

    async def run():
        spending = Spending(open_ledger(cfg.state))
        try:
            last = parse_day(until, today(), "--to")
            return await spend_report(
                spending, key, team, model, parse_day(since, last - 29, "--from"), last, group_by
            )
        finally:
            await spending.close()

    import asyncio

    try:
        report = asyncio.run(run())
    except GatewayError as exc:
        err.print(exc.message, markup=False)
        raise typer.Exit(1) from None
    totals = report["totals"]
    columns = [c.strip() for c in group_by.split(",") if c.strip()]
    table = Table(
        title=f"LLM spend {report['from']} .. {report['to']}: {totals['requests']} requests, "
        f"{totals['tokens_in']} tokens in, {totals['tokens_out']} out, {totals['usd']:.6f} USD"
    )
    for column in (*columns, "requests", "tokens in", "tokens out", "USD"):
        table.add_column(column)
    for row in report["rows"]:
        cells = [str(row[c]) for c in columns]
        cells += [str(row["requests"]), str(row["tokens_in"]), str(row["tokens_out"]), f"{row['usd']:.6f}"]
        table.add_row(*map(Text, cells))
    console.print(table, highlight=False)


jobs_app = typer.Typer(
    help="Job queues, through the gateway's HTTP API (the config's admin token, or --token).",
    no_args_is_help=True,
)
app.add_typer(jobs_app, name="jobs")
UrlOption = Annotated[
    str | None, typer.Option("--url", help="gateway URL; default: the config's listen address")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="BRIDGEWAY_TOKEN", help="admin token or API key; default: admin.token"),
]


def _jobs_call(config: Path, url: str | None, token: str | None, action):
    """Run `action(client)` against the gateway; its errors are printed, not raised."""
    import asyncio

    from bridgeway.sdk import BridgewayError, Client

    if url is None or token is None:
        cfg = _load_or_exit(config)
        url = url or f"http://{cfg.listen}"
        if token is None and cfg.admin.token is not None:
            token = cfg.admin.token.get_secret_value()

    async def run():
        async with Client(url, api_key=token) as client:
            return await action(client)

    try:
        return asyncio.run(run())
    except BridgewayError as exc:
        err.print(f"[red]{exc.code}[/] {exc.message}", highlight=False)
        raise typer.Exit(1) from None


def _json_arg(text: str, what: str):
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        err.print(f"{what} is not valid JSON: {exc}", markup=False)
        raise typer.Exit(1) from None


@jobs_app.command("queues")
def jobs_queues(
    config: ConfigOption = Path("bridgeway.yaml"), url: UrlOption = None, token: TokenOption = None
):
    """Every queue with its depth, leases, dead letters and the age of its oldest job."""

    async def action(client):
        async with client._request("GET", "/api/v1/queues") as resp:
            return (await resp.json())["queues"]

    table = Table(title="queues")
    for column in ("queue", "delivery", "queued", "leased", "dead", "oldest", "max attempts"):
        table.add_column(column)
    for q in _jobs_call(config, url, token, action):
        table.add_row(
            q["name"],
            q["delivery"],
            str(q["queued"]),
            str(q["leased"]),
            str(q["dead"]),
            format_duration(q["oldest_age"]),
            str(q["max_attempts"]),
        )
    console.print(table)


@jobs_app.command("enqueue")
def jobs_enqueue(
    queue: str,
    payload: Annotated[str, typer.Argument(help="the job's payload, as JSON")],
    delay: Annotated[str | None, typer.Option(help='e.g. "30s"')] = None,
    priority: Annotated[int | None, typer.Option(help="higher first")] = None,
    key: Annotated[str | None, typer.Option("--key", help="idempotency key")] = None,
    config: ConfigOption = Path("bridgeway.yaml"),
    url: UrlOption = None,
    token: TokenOption = None,
):
    """Enqueue one job; prints its id."""
    body = _json_arg(payload, "the payload")

    async def action(client):
        return await client.queues.enqueue(queue, body, delay=delay, priority=priority, idempotency_key=key)

    console.print(_jobs_call(config, url, token, action), highlight=False)


@jobs_app.command("status")
def jobs_status(
    job_id: str,
    config: ConfigOption = Path("bridgeway.yaml"),
    url: UrlOption = None,
    token: TokenOption = None,
):
    """A job's state, attempts, last error and payload, as JSON."""
    import orjson

    async def action(client):
        return await client.queues.get(job_id)

    job = _jobs_call(config, url, token, action)
    if job is None:
        err.print(f"no job {job_id!r}", markup=False)
        raise typer.Exit(1)
    console.print_json(orjson.dumps(job).decode())


@jobs_app.command("dead")
def jobs_dead(
    queue: str,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    after: Annotated[str | None, typer.Option(help="go on after this job id")] = None,
    config: ConfigOption = Path("bridgeway.yaml"),
    url: UrlOption = None,
    token: TokenOption = None,
):
    """The dead letters of a queue."""

    async def action(client):
        params = {"limit": str(limit)} | ({"after": after} if after else {})
        async with client._request("GET", f"/api/v1/queues/{queue}/dead", params=params) as resp:
            return await resp.json()

    page = _jobs_call(config, url, token, action)
    table = Table(title=f"{len(page['jobs'])} dead jobs in {queue}")
    for column in ("id", "attempts", "last error", "payload"):
        table.add_column(column)
    import orjson

    for job in page["jobs"]:
        table.add_row(
            *map(
                Text,
                (
                    job["id"],
                    str(job["attempts"]),
                    job["last_error"] or "-",
                    orjson.dumps(job["payload"]).decode()[:80],
                ),
            )
        )
    console.print(table)
    if page["next"]:
        err.print(f"more: --after {page['next']}", markup=False)


@jobs_app.command("replay")
def jobs_replay(
    queue: str,
    ids: Annotated[list[str] | None, typer.Argument(help="job ids; every dead job when none")] = None,
    config: ConfigOption = Path("bridgeway.yaml"),
    url: UrlOption = None,
    token: TokenOption = None,
):
    """Dead jobs back to their queue, attempts reset."""
    import orjson

    async def action(client):
        body = orjson.dumps({"ids": ids} if ids else {})
        async with client._request(
            "POST",
            f"/api/v1/queues/{queue}/dead/replay",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as resp:
            return (await resp.json())["replayed"]

    console.print(f"replayed {_jobs_call(config, url, token, action)} job(s)")


@jobs_app.command("purge")
def jobs_purge(
    queue: str,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
    config: ConfigOption = Path("bridgeway.yaml"),
    url: UrlOption = None,
    token: TokenOption = None,
):
    """Delete the dead letters of a queue."""
    if not yes:
        typer.confirm(f"delete every dead job of {queue!r}?", abort=True)

    async def action(client):
        async with client._request("POST", f"/api/v1/queues/{queue}/dead/purge") as resp:
            return (await resp.json())["purged"]

    console.print(f"purged {_jobs_call(config, url, token, action)} job(s)")


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
