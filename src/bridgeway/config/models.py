"""Typed models of bridgeway.yaml.

Human units are parsed here, once, at load time (`250ms`, `5MB`, `20%`), so nothing on the
request path ever looks at a string from the config again.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from bridgeway.config.units import Rate, parse_duration, parse_rate, parse_size
from bridgeway.security.outbound import OutboundPolicy, check_url

Duration = Annotated[float, BeforeValidator(parse_duration)]
RateValue = Annotated[Rate, BeforeValidator(parse_rate)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _percent(value: object) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f'"{value}" is not a percentage') from None
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f'"{value}" is not a percentage (use "20%" or 0.2)')
    return float(value)


Percent = Annotated[float, BeforeValidator(_percent)]


def instance_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f'"{url}" is not an instance URL (expected http://host:port)')
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f'"{url}" has an invalid port') from None
    if parts.query or parts.fragment:
        raise ValueError(f'"{url}" must not carry a query or fragment')
    return url.rstrip("/")


InstanceURL = Annotated[str, AfterValidator(instance_url)]


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f'"{value}" is not a listen address (expected host:port)')
    return value


Listen = Annotated[str, AfterValidator(_listen)]
ServiceName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(Model):
    attempts: int = Field(2, ge=1, le=10, description="tries in all, the first included")
    budget: Percent = 0.2
    min_per_second: float = Field(3.0, ge=0)
    per_try_timeout: Duration | None = None
    backoff: Duration = 0.025
    max_backoff: Duration = 0.25
    non_idempotent: bool = Field(False, description="also retry POST/PATCH after the request was sent")
    on_status: frozenset[int] = frozenset({502, 503, 504})


class HealthConfig(Model):
    path: str = "/health"
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy: int = Field(2, ge=1, description="consecutive passes to bring an instance back")
    unhealthy: int = Field(3, ge=1, description="consecutive failures to take it out")


class OutlierConfig(Model):
    failures: int = Field(5, ge=1)
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> OutlierConfig:
        if not 0 < self.base_ejection <= self.max_ejection:
            raise ValueError("base_ejection must be above 0 and at most max_ejection")
        return self


class BreakerConfig(Model):
    failures: int = Field(5, ge=1)
    open_for: Duration = 30.0
    probes: int = Field(1, ge=1)


class PoolConfig(Model):
    max_connections: int = Field(512, ge=1)
    max_idle: int = Field(128, ge=0)
    idle_timeout: Duration = 60.0


class _Budget(Model):
    rate: RateValue | None = Field(None, description='requests per window, e.g. "100/s" or "1000/min"')
    concurrency: int | None = Field(None, ge=1, description="requests in flight at once")
    path: str | None = Field(
        None, description='only requests whose upstream path matches this glob, e.g. "/simulate*"'
    )
    on_unavailable: Literal["open", "closed"] = Field(
        "open",
        description="when the shared limiter (Redis) cannot be reached: let requests through, or refuse them",
    )

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a limit sets exactly one of rate or concurrency")
        return self


class LimitConfig(_Budget):
    per: Literal["service", "ip", "key"] = Field(
        "service",
        description="one budget for the service, one per client address, or one per caller "
        "(API key, client or token subject)",
    )


class ClientLimitConfig(_Budget):
    service: str | None = Field(None, description="only calls to this service; every service when absent")


def _header_names(names: list[str]) -> list[str]:
    for name in names:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError(f'"{name}" is not a header name')
    return sorted({name.lower() for name in names})


class CacheConfig(Model):
    """The response cache of one service (opt-in): see docs/configuration.md."""

    ttl: Duration = Field(
        60.0,
        gt=0,
        description="how long an answer is kept; an upstream max-age or s-maxage may only shorten it",
    )
    methods: list[Literal["GET", "HEAD"]] = Field(
        ["GET", "HEAD"], description="GET answers are stored; HEAD is answered from them"
    )
    max_entry: Size = Field(1024 * 1024, gt=0, description="larger answers are passed through, not stored")
    vary: Annotated[list[str], AfterValidator(_header_names)] = Field(
        [], description="request headers whose values are part of the key, e.g. accept-language"
    )
    scope: Literal["caller", "role", "public"] = Field(
        "caller", description="who shares an entry: the same caller, callers of one role, or everyone"
    )
    path: str | None = Field(None, description='only upstream paths matching this glob, e.g. "/models*"')

    @model_validator(mode="after")
    def _get_first(self) -> CacheConfig:
        if "GET" not in self.methods:
            raise ValueError("methods must include GET: HEAD is answered from stored GET answers")
        return self


class CacheMemoryConfig(Model):
    """The in-process tier shared by every cached route of a worker."""

    max_entries: int = Field(10_000, ge=1)
    max_bytes: Size = Field(64 * 1024 * 1024, gt=0)


class ServiceConfig(Model):
    instances: list[InstanceURL] = []
    balancer: Literal["round_robin", "least_requests", "p2c_ewma"] = "p2c_ewma"
    timeout: Duration = Field(30.0, description="until the response head, all tries included")
    connect_timeout: Duration = 2.0
    read_timeout: Duration | None = Field(None, description="idle limit between body chunks; default timeout")
    max_body: Size = 10 * 1024 * 1024
    registration_ttl: Duration = 30.0
    retries: RetryConfig = RetryConfig()
    limits: list[LimitConfig] = []
    health: HealthConfig | None = None
    outlier: OutlierConfig = OutlierConfig()
    breaker: BreakerConfig = BreakerConfig()
    pool: PoolConfig = PoolConfig()
    cache: CacheConfig | None = Field(None, description="response cache for GET; none when absent")

    @model_validator(mode="after")
    def _distinct(self) -> ServiceConfig:
        if len(set(self.instances)) != len(self.instances):
            raise ValueError("instances are listed twice")
        return self


class AdminConfig(Model):
    token: SecretStr | None = Field(None, description="bearer token for /api/v1; stored only as a hash")


class LoggingConfig(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = True


class Grant(Model):
    service: str = Field(description='a service name, or "*" for every service')
    methods: list[str] | None = Field(None, description="allowed methods; all when absent")
    paths: list[str] | None = Field(
        None, description='globs on the upstream path, e.g. "/simulate*"; all when absent'
    )


class KvGrant(Model):
    namespace: str = Field(description='a KV namespace or a glob of them, e.g. "agents-*"')
    access: Literal["read", "write"] = Field("read", description="write includes read")


class EventGrant(Model):
    types: str = Field(description='an event type or a glob of them, e.g. "job.*"')
    access: Literal["publish", "subscribe"] = Field(description="publish events, or subscribe to them")


def _budget_text(value: object) -> object:
    """`"5usd/1d"` or `"2000000tokens/30d"` as the object form (keys API and CLI spell them so)."""
    if isinstance(value, str):
        from bridgeway.llm.budgets import parse_budget  # the budget rules live with the ledger

        return parse_budget(value)
    return value


class _BudgetFields(Model):
    """A spending budget on /v1 calls: money and/or tokens (input + output) per period."""

    period: Literal["1d", "7d", "30d", "total"] = Field(
        description="the current UTC day, the last 7 or 30 UTC days (today included), or all time"
    )
    usd: float | None = Field(None, gt=0, description="USD per period, from the price table")
    tokens: int | None = Field(None, gt=0, description="input + output tokens per period")

    @model_validator(mode="after")
    def _some_limit(self):
        if self.usd is None and self.tokens is None:
            raise ValueError("a budget sets usd, tokens or both")
        return self


BudgetConfig = Annotated[_BudgetFields, BeforeValidator(_budget_text)]


class QueueGrant(Model):
    queue: str = Field(description='a queue name or a glob of them, e.g. "reports-*"')
    access: Literal["produce", "consume"] = Field(
        "produce", description="produce: enqueue and read its jobs; consume: also claim, settle, list dead"
    )


class RoleConfig(Model):
    allow: list[Grant] = []
    kv: list[KvGrant] = Field([], description="KV namespaces the role may read or write")
    events: list[EventGrant] = Field([], description="event types the role may publish or subscribe to")

    queues: list[QueueGrant] = Field([], description="queues the role may produce to or consume from")
    models: list[str] = Field(
        [], description='public model names (globs) the role may use on /v1, e.g. "fast-*"'
    )
    budgets: list[BudgetConfig] = Field(
        [], description="LLM budgets of each key (or token subject) of the role, unless the key sets its own"
    )


class ClientConfig(Model):
    """One row of the authorization matrix: this client may call these services, with this role's
    permissions, at this rate."""

    role: str
    services: list[str] | None = Field(None, description="narrows the role to these services")
    limits: list[ClientLimitConfig] = Field([], description="budgets the client's calls draw from, together")
    budgets: list[BudgetConfig] = Field([], description="LLM spending budgets the client's keys share")
    secret: SecretStr | None = Field(
        None, description="OAuth2 client secret for POST /oauth/token; kept only as a hash"
    )


JwtAlgorithm = Literal["HS256", "RS256", "ES256", "EdDSA"]


def _jwks_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'"{url}" is not a JWKS URL (expected http(s)://host/path)')
    return url


class JwtIssuerConfig(Model):
    issuer: str = Field(min_length=1, description="must equal the token's iss")
    audience: str | list[str] | None = Field(None, description="when set, the token's aud must name one")
    jwks: Annotated[str, AfterValidator(_jwks_url)] | None = Field(None, description="URL of a JWKS document")
    secret: SecretStr | None = Field(None, description="shared secret of an HS256 issuer")
    public_key: str | None = Field(None, description="PEM of one static RSA, EC P-256 or Ed25519 key")
    algorithms: list[JwtAlgorithm] | None = Field(
        None, min_length=1, description="default: what the key type allows"
    )
    leeway: Duration = 30.0
    jwks_cache: Duration = Field(300.0, description="how long a fetched JWKS is trusted")
    role_claim: str = Field("role", description="a string, a list or a space-separated string of values")
    roles: dict[str, str] = Field({}, description="claim value -> Bridgeway role; the first match wins")
    default_role: str | None = Field(None, description="role when no value maps; None: refused")
    subject_claim: str = "sub"

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtIssuerConfig:
        sources = [name for name in ("jwks", "secret", "public_key") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(
                f"issuer {self.issuer!r} needs exactly one of jwks, secret or public_key"
                + (f" (got {' and '.join(sources)})" if sources else "")
            )
        symmetric = self.secret is not None
        if self.algorithms is not None and symmetric != ("HS256" in self.algorithms):
            # A public key used as an HMAC secret is the classic algorithm-confusion attack.
            raise ValueError(
                f"issuer {self.issuer!r}: HS256 goes with a secret, and a secret only with HS256"
            )
        if symmetric and len(self.secret.get_secret_value().encode()) < 32:
            raise ValueError(f"issuer {self.issuer!r}: an HS256 secret needs at least 32 bytes")
        if self.public_key is not None:
            from bridgeway.security.jwt import load_public_key  # the key rules live with the verifier

            _, algorithm = load_public_key(self.public_key, self.issuer)
            if self.algorithms is not None and algorithm not in self.algorithms:
                raise ValueError(f"issuer {self.issuer!r}: its public key is {algorithm}, not in algorithms")
        return self


class JwtConfig(Model):
    issuers: list[JwtIssuerConfig] = []

    @model_validator(mode="after")
    def _distinct(self) -> JwtConfig:
        names = [i.issuer for i in self.issuers]
        if len(set(names)) != len(names):
            raise ValueError("an issuer is listed twice")
        return self


class OAuthConfig(Model):
    """The gateway's own token endpoint, for clients of the clients table that have a secret."""

    issuer: str = Field("bridgeway", description="the iss of the tokens it issues")
    audience: str = Field("bridgeway", description="the aud of the tokens it issues")
    token_ttl: Duration = Field(900.0, description="lifetime of an issued token")
    rotate_every: Duration = Field(7 * 86400.0, description="age at which the signing key is replaced")
    overlap: Duration = Field(86400.0, description="how long a replaced key still verifies")


