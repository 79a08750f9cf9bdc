"""What an LLM call costs and who pays: the endpoint's two calls, `admit` before the chain and
`Charge.answered` / `Charge.close` after it.

    charge = await admit(endpoint.policy, endpoint.spending, scope, caller, access, model, body, size)
    try:
        ... call the chain; on success: charge.answered(deployment, usage)
    finally:
        await charge.close()

`admit` draws the caller's client rate limits (as /bridge does; a client limit with
`service: /v1` applies to LLM calls only) and reserves the estimate against every budget of the
caller (its key's own, else its role's) and of its team (its client's). A refusal is 429. The
hold costs one state round trip before the call, and only for callers that have budgets.

After the call nothing waits for the state backend: the settlement (the hold dropped, the real
cost recorded) goes on a queue that a writer task drains in batches. A batch that fails is
retried; one that still fails is counted (`bridgeway_llm_spend_write_failures`) and logged,
never dropped silently, and its holds expire by themselves.

Cost comes from the provider's own usage counts (for streams, the final usage event, which the
providers are asked for); when a call was answered but its count was lost (the client left
mid-stream, the stream broke), the estimate is charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time

from bridgeway.config.models import Config, LLMDeploymentConfig
from bridgeway.errors import GatewayError
from bridgeway.llm import metrics as llm_metrics
from bridgeway.llm.budgets import Hold, Limit, cost_nano, day_of, estimate_tokens, limits_of, refusal
from bridgeway.llm.ledger import LedgerStore, LedgerUnavailable, Settlement, SpendRow
from bridgeway.llm.prices import price_of
from bridgeway.llm.providers import Deployment, tokens
from bridgeway.observability.logs import get_logger
from bridgeway.security.access import Access, Principal
from bridgeway.security.budgets import Held
from bridgeway.security.limits import ratelimit_headers

log = get_logger("bridgeway.spend")
LLM_SERVICE = "/v1"  # the `service` client limits name to apply to LLM calls only
BATCH = 200  # settlements written in one transaction / one pipelined burst
RETRIES = 3
LIMITS_CACHED = 10_000  # callers whose compiled budgets are kept


def deployment_prices(dc: LLMDeploymentConfig) -> tuple[float, float]:
    """USD per 1M (input, output) tokens: the deployment's own, else the price table's."""
    default = price_of(dc.model)
    return (
        dc.input_per_1m if dc.input_per_1m is not None else default[0],
        dc.output_per_1m if dc.output_per_1m is not None else default[1],
    )


def _identity(provider: str, model: str, base_url: str) -> tuple[str, str, str]:
    return provider, model, Deployment(provider, model, base_url).base_url  # the default URL filled in


class SpendPolicy:
    """Compiled from one config: prices, the estimate of each public model, the budgets."""

    def __init__(self, config: Config):
        self.default_output = config.spend.default_output_tokens
        self.hold_for = config.spend.hold_for
        self.prices: dict[tuple[str, str, str], tuple[float, float]] = {}
        for group in config.models.values():
            for dc in group.deployments:
                self.prices[_identity(dc.provider, dc.model, dc.base_url)] = deployment_prices(dc)
        # An estimate must cover whichever deployment of the chain answers: the dearest one.
        self.estimate_prices: dict[str, tuple[float, float]] = {}
        for name, group in config.models.items():
            chain = [dc for g in (name, *group.fallbacks) for dc in config.models[g].deployments]
            prices = [deployment_prices(dc) for dc in chain]
            self.estimate_prices[name] = (max(p[0] for p in prices), max(p[1] for p in prices))
        self.role_budgets = {name: role.budgets for name, role in config.roles.items() if role.budgets}
        self.team_limits = {
            name: limits_of(f"team:{name}", c.budgets) for name, c in config.clients.items() if c.budgets
        }
        self._limits: dict[str, tuple[Principal, list[Limit]]] = {}

    def price(self, d: Deployment) -> tuple[float, float]:
        found = self.prices.get((d.provider, d.model, d.base_url))
        return found if found is not None else price_of(d.model)

    def limits(self, caller: Principal | None) -> list[Limit]:
        """The caller's budgets compiled once per caller, until its principal changes (a key's
        budgets edited: the principal compares unequal, so they compile afresh)."""
        if caller is None:
            return []
        cached = self._limits.get(caller.id)
        if cached is not None and (cached[0] is caller or cached[0] == caller):
            return cached[1]
        own = caller.budgets or self.role_budgets.get(caller.role, ())
        out = limits_of(caller.id, own) if own else []
        if caller.client is not None:
            out += self.team_limits.get(caller.client, ())
        if len(self._limits) >= LIMITS_CACHED:
            self._limits.clear()  # callers seen once (JWT subjects) must not grow it forever
        self._limits[caller.id] = (caller, out)
        return out


class Spending:
    """One worker's side of the ledger: reserves, and the queue of settlements to write.

    Hold ids need to be unique across every worker and replica sharing the ledger, not secret:
    a random prefix per `Spending` (one per worker process) and a counter, no `os.urandom` per
    request."""

    def __init__(self, store: LedgerStore, clock=time.time):
        self.store = store
        self.clock = clock
        self._queue: list[Settlement] = []
        self._wake: asyncio.Future | None = None  # the writer's, while it waits for work
        self._writer: asyncio.Task | None = None
        self._writing = False
        self._id_prefix = secrets.token_hex(8) + "-"
        self._ids = itertools.count()

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_forever())

    async def reserve(self, limits: list[Limit], nano: int, tokens_: int, hold_for: float) -> Hold:
        scopes = tuple(dict.fromkeys(limit.scope for limit in limits))
        hold = Hold(f"{self._id_prefix}{next(self._ids):x}", scopes, nano, tokens_, self.clock() + hold_for)
        try:
            refused = await self.store.reserve(limits, hold)
        except LedgerUnavailable as exc:
            llm_metrics.SPEND.store_unavailable += 1
            log.error("budget_store_unavailable", error=str(exc))
            raise GatewayError(
                "BUDGET_UNAVAILABLE", "budgets cannot be checked right now", headers=[(b"retry-after", b"1")]
            ) from None
        if refused is not None:
            llm_metrics.SPEND.refusals += 1
            raise refusal(refused, self.clock())
        return hold

    def settle(self, settlement: Settlement) -> None:
        """Queue it; never waits."""
        self._queue.append(settlement)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _write_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
            batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            self._writing = True
            try:
                await self._write(batch)
            finally:
                self._writing = False

    async def _write(self, batch: list[Settlement]) -> None:
        for attempt in range(RETRIES):
            try:
                await self.store.settle(batch)
                return
            except LedgerUnavailable as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the writer
                error = repr(exc)
            await asyncio.sleep(0.1 * 2**attempt)
        answered = sum(1 for s in batch if s.answered)
        llm_metrics.SPEND.write_failures += answered
        log.error("spend_not_recorded", settlements=len(batch), answered=answered, error=error)

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        while self._queue:
            batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            await self._write(batch)
        await self.store.close()

    async def flush(self) -> None:
        """Until the queue is written (tests, and the spend query: it reports what is settled)."""
        while self._queue or self._writing:
            await asyncio.sleep(0.005)

    async def report(self, first: int, last: int) -> list[SpendRow]:
        return await self.store.rows(first, last)


class Charge:
    """One request's account: the hold it took, and the limiter slots it holds."""

    __slots__ = (
        "spending",
        "policy",
        "caller",
        "team",
        "model",
        "hold",
        "estimate",
        "held",
        "headers",
        "done",
    )

    def __init__(self, spending, policy, caller, model, hold, estimate, held, headers):
        self.spending: Spending | None = spending
        self.policy: SpendPolicy = policy
        self.caller = caller.id if caller is not None else "-"
        self.team = caller.client if caller is not None and caller.client else "-"
        self.model = model
        self.hold: Hold | None = hold
        self.estimate: tuple[int, int] = estimate  # (input, output) tokens
        self.held: Held = held
        self.headers: list = headers  # RateLimit headers of the tightest client rate
        self.done = False

    def answered(self, d: Deployment, usage: dict | None) -> None:
        """The call was answered by `d`: record its cost (the estimate when usage is unknown)."""
        if self.done:
            return
        self.done = True
        tokens_in, tokens_out = tokens(usage) if usage else self.estimate
        nano = cost_nano(tokens_in, tokens_out, self.policy.price(d))
        spent = llm_metrics.SPEND.nano
        spent[self.model] = spent.get(self.model, 0) + nano
        if self.spending is None:
            return
        scopes = (self.caller, f"team:{self.team}") if self.team != "-" else (self.caller,)
        self.spending.settle(
            Settlement(
                self.hold, True, scopes, self.caller, self.team, self.model,
                f"{d.provider}/{d.model}", tokens_in, tokens_out, nano,
            )
        )  # fmt: skip

    async def close(self) -> None:
        """The request is over: a hold that was not settled (the call failed) is released."""
        if not self.done:
            self.done = True
            if self.hold is not None and self.spending is not None:
                self.spending.settle(Settlement(self.hold, False))
        if self.held.slots:
            await self.held.release()


