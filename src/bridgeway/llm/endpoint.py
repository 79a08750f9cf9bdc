"""The OpenAI-compatible endpoint: /v1/chat/completions, /v1/embeddings and /v1/models.

A request is authenticated with the gateway's keys and tokens (a role's `models` grants name the
public models it may use), its `model` picks a model group, and the group's chain of deployments
is tried in order: a retryable failure (429, 5xx, timeout, context window, a broken deployment)
cools the deployment down a step and moves on; a client error (a malformed request) is answered
at once. A stream is only committed once its first content has arrived, so a stream that fails
before its first token falls back like any call; after it, the client gets an error event and
the stream ends cleanly.

Around that, in their own modules: a router name (`model: "auto"`) is resolved to a group by
the rules of `llm/rules.py`, a group with a cache answers repeats from `llm/cache.py`, and every
request ends in `llm/metrics.py`. `X-Bridgeway-Route` tells the whole way: the routing decision
(when a router chose), then the strategy and what was passed over, or `cache hit`.

Bodies are plain dicts through orjson: no pydantic on this path.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson

from bridgeway.config.models import Config
from bridgeway.dataplane.breaker import CircuitBreaker
from bridgeway.dataplane.cache import NO_FLIGHT, ResponseCache
from bridgeway.dataplane.proxy import ClientGone, read_body, stream_response
from bridgeway.errors import STATUS, GatewayError
from bridgeway.llm import metrics as llm_metrics
from bridgeway.llm.cache import MISS, BadDirective, LLMCache, Lookup, directive
from bridgeway.llm.client import ChatStream, Pools, chat, embeddings
from bridgeway.llm.providers import Deployment, ProviderError, StreamBroken
from bridgeway.llm.router import Deployed, ModelGroup, Router
from bridgeway.llm.rules import BadSignal, Decision, Routing, read_signals, upstream_body
from bridgeway.llm.spend import Charge, Spending, SpendPolicy, admit, deployment_prices
from bridgeway.security.access import Access, Principal

MAX_BODY = 16 << 20  # prompts with images are large, but not unbounded
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def compile_router(config: Config, previous: Router | None = None) -> Router:
    """Model groups from config; a deployment kept across a reload keeps what was learnt of it."""
    old: dict[tuple, Deployed] = {}
    if previous is not None:
        old = {_identity(d.deployment): d for g in previous.groups.values() for d in g.deployed}
    groups = {}
    for name, group in config.models.items():
        deployed = []
        for dc in group.deployments:
            deployment = Deployment(
                dc.provider,
                dc.model,
                dc.base_url,
                dc.api_key.get_secret_value() if dc.api_key is not None else None,
            )
            kept = old.get(_identity(deployment))
            if kept is not None and kept.weight == dc.weight and kept.timeout == dc.timeout:
                deployed.append(kept)
                continue
            breaker = CircuitBreaker(failures=group.cooldown.failures, open_for=group.cooldown.open_for)
            deployed.append(Deployed(deployment, dc.weight, dc.timeout, sum(deployment_prices(dc)), breaker))
        groups[name] = ModelGroup(name, group, deployed)
    return Router(groups)


def _identity(d: Deployment) -> tuple:
    return (d.provider, d.model, d.base_url, d.api_key)


class _Ask:
    """One /v1 call on its way: what routing, the cache, the budgets and the metrics know of it."""

    __slots__ = ("model", "body", "headers", "tally", "route", "look", "charge")

    def __init__(
        self, model: str, body: dict, headers: list, tally, route: str, look: Lookup | None, charge: Charge
    ):
        self.model = model  # the model group that serves (after routing)
        self.body = body  # as the providers get it
        self.headers = headers  # trace and rate-limit headers every answer carries
        self.tally = tally
        self.route = route  # the routing decision, when a router name was asked for
        self.look = look  # the cache lookup, when the group caches
        self.charge = charge

    def answered(self, item: Deployed, usage: dict | None) -> None:
        self.tally.usage = usage
        self.charge.answered(item.deployment, usage)


class LLMEndpoint:
    def __init__(
        self, config: Config, previous: LLMEndpoint | None = None, cache: ResponseCache | None = None
    ):
        self.router = compile_router(config, previous.router if previous else None)
        self.pools = previous.pools if previous is not None else Pools()
        self.routing = Routing(config)
        # The data plane's cache (its memory bound and state backend), or one of its own.
        self.cache = previous.cache if previous is not None else LLMCache(cache or ResponseCache())
        self.cached = {name: group.cache for name, group in config.models.items() if group.cache}
        self.policy = SpendPolicy(config)  # prices and budgets of this config
        self.spending: Spending | None = previous.spending if previous is not None else None  # at start-up

    async def close(self) -> None:
        await self.pools.close()

    async def handle(self, scope, receive, send, access: Access, trace_headers: list) -> int:
        """Answer one /v1 request; returns the status. Errors are raised as GatewayError."""
        tally = llm_metrics.Tally()
        try:
            tally.status = await self._handle(scope, receive, send, access, trace_headers, tally)
        except GatewayError as exc:
            tally.status = exc.status
            raise
        except ClientGone:
            tally.status = 499
            raise
        finally:
            if scope["path"] != "/v1/models":
                llm_metrics.finish(tally)
        return tally.status

    async def _handle(self, scope, receive, send, access: Access, trace_headers: list, tally) -> int:
        path, method = scope["path"], scope["method"]
        caller = await self._caller(scope, access)
        if path == "/v1/models":
            if method != "GET":
                raise GatewayError("METHOD_NOT_ALLOWED", "GET /v1/models")
            return await self._models(send, caller, access, trace_headers)
        if path not in ("/v1/chat/completions", "/v1/embeddings"):
            raise GatewayError("NOT_FOUND", f"no route for {path[:200]!r}")
        if method != "POST":
            raise GatewayError("METHOD_NOT_ALLOWED", f"POST {path}")
        try:
            raw = await read_body(receive, MAX_BODY)
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise GatewayError("BAD_REQUEST", f"the body is not valid JSON: {exc.msg}") from None
        if not isinstance(body, dict):
            raise GatewayError("BAD_REQUEST", "the body must be a JSON object")
        model = body.get("model")
        route = ""
        if path == "/v1/chat/completions" and isinstance(model, str) and model in self.routing.routers:
            decision = self.decide(model, body, scope["headers"], caller, access)
            model, route = decision.model, decision.reason
        if not isinstance(model, str) or model not in self.router.groups:
            raise GatewayError("UNKNOWN_MODEL", f"no model named {str(model)[:100]!r}")
        tally.model = model
        if not access.may_use_model(caller, model):
            raise GatewayError("FORBIDDEN", f"this caller may not use model {model!r}")
        look = self._cache_lookup(path, model, body, scope["headers"], caller)
        body = upstream_body(body)
        # Spend and budgets (llm/spend.py): reserve before the chain, settle after it; an answer
        # from the cache settles nothing, so its reservation is released.
        charge = await admit(self.policy, self.spending, scope, caller, access, model, body, len(raw))
        ask = _Ask(model, body, trace_headers + charge.headers, tally, route, look, charge)
        try:
            if path == "/v1/embeddings":
                return await self._embeddings(send, ask)
            return await self._chat(scope, receive, send, ask)
        finally:
            await charge.close()

    # -- routing and caching (llm/rules.py, llm/cache.py) ----------------------------------------

    def decide(self, router: str, body: dict, headers, caller: Principal | None, access: Access) -> Decision:
        """The group a router name stands for, for this caller; raises 400 or 403."""
        if not access.may_use_model(caller, router):
            raise GatewayError("FORBIDDEN", f"this caller may not use model {router!r}")
        try:
            decision = self.routing.decide(
                router, read_signals(body, headers), lambda group: access.may_use_model(caller, group)
            )
        except BadSignal as exc:
            raise GatewayError("BAD_REQUEST", str(exc)) from None
        if decision.model is None:
            raise GatewayError("FORBIDDEN", f"no model this caller may use: {decision.reason}")
        llm_metrics.routed(router, decision.model)
        return decision

    def _cache_lookup(self, path: str, model: str, body: dict, headers, caller) -> Lookup | None:
        config = self.cached.get(model)
        if config is None:
            return None
        try:
            wish = directive(body, headers)
        except BadDirective as exc:
            raise GatewayError("BAD_REQUEST", str(exc)) from None
        return self.cache.lookup(path, model, config, body, wish, caller, llm_metrics.for_model(model))

    async def _cached(self, ask: _Ask, send):
        """A stored answer sent (True), or this request's flight to settle once answered."""
        if ask.look is None:
            return False, NO_FLIGHT
        entry, flight = await self.cache.find(ask.look)
        ask.tally.cache = "miss" if entry is None else "hit"
        if entry is None:
            return False, flight
        route = _joined(ask.route, "cache hit").encode("latin-1", "replace")
        await self.cache.replay(entry, ask.look, send, [*ask.headers, (b"x-bridgeway-route", route)])
        return True, flight

    # -- who ----------------------------------------------------------------------------------

    async def _caller(self, scope, access: Access) -> Principal | None:
        token = None
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                token = value[7:].strip().decode("latin-1")
            elif name == b"x-api-key":  # what Anthropic-style clients send
                token = value.strip().decode("latin-1")
        return await access.identify(token)

    # -- answers ------------------------------------------------------------------------------

    async def _models(self, send, caller: Principal | None, access: Access, trace_headers: list) -> int:
        now = int(time.time())
        data = [
            {"id": name, "object": "model", "created": now, "owned_by": "bridgeway"}
            for name in (*self.router.groups, *self.routing.routers)
            if access.may_use_model(caller, name)
        ]
        await _send_json(send, 200, {"object": "list", "data": data}, trace_headers)
        return 200

    async def _embeddings(self, send, ask: _Ask) -> int:
        async def call(item: Deployed):
            d = item.deployment
            return await embeddings(self.pools.get(d), d, ask.body, ask.model, timeout=item.timeout)

        done, flight = await self._cached(ask, send)
        if done:
            return 200
        try:
            result, item, reason = await self._try_chain(ask.model, call, ask.tally)
            ask.answered(item, result.get("usage"))  # queued; before a client can leave
            headers = _route_headers(item, reason)
            data = orjson.dumps(result)
            if ask.look is not None:
                await self.cache.keep(ask.look, data, headers[:1], flight)
                headers.append(MISS)
            await _send_raw(send, data, ask.headers + headers)
        finally:
            flight.settle(None)  # a no-op once the answer was handed over; else the followers call
        return 200

    async def _chat(self, scope, receive, send, ask: _Ask) -> int:
        stream = ask.body.get("stream") is True

        async def call(item: Deployed):
            d = item.deployment
            return await chat(self.pools.get(d), d, ask.body, ask.model, stream, timeout=item.timeout)

        done, flight = await self._cached(ask, send)
        if done:
            return 200
        try:
            result, item, reason = await self._try_chain(ask.model, call, ask.tally, hold=stream)
            headers = _route_headers(item, _joined(ask.route, reason))
            if ask.look is not None:
                headers.append(MISS)
            if not stream:
                ask.answered(item, result.get("usage"))
                data = orjson.dumps(result)
                if ask.look is not None:
                    await self.cache.keep(ask.look, data, headers[:1], flight)
                await _send_raw(send, data, ask.headers + headers)
                return 200
            ask.tally.first_token = time.perf_counter()
            events = _sse(result)
            if ask.look is not None:
                events = self.cache.capture(events, ask.look, headers[:1], flight)
            try:
                await _relay_stream(result, scope, receive, send, ask.headers + headers, events)
            finally:
                item.inflight -= 1
                ask.answered(item, result.usage)  # also when the client left: it was billed
            return 200
        finally:
            flight.settle(None)

    async def _try_chain(self, model: str, call, tally: llm_metrics.Tally, *, hold: bool = False):
        """Each deployment of the chain in turn until one answers. With `hold` the deployment
        stays counted in flight after success (a stream still running); the caller lets go."""
        skipped: list[str] = []
        last: ProviderError | None = None
        for group, item in self.router.chain(model):
            now = time.monotonic()
            ticket = item.admit(now)
            name = f"{item.deployment.provider}/{item.deployment.model}"
            if ticket is None:
                skipped.append(f"{name} cooling down")
                tally.fallbacks.append("COOLING_DOWN")
                continue
            item.inflight += 1
            started = now
            try:
                result = await call(item)
            except ProviderError as exc:
                item.inflight -= 1
                if not exc.retryable:  # the request's own fault: no other deployment does better
                    item.breaker.release(ticket)
                    raise _gateway_error(exc) from None
                item.done(ticket, False, time.monotonic())
                skipped.append(f"{name} {exc.code}")
                tally.fallbacks.append(exc.code if exc.code in STATUS else "UPSTREAM_ERROR")
                last = exc
                continue
            except BaseException:
                item.inflight -= 1
                item.breaker.release(ticket)
                raise
            item.done(ticket, True, time.monotonic(), time.monotonic() - started)
            if not hold:
                item.inflight -= 1
            tally.deployment = name
            reason = group.strategy + (f" in {group.name}" if group.name != model else "")
            if skipped:
                reason += "; after " + ", ".join(skipped)
            return result, item, reason
        if last is None:
            raise GatewayError(
                "NO_DEPLOYMENT",
                f"every deployment of {model!r} is cooling down",
                headers=[(b"retry-after", b"5")],
            )
        raise _gateway_error(last, "; ".join(skipped))