class AuthConfig(Model):
    required: bool = Field(False, description="every /bridge request needs an API key or token")
    jwt: JwtConfig = JwtConfig()
    oauth: OAuthConfig = OAuthConfig()


class LLMDeploymentConfig(Model):
    provider: Literal["openai", "anthropic", "gemini"] = Field(
        description="the wire format; OpenAI-compatible servers (vLLM, Ollama, llama.cpp) are openai"
    )
    model: str = Field(min_length=1, description="the provider's model name")
    base_url: str = Field("", description="default: the provider's public API")
    api_key: SecretStr | None = Field(None, description='use "${env:NAME}"; never logged')
    weight: float = Field(1.0, gt=0, description="share of traffic under the weighted strategy")
    timeout: Duration = Field(120.0, description="until the response head, and between stream events")
    input_per_1m: float | None = Field(
        None, ge=0, description="USD per 1M input tokens; default: price table"
    )
    output_per_1m: float | None = Field(
        None, ge=0, description="USD per 1M output tokens; default: price table"
    )


class CooldownConfig(Model):
    failures: int = Field(3, ge=1, description="consecutive failures that cool a deployment down")
    open_for: Duration = Field(30.0, description="how long it rests before a probe may try it again")


class LLMCacheConfig(Model):
    """The answer cache of one model group (opt-in): see docs/configuration.md."""

    ttl: Duration = Field(600.0, gt=0, description="how long an answer is kept")
    scope: Literal["caller", "role", "public"] = Field(
        "caller", description="who shares an entry: the same caller, callers of one role, or everyone"
    )
    max_entry: Size = Field(1024 * 1024, gt=0, description="larger answers are passed on, not stored")


