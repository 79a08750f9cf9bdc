"""LLM budgets: the arithmetic, pure (the clock is passed in). The stores in `llm/ledger.py` apply
these rules atomically; `Ledger` here is the reference they are tested against (and the store of
`memory://`).

Money is counted in integer nano-USD (1e-9 USD) so that sums are exact in SQLite, in Redis
(HINCRBY) and in Lua's doubles (exact below 2**53, i.e. nine million USD per counter).

A budget belongs to a scope: a caller (`key:<id>`, `jwt:<issuer>#<subject>`, `client:<name>`
for the gateway's own tokens) or a team (`team:<client>`: every key of a client of the clients
table). Its window is counted in UTC days: `1d` is today, `7d` and `30d` are today and the 6 or
29 days before, `total` is all time. Spend is recorded per scope and day, whatever budgets exist,
so a budget added later sees the spend so far.

Reserve and settle:

    before the call   for every budget of the caller: spent(window) + held(scope) + estimate
                      must stay within the limit, else 429 BUDGET_EXCEEDED; if all pass, the
                      estimate is held in every scope until `expires_at` (all or nothing)
    after the call    the hold is dropped and the real cost is added to the day's spend

So concurrent requests can never commit more than the limit between them; a request can only
overspend by what its real cost exceeds its own estimate (estimates are generous: input from
the request's size, output from max_tokens). A hold that is never settled (the gateway died)
stops counting when it expires.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from bridgeway.errors import GatewayError

NANO = 1_000_000_000  # nano-USD per USD
DAY = 86400
PERIOD_DAYS = {"1d": 1, "7d": 7, "30d": 30, "total": 0}  # 0: all time
BYTES_PER_TOKEN = 3  # generous: English runs near 4 bytes a token, JSON framing counts too

_BUDGET_TEXT = re.compile(
    r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmKM]?)\s*(usd|\$|tokens?)\s*/\s*(1d|7d|30d|total)\s*", re.IGNORECASE
)


def parse_budget(text: str) -> dict:
    """`5usd/1d`, `0.5$/7d`, `2000000tokens/30d`, `2M tokens/total` -> the config's object form."""
    m = _BUDGET_TEXT.fullmatch(text)
    if m is None:
        raise ValueError(f'"{text}" is not a budget (expected e.g. "5usd/1d" or "2000000tokens/30d")')
    amount = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    kind = "usd" if m.group(3).lower() in ("usd", "$") else "tokens"
    return {"period": m.group(4).lower(), kind: amount if kind == "usd" else int(amount)}


def format_budget(budget: dict) -> str:
    parts = []
    if budget.get("usd") is not None:
        parts.append(f"{budget['usd']:g}usd/{budget['period']}")
    if budget.get("tokens") is not None:
        parts.append(f"{budget['tokens']}tokens/{budget['period']}")
    return " ".join(parts)


