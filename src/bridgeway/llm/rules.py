"""Rule-based routing: a router name (`model: "auto"`) becomes a model group chosen from what the
request says about itself.

A request describes itself with four signals, from OpenAI's `metadata` object in the body or from
`X-Bridgeway-*` headers (a header wins over the same field in metadata):

    task        metadata.task        X-Bridgeway-Task         e.g. "code", "summarise"
    complexity  metadata.complexity  X-Bridgeway-Complexity   low | medium | high
    tags        metadata.tags        X-Bridgeway-Tags         comma-separated (or a JSON list)
    prefer      metadata.prefer      X-Bridgeway-Prefer       a model group the caller prefers

What is not given is estimated from the prompt, deterministically and cheaply (no tokenizer, no
regex, and a bounded cost whatever the prompt's size: fences and keywords are looked for only in
the first and last 2 KB of the last user message, where instructions sit): complexity from the
prompt's length, fenced code blocks, hard-task keywords and the number of tools; the task is
"code" when that window holds a fenced code block, else unknown.

A router's rules are compiled at load into predicates over frozensets, tried in order: the
first that applies and names a group the caller may use wins; then the default. A preferred
model, when the router honours it and the caller may use it, comes before every rule. The
decision carries a confidence (how much of it rests on estimates) and a reason made only of
config text, so it can go in a response header without echoing the client.

Pure: no I/O and no clock; `Routing.decide` is the whole decision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson

from bridgeway.config.models import Config, RouterConfig, RuleWhen

LEVELS: Final = ("low", "medium", "high")
# Keys of `metadata` that are the gateway's own: taken off before the body goes upstream.
OWN_METADATA: Final = frozenset({"task", "complexity", "tags", "prefer", "cache"})
DEFAULT_OUTPUT_TOKENS: Final = 256  # the answer's length when max_tokens does not bound it
CHARS_PER_TOKEN: Final = 4
_MAX_VALUE = 128  # characters of a task, tag or model name
_MAX_TAGS = 32
_WINDOW = 2048  # characters at each end of the last user message searched for fences and keywords
# Words that mark a request as hard whatever its length.
HARD_WORDS: Final = (
    "step by step",
    "prove",
    "proof",
    "derive",
    "analyze",
    "analyse",
    "architecture",
    "refactor",
    "optimize",
    "optimise",
    "debug",
    "algorithm",
    "trade-off",
    "tradeoff",
    "in depth",
)
# Score boundaries between levels: below LOW_BELOW is low, at or above HIGH_FROM is high.
LOW_BELOW: Final = 0.25
HIGH_FROM: Final = 0.55
_HEADERS: Final = {
    b"x-bridgeway-task": "task",
    b"x-bridgeway-complexity": "complexity",
    b"x-bridgeway-tags": "tags",
    b"x-bridgeway-prefer": "prefer",
}


class BadSignal(ValueError):
    """Routing metadata the gateway cannot read: a 400, with this message."""


@dataclass(frozen=True, slots=True)
class Signals:
    """What a request says about itself, given or estimated."""

    task: str | None
    complexity: str
    tags: frozenset[str]
    prefer: str | None
    task_given: bool
    complexity_given: bool
    score: float  # estimated complexity, 0..1 (also when the level was given)
    prompt_tokens: int  # estimated
    output_tokens: int  # max_tokens, else DEFAULT_OUTPUT_TOKENS
    cache: str | None  # "no-store" or "no-cache" from metadata, else None


@dataclass(frozen=True, slots=True)
class Decision:
    model: str | None  # None: nothing the caller may use
    confidence: float
    reason: str


# -- estimates -----------------------------------------------------------------------------------


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text ones count
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate(messages: object, tools: object) -> tuple[float, int, bool]:
    """(complexity score 0..1, prompt characters, whether the prompt holds fenced code)."""
    chars = 0
    last_user = ""
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            text = _text(m.get("content"))
            chars += len(text)
            if m.get("role") == "user":
                last_user = text
    if len(last_user) > 2 * _WINDOW:
        last_user = last_user[:_WINDOW] + "\n" + last_user[-_WINDOW:]
    blocks = last_user.count("```") // 2
    window = last_user.lower()
    hits = sum(1 for word in HARD_WORDS if word in window)
    n_tools = len(tools) if isinstance(tools, list) else 0
    score = (
        0.45 * min(1.0, chars / 8000)
        + 0.20 * min(1.0, blocks / 2)
        + 0.25 * min(1.0, hits / 2)
        + 0.10 * min(1.0, n_tools / 4)
    )
    return score, chars, blocks > 0


def level_of(score: float) -> str:
    return "low" if score < LOW_BELOW else "medium" if score < HIGH_FROM else "high"


def _margin(score: float) -> float:
    """0 on a level boundary, 1 when at least 0.15 away from every boundary."""
    return min(1.0, min(abs(score - LOW_BELOW), abs(score - HIGH_FROM)) / 0.15)


# -- reading a request ------------------------------------------------------------------------------


def _string(field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadSignal(f"routing {field} must be a non-empty string")
    value = value.strip()
    if len(value) > _MAX_VALUE:
        raise BadSignal(f"routing {field} is longer than {_MAX_VALUE} characters")
    return value


def _tags(value: object) -> frozenset[str]:
    if isinstance(value, str):
        if value.lstrip().startswith("["):  # OpenAI metadata values are strings: a JSON list in one
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise BadSignal("routing tags: not a valid JSON list") from None
        else:
            value = [t for t in value.split(",") if t.strip()]
    if not isinstance(value, list) or len(value) > _MAX_TAGS:
        raise BadSignal(f"routing tags must be a list of at most {_MAX_TAGS} strings")
    return frozenset(_string("tags", t) for t in value)


def read_signals(body: dict, headers: list[tuple[bytes, bytes]] = ()) -> Signals:
    """The signals of a chat request (an OpenAI body) and its headers. Raises BadSignal."""
    given: dict[str, object] = {}
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise BadSignal("metadata must be an object")
        for key in OWN_METADATA:
            if key in metadata:
                given[key] = metadata[key]
    for name, value in headers:
        field = _HEADERS.get(name)
        if field is not None:
            given[field] = value.decode("latin-1")
    task = _string("task", given["task"]).lower() if "task" in given else None
    complexity = None
    if "complexity" in given:
        complexity = _string("complexity", given["complexity"]).lower()
        if complexity not in LEVELS:
            raise BadSignal(f"routing complexity must be one of {', '.join(LEVELS)}")
    cache = None
    if "cache" in given:
        cache = _string("cache", given["cache"]).lower()
        if cache not in ("no-store", "no-cache"):
            raise BadSignal("metadata cache must be no-store or no-cache")
    score, chars, code = estimate(body.get("messages"), body.get("tools"))
    n_messages = len(body["messages"]) if isinstance(body.get("messages"), list) else 0
    out = body.get("max_completion_tokens") or body.get("max_tokens")
    return Signals(
        task=task if task is not None else ("code" if code else None),
        complexity=complexity or level_of(score),
        tags=_tags(given["tags"]) if "tags" in given else frozenset(),
        prefer=_string("prefer", given["prefer"]) if "prefer" in given else None,
        task_given=task is not None,
        complexity_given=complexity is not None,
        score=score,
        prompt_tokens=chars // CHARS_PER_TOKEN + 4 * n_messages,
        output_tokens=out if isinstance(out, int) and out > 0 else DEFAULT_OUTPUT_TOKENS,
        cache=cache,
    )


def upstream_body(body: dict) -> dict:
    """The body without the gateway's own metadata keys (OpenAI refuses metadata without
    `store`, and they mean nothing to a provider); the same dict when there are none."""
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or OWN_METADATA.isdisjoint(metadata):
        return body
    rest = {k: v for k, v in metadata.items() if k not in OWN_METADATA}
    out = dict(body)
    if rest:
        out["metadata"] = rest
    else:
        del out["metadata"]
    return out


# -- rules ----------------------------------------------------------------------------------------------


class _Rule:
    __slots__ = ("number", "model", "tasks", "levels", "tags", "label")

    def __init__(self, number: int, when: RuleWhen, model: str):
        self.number = number
        self.model = model
        self.tasks = frozenset(t.lower() for t in when.task) if when.task else None
        self.levels = frozenset(when.complexity) if when.complexity else None
        self.tags = frozenset(when.tags) if when.tags else None
        parts = [
            f"{name}={'|'.join(sorted(values))}"
            for name, values in (("task", self.tasks), ("complexity", self.levels), ("tags", self.tags))
            if values
        ]
        self.label = f"rule {number} ({', '.join(parts)})"

    def applies(self, s: Signals) -> bool:
        return (
            (self.tasks is None or s.task in self.tasks)
            and (self.levels is None or s.complexity in self.levels)
            and (self.tags is None or self.tags <= s.tags)
        )

    def confidence(self, s: Signals) -> float:
        """Near 1 when the rule rests on what the caller said; lower the more it rests on
        estimates, and the closer the estimated score is to a level boundary."""
        confidence = 0.95
        if self.levels is not None and not s.complexity_given:
            confidence = min(confidence, 0.55 + 0.4 * _margin(s.score))
        if self.tasks is not None and not s.task_given:
            confidence = min(confidence, 0.75)
        return round(confidence, 2)


class RuleSet:
    """One router, compiled."""

    __slots__ = ("name", "rules", "default", "prefer")

    def __init__(self, name: str, config: RouterConfig):
        self.name = name
        self.rules = tuple(_Rule(i + 1, r.when, r.model) for i, r in enumerate(config.rules))
        self.default = config.default
        self.prefer = config.prefer

    def decide(self, s: Signals, allowed: Callable[[str], bool]) -> Decision:
        """The group for a request; `allowed(group)` says whether the caller may use it."""
        passed: list[str] = []
        if s.prefer is not None and self.prefer:
            if allowed(s.prefer):
                return Decision(s.prefer, 1.0, f"{self.name}: preferred by the caller -> {s.prefer}")
            passed.append("the preferred model is not granted")
        for rule in self.rules:
            if rule.applies(s):
                if allowed(rule.model):
                    return Decision(
                        rule.model, rule.confidence(s), self._reason(rule.label, rule.model, passed)
                    )
                passed.append(f"{rule.label} -> {rule.model} not granted")
        if allowed(self.default):
            return Decision(self.default, 0.5, self._reason("no rule applied, default", self.default, passed))
        passed.append(f"default {self.default} not granted")
        return Decision(None, 0.0, f"{self.name}: " + "; ".join(passed))

    def _reason(self, why: str, model: str, passed: list[str]) -> str:
        reason = f"{self.name}: {why} -> {model}"
        return reason + (" (passed over: " + "; ".join(passed) + ")" if passed else "")


class Routing:
    """Every router of one config."""

    def __init__(self, config: Config):
        self.routers = {name: RuleSet(name, router) for name, router in config.routing.items()}
        self.groups = frozenset(config.models)

    def decide(self, router: str, s: Signals, allowed: Callable[[str], bool]) -> Decision:
        """Raises BadSignal when the caller prefers a model that does not exist."""
        if s.prefer is not None and s.prefer not in self.groups:
            raise BadSignal("routing prefer names no model group")
        return self.routers[router].decide(s, allowed)