class ModelGroupConfig(Model):
    strategy: Literal["weighted", "least_busy", "lowest_latency", "lowest_cost"] = "weighted"
    deployments: list[LLMDeploymentConfig] = Field(min_length=1)
    fallbacks: list[str] = Field([], description="model groups tried, in order, after this one's")
    cooldown: CooldownConfig = CooldownConfig()
    cache: LLMCacheConfig | None = Field(None, description="cache of answers; none when absent")


Complexity = Literal["low", "medium", "high"]


def _one_or_many(value: object) -> object:
    """`task: code` reads as well as `task: [code, review]`."""
    return [value] if isinstance(value, str) else value


class RuleWhen(Model):
    """What a request's metadata must show for a rule to apply; every field given must hold."""

    task: Annotated[list[str], BeforeValidator(_one_or_many)] | None = Field(
        None, min_length=1, description="one of these task types"
    )
    complexity: Annotated[list[Complexity], BeforeValidator(_one_or_many)] | None = Field(
        None, min_length=1, description="one of these levels (given, or estimated from the prompt)"
    )
    tags: Annotated[list[str], BeforeValidator(_one_or_many)] | None = Field(
        None, min_length=1, description="all of these tags"
    )

    @model_validator(mode="after")
    def _something(self) -> RuleWhen:
        if self.task is None and self.complexity is None and self.tags is None:
            raise ValueError("a rule's `when` needs at least one of task, complexity or tags")
        return self


