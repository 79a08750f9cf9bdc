"""The /bridge/{service}/{path} pipeline: request in, one upstream chosen, response streamed back.

Per request: parse the path, filter headers, authenticate, authorise and draw from the limits,
consult the route's response cache when it has one, read or stream the body, then try instances
(balancer -> breaker -> pooled call), retrying only where it is safe and the budget allows,
and stream the answer back. Everything configurable was compiled into the `Service` already.

On the gateway's own server the common request (no body, checks that answer at once, an idle
upstream connection, a whole answer) is served by callbacks alone (`proxy_now`): no task and no
coroutine, which cost about a twentieth of a request's instructions. Anything else, or anything
that goes wrong, continues in the coroutines below (`_forward`, `call_upstream`), the one place
where retries, streaming and errors are handled.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import AsyncIterator, Coroutine

from bridgeway.dataplane.cache import MISS, Flight, Lookup, RouteCache
from bridgeway.dataplane.instance import Instance
from bridgeway.dataplane.retry import backoff, is_retryable
from bridgeway.dataplane.service import Service
from bridgeway.dataplane.upstream import Sent, UpstreamClosed, UpstreamError, UpstreamResponse
from bridgeway.errors import GatewayError
from bridgeway.observability.tracing import new_trace_id, parse_traceparent
from bridgeway.security.access import UNKNOWN, Access, Principal
from bridgeway.security.budgets import Budgets, Held, Tightest
from bridgeway.security.limits import ratelimit_headers
from bridgeway.serving.http import RESPOND, failing

# RFC 9110 7.6.1: hop-by-hop headers end at the gateway.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Not relayed from an upstream's answer: hop-by-hop headers, and its Server (the gateway answers
# as itself, as nginx and Envoy do). Its Date is kept: the origin's time, which the server then
# writes instead of its own, and which a cached answer keeps beside its Age (RFC 9111 4).
NOT_RELAYED = HOP_BY_HOP | {b"server"}
BRIDGE = "/bridge/"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
NO_EXTENSIONS: dict = {}  # a scope from a server that offers none (`RESPOND` is ours)
# Small bodies are read whole: they can be retried and go upstream in one write.
BUFFER_LIMIT = 1 << 20

_BAD_PATH = re.compile(rb"%(?![0-9A-Fa-f]{2})|(?:^|/)(?:\.|%2[eE]){2}(?:/|$)|[\x00-\x20\x7f]|#")
# Byte values, not one-byte strings: `b"%" in path` first tries the operand as an integer, fails,
# and builds a TypeError message it then drops (~2k instructions, three times per request).
_PERCENT, _DOT, _HASH = b"%.#"
_HOST = re.compile(rb"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]{1,255}")
# The request headers the head pass acts on; every other header is forwarded as it is.
_NOTED = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"traceparent",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-request-id",
    b"authorization",
    b"x-api-key",
}


class Call:
    """One request's facts, gathered in a single pass over its head."""

    __slots__ = (
        "target",
        "headers",
        "content_length",
        "chunked",
        "request_id",
        "trace_id",
        "trace_flags",
        "credential",
    )

    def __init__(self) -> None:
        self.target = b"/"
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.request_id: bytes | None = None
        self.trace_id = ""
        self.trace_flags = "01"
        self.credential: str | None = None  # a Bridgeway API key: consumed here, never forwarded


def parse_target(scope: dict, prefix_len: int) -> bytes:
    """The upstream path and query: what follows /bridge/{service}, checked for escapes."""
    raw = scope.get("raw_path") or scope["path"].encode()
    rest = raw[prefix_len:] or b"/"
    # The HTTP parser already refused spaces and control characters; the regex runs only when
    # a path holds what could hide an escape.
    if rest[0] != 47 or ((_PERCENT in rest or _DOT in rest or _HASH in rest) and _BAD_PATH.search(rest)):
        raise GatewayError("BAD_PATH", "the path is malformed or tries to leave the service")
    query = scope.get("query_string")
    return rest + b"?" + query if query else rest


