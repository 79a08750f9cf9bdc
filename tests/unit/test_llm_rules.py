"""Rule-based routing as a pure function, the complexity estimate, config validation, and the
LLM cache's request key."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridgeway.config import ConfigError
from bridgeway.config.models import Config
from bridgeway.llm.cache import BadDirective, canonical, directive
from bridgeway.llm.rules import (
    LEVELS,
    BadSignal,
    Routing,
    estimate,
    level_of,
    read_signals,
    upstream_body,
)

DEPLOYMENT = {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}
GROUPS = ("big-chat", "code-chat", "small-chat", "eu-chat")
RULES = [
    {"when": {"task": "code", "complexity": ["high"]}, "model": "big-chat"},
    {"when": {"task": ["code", "review"]}, "model": "code-chat"},
    {"when": {"tags": ["eu", "gdpr"]}, "model": "eu-chat"},
    {"when": {"complexity": "high"}, "model": "big-chat"},
]


def _config(rules=RULES, default="small-chat", **router) -> Config:
    return Config.model_validate(
        {
            "models": {g: {"deployments": [DEPLOYMENT]} for g in GROUPS},
            "routing": {"auto": {"rules": rules, "default": default, **router}},
        }
    )


ROUTING = Routing(_config())


def _body(text="hello", **metadata) -> dict:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
    if metadata:
        body["metadata"] = metadata
    return body


def _decide(body, headers=(), allowed=lambda g: True, routing=ROUTING):
    return routing.decide("auto", read_signals(body, list(headers)), allowed)


def test_the_first_rule_that_applies_wins():
    d = _decide(_body(task="code", complexity="high"))
    assert (d.model, d.confidence) == ("big-chat", 0.95)
    assert d.reason == "auto: rule 1 (task=code, complexity=high) -> big-chat"
    assert _decide(_body(task="review", complexity="low")).model == "code-chat"
    assert _decide(_body(tags="eu, gdpr, x")).model == "eu-chat"
    assert _decide(_body(tags='["eu"]')).model == "small-chat"  # tags: all of the rule's
    d = _decide(_body())
    assert (d.model, d.confidence) == ("small-chat", 0.5)
    assert "no rule applied, default" in d.reason


def test_headers_override_metadata():
    headers = [(b"x-bridgeway-task", b"Code"), (b"x-bridgeway-complexity", b"HIGH")]
    assert _decide(_body(task="chat", complexity="low"), headers).model == "big-chat"
    headers = [(b"x-bridgeway-tags", b"gdpr,eu")]
    assert _decide(_body(), headers).model == "eu-chat"


def test_a_group_the_caller_may_not_use_is_passed_over():
    d = _decide(_body(task="code", complexity="high"), allowed=lambda g: g != "big-chat")
    assert d.model == "code-chat"
    assert "passed over: rule 1 (task=code, complexity=high) -> big-chat not granted" in d.reason
    d = _decide(_body(), allowed=lambda g: False)
    assert d.model is None and "default small-chat not granted" in d.reason


def test_a_preferred_model_comes_first_unless_the_router_ignores_it():
    d = _decide(_body(task="code", prefer="eu-chat"))
    assert (d.model, d.confidence) == ("eu-chat", 1.0)
    assert (
        _decide(_body(task="code", prefer="eu-chat"), allowed=lambda g: g != "eu-chat").model == "code-chat"
    )
    stubborn = Routing(_config(prefer=False))
    assert _decide(_body(task="code", prefer="eu-chat"), routing=stubborn).model == "code-chat"
    with pytest.raises(BadSignal, match="prefer names no model group"):
        _decide(_body(prefer="nope"))


def test_estimated_complexity_routes_with_less_confidence():
    code = "```python\nprint(1)\n```\n```python\nprint(2)\n```"
    hard = "Refactor this algorithm step by step and analyze the trade-off. " + code + "x" * 6000
    d = _decide(_body(hard))
    assert d.model == "big-chat"  # estimated task code and complexity high: rule 1
    assert d.confidence < 0.95
    s = read_signals(_body(hard))
    assert (s.task, s.complexity, s.task_given, s.complexity_given) == ("code", "high", False, False)
    assert read_signals(_body("hi")).complexity == "low"


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"complexity": "extreme"}, "complexity must be one of"),
        ({"task": ""}, "task must be a non-empty string"),
        ({"task": 3}, "task must be a non-empty string"),
        ({"tags": "[not json"}, "not a valid JSON list"),
        ({"tags": ",".join(f"t{i}" for i in range(40))}, "at most 32"),
        ({"prefer": "x" * 300}, "longer than"),
    ],
)
def test_bad_metadata_is_refused_clearly(metadata, message):
    with pytest.raises(BadSignal, match=message):
        read_signals(_body(**metadata))
    with pytest.raises(BadSignal, match="metadata must be an object"):
        read_signals({"messages": [], "metadata": "x"})


def test_the_gateway_keeps_its_own_metadata():
    body = _body(task="code", cache="no-store", trace="abc")
    out = upstream_body(body)
    assert out["metadata"] == {"trace": "abc"} and body["metadata"]["task"] == "code"
    assert "metadata" not in upstream_body(_body(task="code"))
    plain = _body()
    assert upstream_body(plain) is plain


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=300)}
    ),
    max_size=6,
)
metadata = st.fixed_dictionaries(
    {},
    optional={
        "task": st.sampled_from(["code", "review", "chat", "Summarise"]),
        "complexity": st.sampled_from(LEVELS),
        "tags": st.lists(st.sampled_from(["eu", "gdpr", "cheap"]), max_size=3).map(",".join),
        "prefer": st.sampled_from(GROUPS),
    },
)


@given(messages, metadata, st.sets(st.sampled_from(GROUPS)))
def test_decisions_are_deterministic_and_only_name_granted_groups(msgs, meta, granted):
    body = {"model": "auto", "messages": msgs, "metadata": meta}
    first = _decide(body, allowed=granted.__contains__)
    assert first == _decide(body, allowed=granted.__contains__)
    assert first.model is None or first.model in granted
    assert (first.model is None) == (not _any_reachable(body, granted))
    assert 0.0 <= first.confidence <= 1.0


def _any_reachable(body, granted) -> bool:
    """Some group the router could have chosen is granted (the default always can be)."""
    s = read_signals(body)
    candidates = {"small-chat"} | {r.model for r in ROUTING.routers["auto"].rules if r.applies(s)}
    if s.prefer is not None:
        candidates.add(s.prefer)
    return bool(candidates & granted)


@given(st.text(max_size=2000), st.text(max_size=2000))
def test_a_longer_prompt_is_never_estimated_simpler(a, b):
    short = [{"role": "user", "content": a}]
    longer = [{"role": "system", "content": b}, {"role": "user", "content": a}]
    assert estimate(longer, None)[0] >= estimate(short, None)[0]
    assert level_of(estimate(short, None)[0]) in LEVELS


def test_the_estimate_is_cheap():
    body = _body("Please refactor this. " + "word " * 4000 + "```x```")
    read_signals(body)
    started = time.perf_counter()
    for _ in range(1000):
        ROUTING.decide("auto", read_signals(body), lambda g: True)
    per_call = (time.perf_counter() - started) / 1000
    assert per_call < 1e-3, per_call  # microseconds in practice; generous for a loaded machine


@pytest.mark.parametrize(
    "routing, problem",
    [
        ({"auto": {"default": "nope"}}, "routing.auto.default: no model group named 'nope'"),
        (
            {"auto": {"default": "small-chat", "rules": [{"when": {"task": "x"}, "model": "nope"}]}},
            "routing.auto.rules.0.model: no model group named 'nope'",
        ),
        ({"big-chat": {"default": "small-chat"}}, "routing.big-chat: the name is already a model group's"),
        (
            {"auto": {"default": "small-chat", "rules": [{"when": {}, "model": "big-chat"}]}},
            "at least one of",
        ),
        (
            {
                "auto": {
                    "default": "small-chat",
                    "rules": [{"when": {"complexity": "huge"}, "model": "big-chat"}],
                }
            },
            "complexity",
        ),
        (
            {
                "auto": {
                    "default": "small-chat",
                    "rules": [{"when": {"task": "x", "size": 1}, "model": "big-chat"}],
                }
            },
            "size",
        ),
    ],
)
def test_routing_config_errors_are_precise(tmp_path, routing, problem):
    import yaml

    from bridgeway.config import load_config

    path = tmp_path / "bridgeway.yaml"
    models = {g: {"deployments": [DEPLOYMENT]} for g in GROUPS}
    path.write_text(yaml.safe_dump({"models": models, "routing": routing}))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert problem in "\n".join(err.value.problems)


def test_the_cache_key_ignores_what_does_not_change_the_answer():
    a = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": 1, "user": "u1"}
    b = {
        "temperature": 1.0,
        "messages": [{"content": "hi", "role": "user"}],
        "stream": True,
        "metadata": {"k": "v"},
    }
    assert canonical(a) == canonical(b)
    assert canonical(a) != canonical({**a, "temperature": 0.5})
    assert canonical(a) != canonical({**a, "unknown_param": 1})  # unknown fields stay in the key


def test_cache_directives():
    body = {"messages": []}
    assert directive(body, [(b"cache-control", b"no-store")]) == "no-store"
    assert directive(body, [(b"cache-control", b"max-age=0")]) == "no-cache"
    assert directive(body, [(b"pragma", b"no-cache")]) == "no-cache"
    assert directive({"metadata": {"cache": "no-cache"}}, []) == "no-cache"
    assert directive(body, []) is None
    with pytest.raises(BadDirective):
        directive({"metadata": {"cache": "sometimes"}}, [])