class RuleConfig(Model):
    when: RuleWhen
    model: str = Field(min_length=1, description="the model group chosen when the rule applies")


class RouterConfig(Model):
    """A router name callers may put in `model`: the first rule that applies picks the group."""

    rules: list[RuleConfig] = []
    default: str = Field(min_length=1, description="the group chosen when no rule applies")
    prefer: bool = Field(True, description="honour a caller's preferred model (metadata `prefer`)")


class AuditConfig(Model):
    enabled: bool = Field(True, description="record security events in the state backend and the logs")
    retention: Duration = Field(30 * 86400.0, gt=0, description="how long a record is kept")


class JobsConfig(Model):
    backend: str = Field(
        "",
        description="where queues and events live: sqlite:///path.db, redis://host:port/db or "
        "nats://host:4222; default: the state backend's (an in-process SQLite for memory://)",
    )
    retention: Duration = Field(7 * 86400.0, gt=0, description="how long done jobs stay readable")
    callback_secret: SecretStr | None = Field(
        None, description='signs job callbacks where a queue sets none; use "${env:NAME}"'
    )


class DeliverConfig(Model):
    """Push delivery: each job is POSTed to a service route, as /bridge/{service}{path} would."""

    service: str
    path: str = Field("/", pattern=r"^/[^\s?#]*$")
    method: Literal["POST", "PUT"] = "POST"


