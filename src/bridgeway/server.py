"""The ASGI application: top-level dispatch by path prefix, the lifespan, and config reloads.

No framework sits on the data plane: `/bridge/...` goes straight to the proxy pipeline. The
management API (FastAPI) is mounted under `/api/v1`, with its OpenAPI at `/docs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import signal
import time

import orjson

from bridgeway import __version__
from bridgeway.api import build_api
from bridgeway.api.app import queue_call, serve_queue_call
from bridgeway.api.auth import credential_kind
from bridgeway.config import Config, ConfigError, load_config
from bridgeway.dataplane.health import HealthChecker
from bridgeway.dataplane.proxy import (
    BRIDGE,
    Call,
    ClientGone,
    StreamCut,
    proxy_http,
    proxy_now,
    read_head,
)
from bridgeway.dataplane.service import Registry
from bridgeway.dataplane.websocket import proxy_websocket
from bridgeway.errors import GatewayError, error_body
from bridgeway.governance.audit import AuditLog
from bridgeway.jobs.events.log import EventLog, Retention, open_event_log
from bridgeway.jobs.events.webhooks import WebhookDelivery
from bridgeway.jobs.queues import open_queue_backend
from bridgeway.jobs.queues.push import Delivery
from bridgeway.jobs.queues.service import Queues
from bridgeway.llm.endpoint import LLMEndpoint
from bridgeway.llm.ledger import open_ledger
from bridgeway.llm.spend import Spending
from bridgeway.observability import logs, metrics
from bridgeway.observability.tracing import new_span_id, new_trace_id, parse_traceparent, traceparent
from bridgeway.security.access import Access
from bridgeway.security.jwt import JwtVerifier, SigningKeys
from bridgeway.security.keys import KeyStore, public_id
from bridgeway.security.limits import RedisLimiter
from bridgeway.security.oauth import TokenIssuer
from bridgeway.serving.http import RUN, failing
from bridgeway.state import KV, open_state
from bridgeway.workers import shared_dir

JSON = (b"content-type", b"application/json")
API_PREFIXES = ("/api/", "/docs", "/openapi.json", "/oauth/", "/.well-known/")
API_MAX_BODY = 1 << 20  # management calls are small; never buffer a huge body for them


class Gateway:
    """One worker's gateway: the registry of services, the management API, and the dispatch."""

    def __init__(self, config: Config, config_path: str | None = None):
        self.config = config
        self.access_log = config.logging.access  # read per request: a plain attribute, not pydantic's
        self.config_path = config_path
        self._loaded_mtime = _mtime(config_path)
        self.registry = Registry()
        self.health = HealthChecker(self.registry)
        self.ready = False
        self.state: KV | None = None  # opened at start-up, inside the worker's event loop
        self.keys: KeyStore | None = None
        self.signing: SigningKeys | None = None
        self.oauth: TokenIssuer | None = None
        self.verifier: JwtVerifier | None = None
        self.access = Access(config, None)  # rebuilt with the key store at start-up
        self.llm = LLMEndpoint(config, cache=self.registry.cache)  # one cache memory, one backend
        self.event_log: EventLog | None = None  # opened at start-up, on the jobs backend
        self.webhooks: WebhookDelivery | None = None
        self.queues: Queues | None = None  # opened at start-up when the config names queues
        self.delivery: Delivery | None = None
        self._publisher: asyncio.Task | None = None
        self.started_at = time.time()
        # Where the gateway itself may post (webhooks, job callbacks): refused URLs are SSRF.
        self.outbound = config.outbound.policy
        self.admin_token_sha256 = _token_hash(config)
        self.log = logs.get_logger()
        # Recording works from the start; the writer starts with the state, in the worker's loop.
        self.audit = AuditLog(retention=config.audit.retention, enabled=config.audit.enabled)
        self.api = build_api(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        logs.configure(self.config.logging.level)
        self.state = self.registry.state = open_state(self.config.state)
        self.keys = KeyStore(self.state)
        self.audit.start(self.state)
        if self.config.state.startswith(("redis://", "rediss://")):
            self.registry.limiter = RedisLimiter(self.config.state)  # limits hold across replicas
        self._build_auth(self.config)
        self.registry.apply(self.config)
        self.llm.spending = Spending(open_ledger(self.config.state))  # LLM spend and budgets
        self.llm.spending.start()
        if self.config.queues:
            # Connected before the loops start: a broker that is down fails the start, loudly.
            backend = open_queue_backend(self.config.jobs_backend, retention=self.config.jobs.retention)
            try:
                await backend.open()
            except BaseException:
                await backend.close()
                raise
            self.queues = Queues(self.config, backend)
        self._apply_queues(self.config)
        self.health.start()
        await self._start_events()
        if shared_dir() is not None:
            self._publisher = asyncio.create_task(self._publish_metrics())
        loop = asyncio.get_running_loop()
        # Outside the main thread (an embedding test) reloads go through the API only.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        if _mtime(self.config_path) != self._loaded_mtime:
            # A SIGHUP that came before the handler was in place was ignored (the supervisor
            # starts workers that way, so it cannot end one still starting): the file tells.
            self.reload()
        # Everything built so far lives as long as the worker: keep it out of the collector's
        # generations, so a collection's pause does not grow with the size of the gateway.
        gc.collect()
        gc.freeze()
        self.ready = True
        self.log.info("gateway_started", listen=self.config.listen, services=list(self.config.services))

    async def _start_events(self) -> None:
        events = self.config.events
        retention = Retention(events.retention.max_age, events.retention.max_count, events.dedupe_window)
        self.event_log = open_event_log(self.config.jobs_backend, events.log, retention)
        self.webhooks = WebhookDelivery(self.event_log, self.state, events.delivery)
        self.webhooks.configure(events.webhooks, events.delivery, self.outbound)
        await self.webhooks.start()

    def _build_auth(self, config: Config) -> None:
        """Keys, tokens (the gateway's own and configured issuers') and the clients table."""
        oauth = config.auth.oauth
        if self.signing is None:  # the key ring lives in the state backend; one view per worker
            self.signing = SigningKeys(self.state, rotate_every=oauth.rotate_every, overlap=oauth.overlap)
        self.oauth = TokenIssuer(config, self.signing, self.state)
        old = self.verifier
        self.verifier = JwtVerifier(config.auth.jwt.issuers, local=self.signing, local_issuer=oauth.issuer)
        if old is not None:
            asyncio.get_running_loop().create_task(old.aclose())
        self.access = Access(
            config, self.keys, self.registry.limiter, verifier=self.verifier, oauth=self.oauth
        )

    def _apply_queues(self, config: Config) -> None:
        """Start the queues' loops once a config names queues (a backend first named by a reload
        connects on its first call); keep the push loops in step with the config."""
        if self.queues is None:
            if not config.queues:
                return  # no queues: no backend file, no loops
            backend = open_queue_backend(config.jobs_backend, retention=config.jobs.retention)
            self.queues = Queues(config, backend)
        else:
            self.queues.configure(config)
        if self.delivery is None:
            self.queues.start()
            self.delivery = Delivery(self.queues, self.registry)
        self.delivery.apply()

    async def shutdown(self) -> None:
        self.ready = False
        if self._publisher:
            self._publisher.cancel()
        if self.delivery is not None:
            await self.delivery.stop()  # before the registry's pools close under the deliveries
        if self.queues is not None:
            await self.queues.stop()
        await self.health.stop()
        await self.registry.close()
        await self.llm.close()
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.event_log is not None:
            await self.event_log.close()
        if self.llm.spending is not None:
            await self.llm.spending.close()  # writes the spend still queued
        await self.audit.stop()  # writes what is still queued, while the state is open
        if self.state is not None:
            await self.state.close()
        if isinstance(self.registry.limiter, RedisLimiter):
            await self.registry.limiter.aclose()
        if self.verifier is not None:
            await self.verifier.aclose()

    async def _publish_metrics(self) -> None:
        while True:
            metrics.write_snapshot()
            await asyncio.sleep(1.0)

    def reload(self, actor: str = "signal:SIGHUP", **context) -> list[str]:
        """Re-read the config file; a valid one takes over at once, an invalid one changes nothing.
        Returns the problems found (empty when the new config serves). `actor` and `context`
        (the request's fields, when the API asked) go to the audit record."""
        if not self.config_path:
            return ["no config file to reload from"]
        mtime = _mtime(self.config_path)
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            metrics.config_reloaded(False)
            self.log.error("config_rejected", path=self.config_path, problems=exc.problems)
            self.audit.record(
                "config.rejected",
                actor=actor,
                outcome="failure",
                file=self.config_path,
                problems=exc.problems,
                pid=os.getpid(),
                **context,
            )
            return exc.problems
        for field in ("listen", "state", "jobs_backend"):
            if getattr(config, field) != getattr(self.config, field):
                self.log.warning("change_needs_restart", field=field)
        self.registry.apply(config)
        self.outbound = config.outbound.policy
        self._build_auth(config)
        self._apply_queues(config)
        self.llm = LLMEndpoint(config, self.llm)
        if self.webhooks is not None:
            self.webhooks.configure(config.events.webhooks, config.events.delivery, self.outbound)
        self.config = config
        self.access_log = config.logging.access
        self._loaded_mtime = mtime
        logs.configure(config.logging.level)
        self.admin_token_sha256 = _token_hash(config)
        metrics.config_reloaded(True)
        self.log.info("config_reloaded", path=self.config_path, services=list(config.services))
        self.audit.record(
            "config.reloaded",
            actor=actor,
            outcome="success",
            file=self.config_path,
            services=sorted(config.services),
            pid=os.getpid(),
            **context,
        )
        # After the record: a reload that turns the audit log off is itself recorded.
        self.audit.retention, self.audit.enabled = config.audit.retention, config.audit.enabled
        return []

    def reload_everywhere(self, actor: str, **context) -> list[str]:
        """Reload here and, with several workers, have the supervisor tell the others too."""
        problems = self.reload(actor, **context)
        if not problems and shared_dir() is not None:
            os.kill(os.getppid(), signal.SIGHUP)
        return problems

    # -- ASGI ----------------------------------------------------------------------------------

    def __call__(self, scope, receive, send):
        """The ASGI entry: a plain function that returns the handler's coroutine for the server to
        await, not a coroutine of its own around it. Every level of an await chain is passed
        through again each time the request resumes (the upstream's answer, each send)."""
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if path.startswith(BRIDGE):
                if RUN in scope.get("extensions", ()):  # our own server: callbacks where they do
                    return self._bridge_now(scope, receive, send)
                return self._bridge(scope, receive, send)
            if path.startswith("/v1/"):
                return self._llm(scope, receive, send)
            if path in self._ops:
                return self._ops[path](self, send)
            if path.startswith(API_PREFIXES):
                return self._api(scope, receive, send)
            trace_id = new_trace_id()
            span = [(b"traceparent", traceparent(trace_id, new_span_id()))]
            return send_error(send, GatewayError("NOT_FOUND", f"no route for {path[:200]!r}"), trace_id, span)
        if kind == "websocket":
            return self._websocket(scope, receive, send)
        if kind == "lifespan":
            return self._lifespan(receive, send)
        return _nothing()

    async def _websocket(self, scope, receive, send) -> None:
        if scope["path"].startswith(BRIDGE):
            service, _ = self._service_for(scope["path"])
            if service is not None:
                await proxy_websocket(
                    service, scope, receive, send, len(BRIDGE) + len(service.name), self.access
                )
                return
        elif scope["path"].startswith("/api/"):
            await self.api(scope, receive, send)  # the event stream's WebSocket
            return
        await send({"type": "websocket.close", "code": 4404})

    async def _api(self, scope, receive, send) -> None:
        """The management API; its bodies are small, so a large one is refused, never buffered."""
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > API_MAX_BODY):
                error = GatewayError(
                    "BODY_TOO_LARGE", f"management API bodies are limited to {API_MAX_BODY} bytes"
                )
                await send_error(send, error, new_trace_id(), [])
                return
        if (call := queue_call(scope)) is not None:
            await serve_queue_call(self.api, call, scope, _limited(receive, API_MAX_BODY), send)
            return
        await self.api(scope, _limited(receive, API_MAX_BODY), send)

    def _service_for(self, path: str):
        name, _, _ = path[len(BRIDGE) :].partition("/")
        return self.registry.services.get(name), name

    async def _bridge(self, scope, receive, send) -> None:
        await Bridged(self, scope, send).serve(receive)

    def _bridge_now(self, scope, receive, send):
        """`_bridge` on this gateway's own server: None when the request is answered from
        callbacks (`proxy_now`), else the coroutine that serves it."""
        request = Bridged(self, scope, send)
        try:
            request.prepare()
            step = proxy_now(
                request.service,
                scope,
                receive,
                send,
                request.call,
                request.reply_headers,
                self.access,
                request,
            )
        except Exception as exc:  # a refusal (or a bug): answered by `serve`, as on the coroutine path
            step = failing(exc)
        return None if step is None else request.serve(receive, step)

    async def _llm(self, scope, receive, send) -> None:
        """The OpenAI-compatible endpoint, with the trace and the errors of every route."""
        started = time.perf_counter()
        trace_id = new_trace_id()
        for name, value in scope["headers"]:
            if name == b"traceparent" and (traced := parse_traceparent(value)):
                trace_id = traced[0]
        trace_headers = [(b"traceparent", traceparent(trace_id, new_span_id()))]
        status = 500
        try:
            status = await self.llm.handle(scope, receive, send, self.access, trace_headers)
        except GatewayError as exc:
            status = exc.status
            await send_error(send, exc, trace_id, trace_headers)
        except ClientGone:
            status = 499
        except Exception:
            self.log.exception("internal_error", route=scope["path"], trace_id=trace_id)
            with contextlib.suppress(Exception):
                await send_error(send, GatewayError("INTERNAL", "internal error"), trace_id, trace_headers)
        finally:
            if self.access_log:
                self.log.info(
                    "request",
                    method=scope["method"],
                    route=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                    trace_id=trace_id,
                )

    def _audit_refusal(self, exc: GatewayError, scope, name: str, call: Call) -> None:
        """Record a 401 or 403 on /bridge: only refused requests come here, admitted ones pay nothing."""
        token = call.credential
        key_id = public_id(token) if token is not None else None
        client = scope.get("client")
        fields = {
            "outcome": "failure",
            "trace_id": call.trace_id,
            "service": name,
            "route": f"/bridge/{name}",
            "method": scope["method"],
            "path": scope["path"],  # without the query, which may carry secrets
            "address": client[0] if client else None,
            "reason": exc.message,
        }
        if exc.status == 401:
            credential = credential_kind(token)
            self.audit.record("auth.failed", actor=None, credential=credential, key_id=key_id, **fields)
        else:
            # A 403 comes after the key was authenticated, so its (public) id names the caller.
            self.audit.record("access.forbidden", actor=f"key:{key_id}" if key_id else None, **fields)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    self.log.exception("startup_failed")  # the server prints only the message
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- operations endpoints ------------------------------------------------------------------

    async def _health(self, send) -> None:
        now = time.monotonic()
        services = {}
        degraded = False
        for s in self.registry.services.values():
            up = sum(1 for i in s.instances if i.available(now))
            services[s.name] = {
                "instances": len(s.instances),
                "available": up,
                "breaker": s.breaker.state(now).value,
            }
            degraded |= up == 0
        body = {
            "status": "degraded" if degraded else "ok",
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "checks": {"config": {"status": "ok", "services": len(services)}, "services": services},
        }
        await send_json(send, 200, body)

    async def _live(self, send) -> None:
        await send_json(send, 200, {"status": "alive"})

    async def _ready(self, send) -> None:
        await send_json(send, 200 if self.ready else 503, {"status": "ready" if self.ready else "starting"})

    async def _metrics(self, send) -> None:
        body, content_type = metrics.render(lambda: self.registry.snapshot(time.monotonic()))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    _ops = {"/health": _health, "/health/live": _live, "/health/ready": _ready, "/metrics": _metrics}