def _gateway_error(exc: ProviderError, tried: str = "") -> GatewayError:
    headers = [(b"retry-after", b"%d" % max(1, round(exc.retry_after)))] if exc.retry_after else None
    message = exc.message + (f" (tried: {tried})" if tried else "")
    code = exc.code if exc.code in STATUS else "UPSTREAM_ERROR"
    return GatewayError(code, message, headers=headers, status=exc.status)


def _route_headers(item: Deployed, reason: str) -> list[tuple[bytes, bytes]]:
    d = item.deployment
    return [
        (b"x-bridgeway-deployment", f"{d.provider}/{d.model}".encode()),
        (b"x-bridgeway-route", reason.encode("latin-1", "replace")),
    ]


def _joined(route: str, reason: str) -> str:
    """One X-Bridgeway-Route value: the routing decision first, when a router made one."""
    return f"{route}; {reason}" if route else reason


async def _send_raw(send, data: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [_JSON, *headers]})
    await send({"type": "http.response.body", "body": data})


async def _send_json(send, status: int, body: object, headers: list) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [_JSON, *headers]})
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


async def _relay_stream(
    stream: ChatStream, scope, receive, send, headers: list, events: AsyncIterator[bytes] | None = None
) -> None:
    """The chunks as SSE events (`events`: `_sse(stream)`, perhaps wrapped), with the proxy's
    streaming (a client that leaves stops the upstream stream)."""
    try:
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE, *headers]})
        await stream_response(events if events is not None else _sse(stream), send, receive)
    finally:
        stream.close()


async def _sse(stream: ChatStream) -> AsyncIterator[bytes]:
    """Events until [DONE]; a failure after the first token becomes an error event and a clean end."""
    try:
        async for chunk in stream:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except StreamBroken as exc:
        error = {"error": {"code": exc.code, "message": exc.message, "type": "stream_error"}}
        yield b"data: " + orjson.dumps(error) + b"\n\n"
        return
    yield b"data: [DONE]\n\n"