class BackoffConfig(Model):
    base: Duration = Field(1.0, ge=0, description="ceiling of the first retry's wait (full jitter)")
    max: Duration = Field(300.0, ge=0, description="ceiling of any retry's wait")


class QueueConfig(Model):
    deliver: DeliverConfig | None = Field(None, description="push to a service route; pull when absent")
    concurrency: int = Field(16, ge=1, le=10_000, description="push: jobs in flight per gateway worker")
    max_attempts: int = Field(5, ge=1, le=1000)
    backoff: BackoffConfig = BackoffConfig()
    lease: Duration = Field(
        30.0, gt=0, description="how long a claimed job is held before it is handed out again"
    )
    max_depth: int | None = Field(None, ge=1, description="enqueues are refused (429) while this many wait")
    max_payload: Size = Field(256 * 1024, gt=0, description="largest job payload")
    callback_secret: SecretStr | None = Field(
        None, description='signs this queue\'s callbacks; "${env:NAME}"'
    )


QueueName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


EventTypePattern = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:*?\[\]!-]{1,200}$")]


class WebhookConfig(Model):
    """One webhook subscription: events whose type matches `types` are posted to `url`, in order."""

    types: list[EventTypePattern] = Field(min_length=1, description='globs on event_type, e.g. "job.*"')
    url: str = Field(description="where events are posted (http or https)")
    secret: SecretStr = Field(description='HMAC key for X-Bridgeway-Signature; use "${env:NAME}"')
    service: str | None = Field(
        None, description="only events whose target_services is empty or names this service"
    )
    start: Literal["latest", "earliest"] = Field(
        "latest", description="where a new subscription starts: events published from now, or all retained"
    )
    timeout: Duration = Field(10.0, gt=0, description="for one post")

    @model_validator(mode="after")
    def _http_url(self) -> WebhookConfig:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f'"{self.url}" is not a webhook URL (expected http(s)://host/path)')
        if not self.secret.get_secret_value():
            raise ValueError("secret must not be empty")
        return self


class EventRetentionConfig(Model):
    max_age: Duration = Field(7 * 86400.0, gt=0, description="events older than this are dropped")
    max_count: int = Field(1_000_000, ge=1, description="only the newest this many events are kept")


class EventDeliveryConfig(Model):
    backoff: Duration = Field(0.5, gt=0, description="wait after a failed webhook post, doubled each time")
    max_backoff: Duration = Field(60.0, gt=0, description="the longest wait between two tries")
    max_attempts: int = Field(
        20, ge=1, le=10_000, description="posts of one event before it goes to the dead letters"
    )
    max_age: Duration = Field(
        3600.0, gt=0, description="time since an event's first failed post before it goes to the dead letters"
    )
    lease: Duration = Field(
        15.0, gt=0, description="how long a worker owns a subscription without renewing it"
    )


class EventStreamsConfig(Model):
    """Live streams (SSE, WebSocket) each hold a connection and a page of events: capped."""

    max_per_worker: int = Field(1000, ge=1, description="beyond it, 503 STREAMS_AT_CAPACITY")
    max_per_key: int = Field(100, ge=1, description="per caller (key, client, token); beyond it, 429")


class EventsConfig(Model):
    log: str = Field(
        "events",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="name of the log: the SQLite table's suffix, the Redis key, the NATS stream",
    )
    retention: EventRetentionConfig = EventRetentionConfig()
    dedupe_window: Duration = Field(
        120.0, gt=0, description="an event_id published again within this window is not stored twice"
    )
    max_payload: Size = Field(256 * 1024, gt=0, description="largest event (as JSON) accepted")
    heartbeat: Duration = Field(15.0, gt=0, description="idle live streams get a heartbeat this often")
    delivery: EventDeliveryConfig = EventDeliveryConfig()
    streams: EventStreamsConfig = EventStreamsConfig()
    webhooks: dict[ServiceName, WebhookConfig] = Field({}, description="subscriptions declared in config")