def read_head(scope: dict, call: Call) -> None:
    """One pass over the client's headers: note the facts, keep what goes upstream, continue or
    start the trace, and add the X-Forwarded-* set."""
    out = call.headers
    lengths = []
    host = xff = parent = None
    hosts = 0
    connection = None
    for item in scope["headers"]:
        name = item[0]
        if name not in _NOTED:
            out.append(item)
        elif name == b"host":
            hosts += 1
            host = item[1]
        # the credential next: every secured request has one, the rest are rare
        elif name == b"authorization":
            value = item[1]
            scheme = value[:10].lower()
            if scheme == b"bearer bw_":
                call.credential = value[7:].strip().decode("latin-1")  # a gateway key: consumed
            else:
                if scheme == b"bearer eyj":  # a JWT: checked here, and passed on
                    call.credential = value[7:].strip().decode("latin-1")
                out.append(item)
        elif name == b"content-length":
            lengths.append(item[1])
        elif name == b"transfer-encoding":
            call.chunked = True
        elif name == b"traceparent":
            parent = item[1]
        elif name == b"x-forwarded-for":
            xff = item[1]
        elif name == b"x-request-id":
            call.request_id = item[1]
            out.append(item)
        elif name == b"connection":
            connection = item[1]
        elif name == b"x-api-key":
            if item[1].startswith(b"bw_"):
                call.credential = item[1].strip().decode("latin-1")
            else:
                out.append(item)
    traced = parse_traceparent(parent) if parent is not None else None
    if traced:
        call.trace_id, call.trace_flags = traced
    else:
        call.trace_id = new_trace_id()
    # RFC 9112 3.2: exactly one valid Host in HTTP/1.1, else 400.
    if hosts > 1 or (hosts == 0 and scope.get("http_version") == "1.1"):
        raise GatewayError("BAD_REQUEST", "an HTTP/1.1 request needs exactly one Host header")
    if host is not None and not _HOST.fullmatch(host):
        raise GatewayError("BAD_REQUEST", "malformed Host header")
    if connection is not None:
        # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
        named = {token.strip().lower() for token in connection.split(b",")}
        call.headers = out = [item for item in out if item[0] not in named]
    if lengths:
        if any(not v.isdigit() for v in lengths) or len(set(lengths)) > 1 or call.chunked:
            raise GatewayError("BAD_REQUEST", "invalid or conflicting Content-Length")
        call.content_length = int(lengths[0])
    client = scope.get("client")
    addr = client[0].encode() if client else b""
    out.append((b"x-forwarded-for", xff + b", " + addr if xff else addr))
    out.append((b"x-forwarded-proto", b"https" if scope.get("scheme") == "https" else b"http"))
    if host:
        out.append((b"x-forwarded-host", host))


