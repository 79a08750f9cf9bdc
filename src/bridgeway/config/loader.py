"""Load bridgeway.yaml: YAML -> ${env:...} references -> typed models, with errors that name the field."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bridgeway.config.models import Config


class ConfigError(Exception):
    """A config that cannot serve; `problems` are lines of the form `path.to.field: why`."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _resolve(node: Any, path: str, problems: list[str]) -> Any:
    """Replace ${env:NAME} (or ${env:NAME:-default}) inside every string of the tree."""
    if isinstance(node, dict):
        return {k: _resolve(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, f"{path}.{i}", problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1), m.group(2))
            if value is None:
                problems.append(f"{path}: environment variable {m.group(1)} is not set")
                return ""
            return value

        return _REF.sub(sub, node)
    return node


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "constrained-")))


def _why(err: dict[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "string_pattern_mismatch" and err["loc"][:1] == ("services",):
        return "service names are lowercase letters, digits, - and _"
    return msg


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping"])
    problems: list[str] = []
    data = _resolve(data, "", problems)
    if problems:
        raise ConfigError(problems)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{_field(e['loc'])}: {_why(e)}" for e in exc.errors()]) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    return parse_config(text, str(p))