def day_of(now: float) -> int:
    """UTC days since the epoch."""
    return int(now // DAY)


def first_day(days: int, today: int) -> int:
    """The first day of a window of `days` ending today (0 days: all time)."""
    return today - days + 1 if days else 0


def until_midnight(now: float) -> int:
    """Whole seconds until the next UTC day, when every window moves on."""
    return max(1, math.ceil(DAY - now % DAY))


def cost_nano(tokens_in: int, tokens_out: int, prices: tuple[float, float]) -> int:
    """The cost of a call in nano-USD, rounded up; prices are USD per 1M tokens."""
    # USD per 1M tokens x 1e9 nano / 1e6 tokens = 1000 nano-USD per token per unit of price
    return math.ceil(tokens_in * prices[0] * 1000 + tokens_out * prices[1] * 1000 - 1e-6)


def estimate_tokens(body: dict, size: int, default_output: int) -> tuple[int, int]:
    """(input, output) tokens a request may use at most, before it is made: the input from the
    body's size in bytes, the output from its own cap or the configured default."""
    out = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(out, int) or isinstance(out, bool) or out < 0:
        out = default_output if "messages" in body else 0  # embeddings produce no output tokens
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        out *= n
    return math.ceil(size / BYTES_PER_TOKEN), out


@dataclass(frozen=True, slots=True)
class Limit:
    """One budget of one scope, compiled: limits in nano-USD and tokens (None: not limited)."""

    scope: str
    period: str
    nano: int | None
    tokens: int | None

    @property
    def days(self) -> int:
        return PERIOD_DAYS[self.period]

    def exceeded_by(self, spent: tuple[int, int], held: tuple[int, int], estimate: tuple[int, int]) -> bool:
        """Whether holding `estimate` on top of what is spent and held would pass the limit."""
        if self.nano is not None and spent[0] + held[0] + estimate[0] > self.nano:
            return True
        return self.tokens is not None and spent[1] + held[1] + estimate[1] > self.tokens

    def describe(self) -> str:
        parts = []
        if self.nano is not None:
            parts.append(f"{self.nano / NANO:g} USD")
        if self.tokens is not None:
            parts.append(f"{self.tokens} tokens")
        window = "in all" if self.period == "total" else f"per {self.period}"
        return f"{' / '.join(parts)} {window}"


def limits_of(scope: str, budgets) -> list[Limit]:
    """Config budgets (objects or dicts) -> Limits of one scope."""
    out = []
    for b in budgets:
        get = b.get if isinstance(b, dict) else lambda name, b=b: getattr(b, name)
        usd, tokens = get("usd"), get("tokens")
        out.append(Limit(scope, get("period"), round(usd * NANO) if usd is not None else None, tokens))
    return out


def refusal(limit: Limit, now: float) -> GatewayError:
    """429 BUDGET_EXCEEDED; Retry-After when the window moves on (none for `total`)."""
    headers = None if limit.period == "total" else [(b"retry-after", b"%d" % until_midnight(now))]
    who = limit.scope.partition(":")
    return GatewayError(
        "BUDGET_EXCEEDED", f"the budget of {who[0]} {who[2]!r} ({limit.describe()}) is spent", headers=headers
    )


@dataclass(slots=True)
class Hold:
    """What one request reserved: its estimate, in every scope that has budgets."""

    id: str
    scopes: tuple[str, ...]
    nano: int
    tokens: int
    expires_at: float


@dataclass(slots=True)
class Ledger:
    """Spend per scope and day plus the holds in force: the rules above on plain dicts.

    `reserve` and `settle` are each one atomic step (no await inside), so in one process this is
    also a correct store."""

    spent: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (scope, day) -> [nano, tokens]
    holds: dict[str, Hold] = field(default_factory=dict)

    def reserve(self, limits: list[Limit], hold: Hold, now: float) -> Limit | None:
        """Hold `hold`'s estimate in its scopes unless a limit would pass; returns the first
        limit that refused (and holds nothing then)."""
        self.expire(now)
        today = day_of(now)
        estimate = (hold.nano, hold.tokens)
        for limit in limits:
            if limit.exceeded_by(
                self.spent_in(limit.scope, limit.days, today), self.held(limit.scope), estimate
            ):
                return limit
        self.holds[hold.id] = hold
        return None

    def settle(
        self, hold_id: str | None, scopes: tuple[str, ...], nano: int, tokens: int, now: float
    ) -> None:
        """Drop the hold (if still there) and add the real cost to today's spend of each scope."""
        if hold_id is not None:
            self.holds.pop(hold_id, None)
        today = day_of(now)
        for scope in scopes:
            row = self.spent.setdefault((scope, today), [0, 0])
            row[0] += nano
            row[1] += tokens

    def expire(self, now: float) -> None:
        for hold_id in [h.id for h in self.holds.values() if h.expires_at <= now]:
            del self.holds[hold_id]

    def spent_in(self, scope: str, days: int, today: int) -> tuple[int, int]:
        start = first_day(days, today)
        nano = tokens = 0
        for (s, day), (n, t) in self.spent.items():
            if s == scope and start <= day <= today:
                nano += n
                tokens += t
        return nano, tokens

    def held(self, scope: str) -> tuple[int, int]:
        nano = tokens = 0
        for h in self.holds.values():
            if scope in h.scopes:
                nano += h.nano
                tokens += h.tokens
        return nano, tokens