async def read_body(receive, limit: int) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError("BODY_TOO_LARGE", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def stream_body(receive, limit: int) -> AsyncIterator[bytes]:
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError("BODY_TOO_LARGE", f"request body exceeds {limit} bytes")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class ClientGone(Exception):
    """The client disconnected; nothing more to send."""


class StreamCut(Exception):
    """The upstream failed after the response had started: the client's stream is cut short
    (returning without the final body message makes the server close the connection)."""

    def __init__(self, status: int, code: str):
        super().__init__(code)
        self.status = status
        self.code = code


def response_headers(resp: UpstreamResponse, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers, lowercased, without those `NOT_RELAYED`, plus the gateway's own."""
    out = []
    connection = None
    for name, value in resp.headers:
        name = name.lower()
        if name not in NOT_RELAYED:
            out.append((name, value))
        elif name == b"connection":
            connection = value
    if connection is not None and connection.lower() not in (b"keep-alive", b"close"):
        named = {token.strip().lower() for token in connection.split(b",")}
        out = [item for item in out if item[0] not in named]
    out.extend(extra)
    return out


async def call_upstream(
    service: Service,
    method: str,
    call: Call,
    body: bytes | AsyncIterator[bytes],
    started: float,
    first: Attempt | None = None,
) -> tuple[UpstreamResponse, Instance]:
    """Try instances until one answers acceptably, within the deadline, retries and budget.
    `first`: the try `proxy_now` began (sent and its head come, or not yet sent for want of an
    idle connection): this call's first."""
    retries = service.retries
    deadline = started + service.timeout
    method_b = method.encode()
    replayable = isinstance(body, bytes)
    tried: list = []
    if first is None:
        service.budget.record_request(started)
    attempt = 0
    while True:
        attempt += 1
        if first is not None:
            inst, ticket, now, sent = first.inst, first.ticket, first.t0, first.sent
            first = None
        else:
            now = time.monotonic()
            inst, ticket = _choose(service, now, tried)
            inst.inflight += 1
            sent = None
        tried.append(inst)
        budget_left = deadline - now
        per_try = service.per_try_timeout
        timeout = min(budget_left, per_try) if per_try else budget_left
        t0 = now
        pool = service.pools[inst.url]
        target = service.base_paths[inst.url] + call.target
        length = call.content_length if not replayable else None
        try:
            if sent is None:
                resp = await pool.request(
                    method_b, target, call.headers, body, read_timeout=timeout, content_length=length
                )
            else:
                try:
                    resp = pool.settle(sent)
                except UpstreamClosed as exc:
                    if not exc.stale:
                        raise
                    # A keep-alive connection the upstream had closed: once more, as `request`
                    # itself does.
                    resp = await pool.request(
                        method_b, target, call.headers, body, read_timeout=timeout, content_length=length
                    )
        except UpstreamError as exc:
            now = time.monotonic()
            inst.inflight -= 1
            service.breaker.record(ticket, False, now)
            inst.outlier.record(False, now)
            service.metrics.upstream_error(exc.code)
            safe = is_retryable(
                method, request_sent=exc.request_sent, retry_non_idempotent=retries.non_idempotent
            )
            if (
                attempt < retries.attempts
                and (replayable or not exc.request_sent)
                and safe
                and await _retry_pause(service, now, deadline, attempt)
            ):
                continue
            raise GatewayError(exc.code, _MESSAGES[exc.code].format(service.name)) from None
        except BaseException:
            inst.inflight -= 1
            service.breaker.release(ticket)
            raise
        now = time.monotonic()
        ok = _observe(service, inst, ticket, resp, t0, now)
        if (
            not ok
            and resp.status in retries.on_status
            and attempt < retries.attempts
            and replayable
            and is_retryable(method, request_sent=True, retry_non_idempotent=retries.non_idempotent)
            and await _retry_pause(service, now, deadline, attempt)
        ):
            inst.inflight -= 1
            resp.release()
            continue
        return resp, inst


def _choose(service: Service, now: float, tried) -> tuple[Instance, object]:
    """The instance for the next try and the breaker's ticket for it; raises when there is none."""
    inst = service.balancer.pick(service.instances, now, tried)
    if inst is None:
        raise GatewayError("NO_HEALTHY_INSTANCE", f"service {service.name!r} has no healthy instance")
    ticket = service.breaker.admit(now)
    if ticket is None:
        wait = str(max(1, math.ceil(service.breaker.retry_after(now)))).encode()
        raise GatewayError(
            "CIRCUIT_OPEN",
            f"service {service.name!r} is failing; its circuit breaker is open",
            headers=[(b"retry-after", wait)],
        )
    return inst, ticket


def _observe(service: Service, inst: Instance, ticket, resp: UpstreamResponse, t0: float, now: float) -> bool:
    """An answer's head came: the breaker, outlier ejection and latency learn of it. True if ok."""
    ok = resp.status < 500
    service.breaker.record(ticket, ok, now)
    inst.outlier.record(ok, now)
    resp.read_timeout = service.body_timeout  # from here on: between body chunks
    inst.observe_latency(now - t0, now)
    service.metrics.upstream.observe(now - t0)
    return ok


async def _retry_pause(service: Service, now: float, deadline: float, attempt: int) -> bool:
    """Wait out the back-off if the deadline and the retry budget allow another try."""
    retries = service.retries
    pause = backoff(attempt - 1, retries.backoff, retries.max_backoff, random.random())
    if now + pause >= deadline or not service.budget.try_spend(now):
        return False
    service.metrics.retries += 1
    if pause > 0:
        await asyncio.sleep(pause)
    return True


_MESSAGES = {
    "UPSTREAM_CONNECT": "could not connect to service {!r}",
    "UPSTREAM_TIMEOUT": "service {!r} did not answer in time",
    "UPSTREAM_PROTOCOL": "service {!r} answered with a malformed response",
    "UPSTREAM_CLOSED": "service {!r} closed the connection before answering",
}


def proxy_http(
    service: Service, scope: dict, receive, send, call: Call, reply_headers: list, access: Access
) -> Coroutine[None, None, int]:
    """Forward one HTTP request to `service`: the coroutine to await, which returns the status
    sent. Errors before the response starts are raised as GatewayError; after it starts, the
    stream is cut. A plain function: a request with nothing to check, draw or look up goes
    straight to `_forward`, one coroutine (and one level to pass on each resume) fewer."""
    call.target = parse_target(scope, len(BRIDGE) + len(service.name))
    if call.credential is None and not access.required and service.limits is None and service.cache is None:
        return _forward(service, scope, receive, send, call, reply_headers)  # (no caller: no budgets)
    return _admitted(service, scope, receive, send, call, reply_headers, access)


async def _admitted(
    service: Service, scope: dict, receive, send, call: Call, reply_headers: list, access: Access
) -> int:
    """`proxy_http` with its checks: authenticate, authorise, draw from the limits, then the
    route's cache or `_forward`."""
    caller = None
    if call.credential is not None or access.required:  # anonymous traffic to open routes skips this
        caller = access.check_now(call.credential, service.name, scope["method"], call.target)
        if caller is UNKNOWN:  # not authenticated within the last second: look the credential up
            caller = await access.check(call.credential, service.name, scope["method"], call.target)
    limits = service.limits
    budgets = _budgets_of(access, caller)
    held = _held_for(limits, budgets)
    try:
        if limits is not None or budgets is not None:
            if _in_process(limits, budgets):
                # The in-process limiter answers at once: no coroutine per request for it.
                _draw_now(service, scope, call, caller, budgets, held, reply_headers)
            else:
                client = scope.get("client")
                ip = client[0] if client else ""
                caller_id = caller.id if caller is not None else None
                tightest = await _draw_budgets(service, call.target, ip, caller_id, budgets, held)
                if tightest is not None:
                    reply_headers += ratelimit_headers(*tightest)
        if service.cache is not None:
            return await _cached(service, scope, receive, send, call, reply_headers, caller)
        return await _forward(service, scope, receive, send, call, reply_headers)
    finally:
        if held is not None and held.slots:
            await held.release()


def _budgets_of(access: Access, caller: Principal | None) -> Budgets | None:
    """The caller's client's own budgets, if it has any."""
    return access.client_budgets.get(caller.client) if caller is not None and caller.client else None


def _in_process(limits, budgets: Budgets | None) -> bool:
    """The limits and budgets all answer at once (`_draw_now`), none over the network."""
    return (limits is None or limits.local) and (budgets is None or budgets.local)


def _held_for(limits: Budgets | None, budgets: Budgets | None) -> Held | None:
    """Where a request keeps the concurrency slots it takes: only where some budget counts them."""
    return (
        Held() if (limits is not None and limits.holds) or (budgets is not None and budgets.holds) else None
    )


def _draw_now(
    service: Service,
    scope: dict,
    call: Call,
    caller: Principal | None,
    budgets,
    held: Held | None,
    reply_headers: list,
) -> None:
    """Draw from the service's limits and the caller's budgets, all in-process; 429 when spent."""
    client = scope.get("client")
    ip = client[0] if client else ""
    caller_id = caller.id if caller is not None else None
    limits = service.limits
    tightest = limits.draw_now(service.name, call.target, ip, caller_id, held) if limits is not None else None
    if budgets is not None:
        tightest = budgets.draw_now(service.name, call.target, ip, caller_id, held, tightest)
    if tightest is not None:
        reply_headers += ratelimit_headers(*tightest)


def proxy_now(
    service: Service, scope: dict, receive, send, call: Call, reply_headers: list, access: Access, request
) -> Coroutine[None, None, int] | None:
    """`proxy_http` on the gateway's own server, without a task or a coroutine for the common
    request: no body, no response cache, checks that answer at once (no credential, or one seen
    within the second; in-process limits) and an idle connection to the chosen instance. Such a
    request is written upstream now and answered from the callback of its response head
    (`Forwarding`), and None is returned. Any other request gets `proxy_http`'s coroutine back;
    a try whose outcome is anything but a whole answer to relay goes on in `_forward`.

    `request` is the gateway's account of the request: `finish(status)` once it is answered,
    `go_on(coroutine)` to have the server run the rest of it as a coroutine."""
    call.target = parse_target(scope, len(BRIDGE) + len(service.name))
    if call.content_length or call.chunked or service.cache is not None:
        return proxy_http(service, scope, receive, send, call, reply_headers, access)
    caller = None
    if call.credential is not None or access.required:
        caller = access.check_now(call.credential, service.name, scope["method"], call.target)
        if caller is UNKNOWN:
            return _admitted(service, scope, receive, send, call, reply_headers, access)
    limits = service.limits
    budgets = None if caller is None else _budgets_of(access, caller)
    drawn = limits is not None or budgets is not None
    if drawn and not _in_process(limits, budgets):
        return _admitted(service, scope, receive, send, call, reply_headers, access)
    held = _held_for(limits, budgets) if drawn else None
    try:
        if drawn:
            _draw_now(service, scope, call, caller, budgets, held, reply_headers)
        return Forwarding(service, scope, receive, send, call, reply_headers, held, request).start()
    except BaseException:
        if held is not None:
            held.release_now()
        raise


class Attempt:
    """A try `proxy_now` began: the instance, the breaker's ticket, the time it went and the
    request on the wire (None: not sent, for want of an idle connection). `call_upstream` takes
    it over when it must."""

    __slots__ = ("inst", "ticket", "t0", "sent")

    def __init__(self, inst: Instance, ticket, t0: float, sent: Sent | None) -> None:
        self.inst = inst
        self.ticket = ticket
        self.t0 = t0
        self.sent = sent


class Forwarding:
    """`proxy_now`'s request from its write upstream to its answer."""

    __slots__ = ("service", "scope", "receive", "send", "call", "reply_headers", "held", "request", "attempt")

    def __init__(
        self, service: Service, scope: dict, receive, send, call: Call, reply_headers: list, held, request
    ) -> None:
        self.service = service
        self.scope = scope
        self.receive = receive
        self.send = send
        self.call = call
        self.reply_headers = reply_headers
        self.held = held
        self.request = request
        self.attempt: Attempt | None = None

    def start(self) -> Coroutine[None, None, int] | None:
        """Send the request on an idle connection (None), or return `_forward` when there is none."""
        service = self.service
        now = time.monotonic()
        inst, ticket = _choose(service, now, ())
        per_try = service.per_try_timeout
        timeout = min(service.timeout, per_try) if per_try else service.timeout
        sent = service.pools[inst.url].send_now(
            self.scope["method"].encode(),
            service.base_paths[inst.url] + self.call.target,
            self.call.headers,
            timeout,
        )
        service.budget.record_request(now)
        inst.inflight += 1
        self.attempt = attempt = Attempt(inst, ticket, now, sent)
        if sent is None:  # a connection to open first: the coroutine does that, to this instance
            return self._rest(attempt)
        sent.head.add_done_callback(self.on_head)
        return None

    def on_head(self, head: asyncio.Future) -> None:
        """The upstream's head (or its failure) came: relay a whole answer now; anything else
        (an error, a status to retry, a streamed body) goes on in `_forward`."""
        service = self.service
        attempt = self.attempt
        if head.cancelled() or head.exception() is not None:
            self.request.go_on(self._rest(attempt))
            return
        resp = head.result()
        retries = service.retries
        if not resp.complete or (retries.attempts > 1 and resp.status in retries.on_status):
            self.request.go_on(self._rest(attempt))
            return
        inst = attempt.inst
        try:
            service.pools[inst.url].settle(attempt.sent)
            _observe(service, inst, attempt.ticket, resp, attempt.t0, time.monotonic())
            headers = response_headers(resp, self.reply_headers)
            self.scope["extensions"][RESPOND](self.send, resp.status, headers, resp.body())
        except Exception as exc:  # a bug: answered (or cut) as the coroutine path would
            self.request.go_on(failing(exc))
            return
        finally:
            inst.inflight -= 1
            resp.release()
            if self.held is not None:
                self.held.release_now()
        self.request.finish(resp.status)

    def _rest(self, first: Attempt) -> Coroutine[None, None, int]:
        """The rest of the request, from `first` on, as `_forward`'s coroutine."""
        step = _forward(
            self.service, self.scope, self.receive, self.send, self.call, self.reply_headers, first=first
        )
        return step if self.held is None else _holding(self.held, step)


async def _holding(held: Held, step: Coroutine[None, None, int]) -> int:
    try:
        return await step
    finally:
        await held.release()


async def _draw_budgets(
    service: Service, target: bytes, ip: str, caller_id: str | None, budgets: Budgets | None, held: Held
) -> Tightest:
    """The draw through the shared limiter (Redis): a round trip per budget."""
    tightest = None
    if service.limits is not None:
        tightest = await service.limits.draw(service.name, target, ip, caller_id, service.metrics, held)
    if budgets is not None:
        tightest = await budgets.draw(service.name, target, ip, caller_id, service.metrics, held, tightest)
    return tightest


async def _forward(
    service: Service,
    scope: dict,
    receive,
    send,
    call: Call,
    reply_headers: list,
    evict: RouteCache | None = None,
    first: Attempt | None = None,
) -> int:
    limit = service.max_body
    length = call.content_length
    body: bytes | AsyncIterator[bytes]
    if first is not None:  # `proxy_now` began it: a request without a body
        body = b""
    elif length is not None:
        if length > limit:
            raise GatewayError("BODY_TOO_LARGE", f"request body of {length} bytes exceeds {limit}")
        body = (
            b""
            if length == 0
            else await read_body(receive, limit)
            if length <= BUFFER_LIMIT
            else stream_body(receive, limit)
        )
    elif call.chunked:
        body = stream_body(receive, limit)
    else:
        body = b""
    started = time.monotonic() if first is None else first.t0
    resp, inst = await call_upstream(service, scope["method"], call, body, started, first)
    try:
        if evict is not None and resp.status < 400:
            await evict.invalidate(call.target)  # before the answer goes out: the next read is fresh
        headers = response_headers(resp, reply_headers)
        if resp.complete:  # `_relay`'s first case, inline: no coroutine for the common answer
            respond = scope.get("extensions", NO_EXTENSIONS).get(RESPOND)
            if respond is not None:  # our server: the whole answer in one call, no messages
                respond(send, resp.status, headers, resp.body())
            else:
                await send({"type": "http.response.start", "status": resp.status, "headers": headers})
                await send({"type": "http.response.body", "body": resp.body()})
        else:
            await _relay(service, resp, inst, send, headers, receive if isinstance(body, bytes) else None)
    finally:
        inst.inflight -= 1
        resp.release()
    return resp.status


async def _relay(
    service: Service, resp: UpstreamResponse, inst: Instance, send, headers: list, receive
) -> None:
    """Send the upstream's answer: in one piece when it is all here, else streamed."""
    start = {"type": "http.response.start", "status": resp.status, "headers": headers}
    if resp.complete:
        await send(start)
        await send({"type": "http.response.body", "body": resp.body()})
    else:
        await send(start)
        try:
            await stream_response(resp, send, receive)
        except UpstreamError as exc:
            inst.outlier.record(False, time.monotonic())
            service.metrics.upstream_error(exc.code)
            raise StreamCut(resp.status, exc.code) from None


async def _cached(
    service: Service, scope: dict, receive, send, call: Call, reply_headers: list, caller: Principal | None
) -> int:
    """`_forward` behind the route's response cache; dataplane/cache.py holds its rules."""
    cache = service.cache
    method = scope["method"]
    look = cache.lookup(method, call.target, call.headers, call.chunked or bool(call.content_length), caller)
    if look is None:  # not a read the cache answers; a write evicts its path's entries
        evict = None if method in SAFE_METHODS else cache
        return await _forward(service, scope, receive, send, call, reply_headers, evict)
    entry, flight = await cache.find(look)
    if entry is not None:
        headers = cache.reply_headers(entry, reply_headers)
        await send({"type": "http.response.start", "status": entry.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if look.head else entry.body})
        return entry.status
    reply_headers.append(MISS)
    try:
        return await _fill(service, receive, send, call, reply_headers, look, flight)
    finally:
        flight.settle(None)  # a no-op once the answer was handed over; else the followers go upstream


async def _fill(
    service: Service, receive, send, call: Call, reply_headers: list, look: Lookup, flight: Flight
) -> int:
    """A miss goes upstream: a GET answer is stored when it may be, and sent either way."""
    cache = service.cache
    resp, inst = await call_upstream(service, "HEAD" if look.head else "GET", call, b"", time.monotonic())
    try:
        # The gateway's X-Cache replaces one the upstream may send about a cache of its own.
        headers = [item for item in response_headers(resp, []) if item[0] != b"x-cache"]
        fresh = None if look.head else cache.storable(resp.status, headers, resp.complete, look)
        if fresh is None:
            flight.settle(None)  # at the head already: a long stream does not hold the followers
            await _relay(service, resp, inst, send, headers + reply_headers, receive)
            return resp.status
        try:
            data = await resp.read()
        except UpstreamError as exc:  # nothing was sent yet: a clean error instead of a cut stream
            inst.outlier.record(False, time.monotonic())
            service.metrics.upstream_error(exc.code)
            raise GatewayError(exc.code, _MESSAGES[exc.code].format(service.name)) from None
        entry = cache.keep(look, resp.status, headers, data, fresh, flight)
        if entry is not None:
            await cache.share(look, entry)  # before answering: a client that saw MISS finds it anywhere
        await send({"type": "http.response.start", "status": resp.status, "headers": headers + reply_headers})
        await send({"type": "http.response.body", "body": data})
    finally:
        inst.inflight -= 1
        resp.release()
    return resp.status


async def _disconnect(receive) -> None:
    """Return when the client has gone (an unread empty request body may come first)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def stream_response(resp: UpstreamResponse, send, receive) -> None:
    """Relay a streamed body. The ASGI server does not fail `send` once the client is gone, so
    a long stream (SSE) watches `receive` for the disconnect and stops reading the upstream."""
    task = asyncio.current_task()
    gone = asyncio.ensure_future(_disconnect(receive)) if receive is not None else None

    def stop(_: asyncio.Future) -> None:
        task.cancel()

    if gone is not None:
        gone.add_done_callback(stop)
    try:
        async for chunk in resp:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    except asyncio.CancelledError:
        if gone is not None and gone.done() and not gone.cancelled():
            task.uncancel()
            raise ClientGone from None
        raise
    finally:
        if gone is not None:
            gone.remove_done_callback(stop)
            gone.cancel()
