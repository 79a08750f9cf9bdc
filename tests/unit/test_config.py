"""Config models: the errors name the field and say why."""

from __future__ import annotations

import pytest

from bridgeway.config import ConfigError
from bridgeway.config.loader import parse_config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    return err.value.problems


def test_a_limit_is_a_rate_or_a_concurrency_not_both():
    base = "services:\n  sim:\n    instances: [http://127.0.0.1:9101]\n    limits: [{limits}]\n"
    assert (
        parse_config(base.replace("{limits}", "{concurrency: 4}")).services["sim"].limits[0].concurrency == 4
    )
    (both,) = problems(base.replace("{limits}", "{rate: 10/s, concurrency: 4}"))
    assert both.startswith("services.sim.limits.0") and "exactly one of rate or concurrency" in both
    (neither,) = problems(base.replace("{limits}", "{per: ip}"))
    assert "exactly one of rate or concurrency" in neither


def test_clients_name_known_roles():
    config = parse_config(
        "roles: {analyst: {allow: [{service: sim}]}}\n"
        "clients:\n  agi: {role: analyst, services: [sim], limits: [{rate: 1000/min}, {concurrency: 8}]}\n"
    )
    agi = config.clients["agi"]
    assert (agi.role, agi.services, agi.limits[1].concurrency) == ("analyst", ["sim"], 8)
    (unknown,) = problems("clients:\n  agi: {role: analist}\n")
    assert "clients.agi.role: no role named 'analist'" in unknown
