"""`bridgeway serve | check | demo`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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
                f"{lim.rate} per {lim.per}" + (f" on {lim.path}" if lim.path else "") for lim in svc.limits
            )
            or "-",
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
    from bridgeway.supervisor import serve_forever

    serve_forever(cfg, str(config_path.resolve()), workers)


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="gateway port")] = 8080,
) -> None:
    """Run the gateway with examples/bridgeway.yaml and the sample services; Ctrl-C stops all."""
    from bridgeway.demo import run_demo

    run_demo(port)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