async def admit(
    policy: SpendPolicy,
    spending: Spending | None,
    scope: dict,
    caller: Principal | None,
    access: Access,
    model: str,
    body: dict,
    size: int,
) -> Charge:
    """Draw the caller's client limits and reserve its budgets; raises 429 when one is spent."""
    held = Held()
    headers: list = []
    try:
        budgets = access.client_budgets.get(caller.client) if caller is not None and caller.client else None
        if budgets is not None:
            client = scope.get("client")
            tightest = await budgets.draw(
                LLM_SERVICE,
                scope["path"].encode("latin-1"),
                client[0] if client else "",
                caller.id,
                llm_metrics.SPEND,
                held,
            )
            headers = ratelimit_headers(*tightest) if tightest else []
        estimate = estimate_tokens(body, size, policy.default_output)
        hold = None
        limits = policy.limits(caller)
        if limits and spending is not None:
            prices = policy.estimate_prices.get(model, (0.0, 0.0))
            nano = cost_nano(estimate[0], estimate[1], prices)
            hold = await spending.reserve(limits, nano, estimate[0] + estimate[1], policy.hold_for)
    except BaseException:
        if held.slots:
            await held.release()
        raise
    return Charge(spending, policy, caller, model, hold, estimate, held, headers)


def summarise(rows: list[SpendRow], group_by: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """Totals of `rows`, and the rows summed per value of the `group_by` columns."""
    totals = SpendRow(0, "", "", "", "")
    groups: dict[tuple, SpendRow] = {}
    for r in rows:
        totals.add(r.requests, r.tokens_in, r.tokens_out, r.nano)
        key = tuple(getattr(r, c) for c in group_by)
        g = groups.get(key)
        if g is None:
            g = groups[key] = SpendRow(0, "", "", "", "")
        g.add(r.requests, r.tokens_in, r.tokens_out, r.nano)

    def sums(r: SpendRow) -> dict:
        return {
            "requests": r.requests,
            "tokens_in": r.tokens_in,
            "tokens_out": r.tokens_out,
            "usd": round(r.nano / 1e9, 9),
        }

    out = [{**dict(zip(group_by, key, strict=True)), **sums(g)} for key, g in sorted(groups.items())]
    return sums(totals), out


def today() -> int:
    return day_of(time.time())
