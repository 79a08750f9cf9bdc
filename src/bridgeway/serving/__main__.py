"""`python -m bridgeway.serving module:app [--host H] [--port P] [--workers N] [--factory] [--app-dir D]`:
serve any ASGI app (the sample services, benchmark apps) the way `bridgeway serve` serves the gateway."""

from __future__ import annotations

import argparse
import importlib
import sys

from bridgeway.serving import Settings, serve


def load(spec: str, factory: bool):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"expected module:attribute, got {spec!r}")
    app = getattr(importlib.import_module(module_name), attr)
    return app() if factory else app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridgeway.serving", description=__doc__)
    parser.add_argument("app", help="module:attribute of the ASGI app (or of its factory, with --factory)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--factory", action="store_true", help="call module:attribute to build the app")
    parser.add_argument("--app-dir", default=".", help="directory put first on sys.path (default: .)")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.app_dir)
    settings = Settings(host=args.host, port=args.port)
    return serve(lambda: load(args.app, args.factory), settings, args.workers)


if __name__ == "__main__":
    sys.exit(main())
