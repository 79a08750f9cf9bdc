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


def test_a_cache_is_opt_in_and_its_fields_are_checked():
    config = parse_config(
        "cache: {max_entries: 500, max_bytes: 8MB}\n"
        "services:\n  a: {cache: {ttl: 5m, vary: [Accept-Language, accept], scope: role}}\n  b: {}\n"
    )
    cache = config.services["a"].cache
    assert (cache.ttl, cache.vary, cache.scope, cache.methods) == (
        300.0,
        ["accept", "accept-language"],
        "role",
        ["GET", "HEAD"],
    )
    assert config.services["b"].cache is None
    assert (config.cache.max_entries, config.cache.max_bytes) == (500, 8 * 1024 * 1024)
    found = problems(
        "services:\n  a: {cache: {scope: everyone, vary: ['accept language'], ttl: 0s, methods: [POST]}}\n"
    )
    assert any(p.startswith("services.a.cache.scope") for p in found)
    assert any("services.a.cache.vary" in p and "is not a header name" in p for p in found)
    assert any(p.startswith("services.a.cache.ttl") for p in found)
    assert any(p.startswith("services.a.cache.methods") for p in found)