async def _nothing() -> None:
    """What an ASGI scope type the gateway does not serve gets."""


class Bridged:
    """One /bridge request's account (its trace, errors, metrics and log line), the same whether
    a coroutine serves it (`serve`) or callbacks do (`proxy_now`, which calls `finish`)."""

    __slots__ = ("gateway", "scope", "send", "service", "name", "metrics", "call", "reply_headers", "started")

    def __init__(self, gateway: Gateway, scope: dict, send):
        self.started = time.perf_counter()
        self.gateway = gateway
        self.scope = scope
        self.send = send
        self.service, self.name = gateway._service_for(scope["path"])
        self.metrics = self.service.metrics if self.service else metrics.UNMATCHED
        self.metrics.inflight += 1
        self.call = Call()
        self.reply_headers: list[tuple[bytes, bytes]] = []

    def prepare(self) -> None:
        """Read the head, continue or start the trace; refuse an unknown service."""
        call = self.call
        read_head(self.scope, call)
        span = traceparent(call.trace_id, new_span_id(), call.trace_flags)
        call.headers.append((b"traceparent", span))
        self.reply_headers.append((b"traceparent", span))
        if call.request_id is not None:
            self.reply_headers.append((b"x-request-id", call.request_id))
        if self.service is None:
            raise GatewayError("UNKNOWN_SERVICE", f"no service named {self.name[:100]!r}")

    async def serve(self, receive, step=None) -> None:
        """Serve the request by `step` (by default: prepare it and `proxy_http`), answering what
        it raises."""
        scope, send, call, reply_headers = self.scope, self.send, self.call, self.reply_headers
        status = 500
        try:
            if step is None:
                self.prepare()
                step = proxy_http(
                    self.service, scope, receive, send, call, reply_headers, self.gateway.access
                )
            status = await step
        except GatewayError as exc:
            status = exc.status
            if status in (401, 403):
                self.gateway._audit_refusal(exc, scope, self.name, call)
            if not reply_headers:  # the head itself was refused, after its trace was known
                reply_headers.append(
                    (b"traceparent", traceparent(call.trace_id, new_span_id(), call.trace_flags))
                )
            await send_error(send, exc, call.trace_id, reply_headers)
        except ClientGone:
            status = 499  # as nginx logs it: the client closed the request
        except StreamCut as exc:
            status = exc.status
            self.gateway.log.warning("stream_cut", service=self.name, code=exc.code, trace_id=call.trace_id)
        except Exception:
            status = 500
            self.gateway.log.exception("internal_error", service=self.name, trace_id=call.trace_id)
            # If the response had already started this send fails, and the server cuts the stream.
            with contextlib.suppress(Exception):
                await send_error(
                    send, GatewayError("INTERNAL", "internal error"), call.trace_id, reply_headers
                )
        finally:
            self.finish(status)

    def go_on(self, step) -> None:
        """The rest of a request `proxy_now` began, as the server's task for it."""
        self.scope["extensions"][RUN](self.send, self.serve(None, step))

    def finish(self, status: int) -> None:
        self.metrics.inflight -= 1
        seconds = time.perf_counter() - self.started
        self.metrics.answered(status, seconds)
        if self.gateway.access_log:
            self.gateway.log.info(
                "request",
                service=self.name,
                method=self.scope["method"],
                route=f"/bridge/{self.name}",
                status=status,
                duration_ms=round(seconds * 1000, 3),
                trace_id=self.call.trace_id,
            )


def _limited(receive, limit: int):
    """A receive() that stops a chunked body over `limit` before it is all buffered."""
    seen = 0

    async def receive_limited():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise GatewayError("BODY_TOO_LARGE", f"management API bodies are limited to {limit} bytes")
        return message

    return receive_limited


def _mtime(path: str | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def _token_hash(config: Config) -> bytes | None:
    token = config.admin.token
    return hashlib.sha256(token.get_secret_value().encode()).digest() if token else None


async def send_json(send, status: int, body: object, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [JSON, *(headers or [])]})
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


async def send_error(send, exc: GatewayError, trace_id: str, headers: list) -> None:
    await send(
        {"type": "http.response.start", "status": exc.status, "headers": [JSON, *headers, *exc.headers]}
    )
    await send({"type": "http.response.body", "body": error_body(exc.code, exc.message, trace_id)})


def create_app() -> Gateway:
    """Each worker builds its gateway from $BRIDGEWAY_CONFIG."""
    path = os.environ["BRIDGEWAY_CONFIG"]
    return Gateway(load_config(path), path)