class OutboundConfig(Model):
    """Where webhooks and job callbacks may be posted. Link-local, metadata and unspecified
    addresses are always refused unless an `allow` CIDR inside them names them."""

    allow: list[str] = Field(
        [],
        description="when set, only these: CIDRs (10.0.0.0/8) or host names (hooks.example.com, *.example.com)",
    )
    deny: list[str] = Field([], description="never these (CIDRs or host names); wins over allow")

    @model_validator(mode="after")
    def _entries(self) -> OutboundConfig:
        OutboundPolicy.of(self.allow, self.deny)  # raises naming a bad entry
        return self

    @property
    def policy(self) -> OutboundPolicy:
        """The lists compiled (once: `OutboundPolicy.of` keeps what it compiled)."""
        return OutboundPolicy.of(self.allow, self.deny)


class SpendConfig(Model):
    """How LLM spend is estimated before a call and held against budgets."""

    default_output_tokens: int = Field(
        1024, ge=0, description="output estimate of a chat request without max_tokens / max_completion_tokens"
    )
    hold_for: Duration = Field(
        900.0, gt=0, description="a reservation not settled by then (a gateway died) is released"
    )


class Config(Model):
    listen: Listen = "127.0.0.1:8080"
    state: str = Field(
        "sqlite:///./bridgeway.db",
        description="memory://, sqlite:///path.db (embedded default) or redis://host:port/db",
    )
    max_header_size: Size = 64 * 1024
    admin: AdminConfig = AdminConfig()
    auth: AuthConfig = AuthConfig()
    roles: dict[str, RoleConfig] = {}
    clients: dict[ServiceName, ClientConfig] = {}
    logging: LoggingConfig = LoggingConfig()
    audit: AuditConfig = AuditConfig()
    cache: CacheMemoryConfig = CacheMemoryConfig()
    services: dict[ServiceName, ServiceConfig] = {}
    models: dict[str, ModelGroupConfig] = Field({}, description="the LLM router's public model names")
    routing: dict[str, RouterConfig] = Field(
        {}, description="router names (e.g. auto) that choose a model group from request metadata"
    )
    jobs: JobsConfig = JobsConfig()
    events: EventsConfig = EventsConfig()
    outbound: OutboundConfig = OutboundConfig()
    spend: SpendConfig = SpendConfig()

    queues: dict[QueueName, QueueConfig] = Field({}, description="durable job queues")

    @model_validator(mode="after")
    def _webhooks_allowed(self) -> Config:
        policy = self.outbound.policy
        for name, hook in self.events.webhooks.items():
            if not (verdict := check_url(hook.url, policy)).allowed:
                raise ValueError(
                    f"events.webhooks.{name}.url: refused by the outbound policy: {verdict.reason}"
                )
        return self

    @model_validator(mode="after")
    def _known_roles(self) -> Config:
        for name, queue in self.queues.items():
            if queue.deliver is not None and queue.deliver.service not in self.services:
                raise ValueError(f"queues.{name}.deliver.service: no service named {queue.deliver.service!r}")
        for name, client in self.clients.items():
            if client.role != "admin" and client.role not in self.roles:
                raise ValueError(f"clients.{name}.role: no role named {client.role!r}")
        for name, group in self.models.items():
            for other in group.fallbacks:
                if other not in self.models or other == name:
                    raise ValueError(f"models.{name}.fallbacks: no other model group named {other!r}")
        for name, router in self.routing.items():
            if name in self.models:
                raise ValueError(f"routing.{name}: the name is already a model group's")
            for i, rule in enumerate(router.rules):
                if rule.model not in self.models:
                    raise ValueError(f"routing.{name}.rules.{i}.model: no model group named {rule.model!r}")
            if router.default not in self.models:
                raise ValueError(f"routing.{name}.default: no model group named {router.default!r}")
        return self

    @property
    def jobs_backend(self) -> str:
        """The URL the queues and the event log use."""
        if self.jobs.backend:
            return self.jobs.backend
        return "sqlite:///:memory:" if self.state.startswith("memory:") else self.state

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])
