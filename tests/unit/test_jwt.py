"""JWT verification and the gateway's signing keys: real crypto, a real JWKS server on loopback,
an injected clock for every time rule."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pydantic import ValidationError

from bridgeway.config.models import AuthConfig, JwtConfig, JwtIssuerConfig
from bridgeway.security.jwt import InvalidToken, JwtVerifier, SigningKeys
from bridgeway.state import open_state

ISS = "https://issuer.example"
SECRET = "s" * 40
LOCAL = "https://gateway.local"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
KEYS = {"RS256": (RSA_KEY, RSAAlgorithm), "ES256": (EC_KEY, ECAlgorithm), "EdDSA": (ED_KEY, OKPAlgorithm)}


def pem(private) -> str:
    return private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def public_jwk(kind: str, kid: str, private=None, **extra) -> dict:
    private = private or KEYS[kind][0]
    return {**KEYS[kind][1].to_jwk(private.public_key(), as_dict=True), "kid": kid, "use": "sig", **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def by_hand(header: dict, payload: dict, secret: bytes | None) -> str:
    """A token PyJWT refuses to make: unsigned, or HMAC keyed with whatever bytes we like."""
    head = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if secret is None else hmac.new(secret, head.encode(), hashlib.sha256).digest()
    return f"{head}.{b64(signature)}"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """A real issuer endpoint: serves `document`, counts fetches, can fail or be slow."""

    def __init__(self) -> None:
        self.document: dict = {"keys": []}
        self.fetches = 0
        self.status = 200
        self.delay = 0.0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response(self.document)


@pytest.fixture
async def server():
    jwks = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks", jwks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    jwks.url = f"http://127.0.0.1:{runner.addresses[0][1]}/jwks"
    jwks.document = {"keys": [public_jwk(alg, alg.lower()) for alg in KEYS]}
    yield jwks
    await runner.cleanup()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def make(clock):
    """make(*issuers, **kwargs) -> a JwtVerifier on the test clock, closed at teardown."""
    made: list[JwtVerifier] = []

    def factory(*issuers: JwtIssuerConfig, **kwargs) -> JwtVerifier:
        verifier = JwtVerifier(list(issuers), clock=clock, **kwargs)
        made.append(verifier)
        return verifier

    yield factory
    for verifier in made:
        await verifier.aclose()


@pytest.fixture
def remote(server, make):
    return make(JwtIssuerConfig(issuer=ISS, jwks=server.url, audience="bridgeway"))


def claims(clock: Clock, **overrides) -> dict:
    base = {"iss": ISS, "sub": "svc-1", "aud": "bridgeway", "exp": int(clock.now) + 300, "jti": "j-1"}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def sign(alg: str, payload: dict, kid: str | None = None, key=None) -> str:
    key = key or (SECRET if alg == "HS256" else KEYS[alg][0])
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid or alg.lower()})


async def refused(verifier: JwtVerifier, token: str, reason: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    assert caught.value.reason == reason
    if len(token) > 3:
        assert token not in str(caught.value) and token not in repr(caught.value.args)


# --- valid tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_valid_tokens_through_a_jwks(remote, server, clock, alg):
    found = await remote.verify(sign(alg, claims(clock)))
    assert (found.issuer, found.subject, found.jti) == (ISS, "svc-1", "j-1")
    assert found.expires_at == int(clock.now) + 300 and found.raw["aud"] == "bridgeway"
    assert server.fetches == 1


async def test_hs256_through_a_configured_secret(make, clock):
    verifier = make(JwtIssuerConfig(issuer=ISS, secret=SECRET))
    assert (await verifier.verify(sign("HS256", claims(clock)))).subject == "svc-1"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_a_static_pem_public_key(make, clock, alg):
    verifier = make(JwtIssuerConfig(issuer=ISS, public_key=pem(KEYS[alg][0])))
    assert (await verifier.verify(sign(alg, claims(clock)))).subject == "svc-1"
    other = {"RS256": "ES256", "ES256": "EdDSA", "EdDSA": "RS256"}[alg]
    await refused(verifier, sign(other, claims(clock)), "algorithm not allowed")


async def test_audience_is_checked_only_when_configured(make, clock):
    listed = make(JwtIssuerConfig(issuer=ISS, secret=SECRET, audience=["a", "bridgeway"]))
    assert await listed.verify(sign("HS256", claims(clock, aud=["x", "bridgeway"])))
    await refused(listed, sign("HS256", claims(clock, aud="elsewhere")), "wrong audience")
    await refused(listed, sign("HS256", claims(clock, aud=None)), "wrong audience")
    open_ = make(JwtIssuerConfig(issuer=ISS, secret=SECRET))
    assert await open_.verify(sign("HS256", claims(clock, aud="anyone")))


# --- attacks and failures --------------------------------------------------------------------


async def test_unsigned_alg_none_is_refused_without_fetching(remote, server, make, clock):
    for header in ({"alg": "none", "kid": "rs256"}, {"alg": "none"}, {"alg": "None", "kid": "rs256"}):
        await refused(remote, by_hand(header, claims(clock), None), "algorithm not allowed")
    assert server.fetches == 0
    hs = make(JwtIssuerConfig(issuer=ISS, secret=SECRET))
    await refused(hs, by_hand({"alg": "none"}, claims(clock), None), "algorithm not allowed")


async def test_algorithm_confusion_public_key_as_hmac_secret(remote, make, clock):
    forged = by_hand({"alg": "HS256", "kid": "rs256", "typ": "JWT"}, claims(clock), pem(RSA_KEY).encode())
    await refused(remote, forged, "algorithm not allowed")
    static = make(JwtIssuerConfig(issuer=ISS, public_key=pem(RSA_KEY)))
    await refused(static, forged, "algorithm not allowed")
    # and the other way round: an asymmetric token for a shared-secret issuer
    hs = make(JwtIssuerConfig(issuer=ISS, secret=SECRET))
    await refused(hs, sign("RS256", claims(clock)), "algorithm not allowed")


async def test_a_token_whose_alg_does_not_match_its_keys_type_is_refused(remote, clock):
    # kid of the Ed25519 key, alg of RSA: the key decides, not the header
    await refused(remote, sign("RS256", claims(clock), kid="eddsa"), "algorithm not allowed")


async def test_a_key_embedded_in_the_header_is_not_trusted(remote, clock):
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    headers = {"kid": "rs256", "jwk": public_jwk("RS256", "rs256", private=attacker), "jku": "http://evil/"}
    forged = jwt.encode(claims(clock), attacker, algorithm="RS256", headers=headers)
    await refused(remote, forged, "bad signature")


async def test_unknown_kid_refetches_once_then_is_throttled(remote, server, clock):
    await remote.verify(sign("EdDSA", claims(clock)))
    assert server.fetches == 1
    clock.now += 1
    await refused(remote, sign("EdDSA", claims(clock), kid="made-up-1"), "unknown kid")
    assert server.fetches == 2  # exactly one refetch
    for i in range(5):
        await refused(remote, sign("EdDSA", claims(clock), kid=f"made-up-{i + 2}"), "unknown kid")
    assert server.fetches == 2  # throttled
    clock.now += 10
    await refused(remote, sign("EdDSA", claims(clock), kid="made-up-9"), "unknown kid")
    assert server.fetches == 3


async def test_tampered_payload_and_signature(remote, clock):
    token = sign("RS256", claims(clock))
    head, payload, signature = token.split(".")
    forged_payload = b64(json.dumps(claims(clock, sub="admin")).encode())
    await refused(remote, f"{head}.{forged_payload}.{signature}", "bad signature")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[10] ^= 1
    await refused(remote, f"{head}.{payload}.{b64(bytes(raw))}", "bad signature")
    await refused(remote, f"{head}.{payload}.", "bad signature")


async def test_expiry_and_not_before_follow_the_injected_clock_with_leeway(make, clock):
    verifier = make(JwtIssuerConfig(issuer=ISS, secret=SECRET, leeway="30s"))
    now = int(clock.now)
    await refused(verifier, sign("HS256", claims(clock, exp=now - 31)), "expired")
    assert await verifier.verify(sign("HS256", claims(clock, exp=now - 29)))  # within leeway
    await refused(verifier, sign("HS256", claims(clock, nbf=now + 31)), "not yet valid")
    assert await verifier.verify(sign("HS256", claims(clock, nbf=now + 29)))
    await refused(verifier, sign("HS256", claims(clock, iat=now + 31)), "not yet valid")
    token = sign("HS256", claims(clock, exp=now + 100))
    assert await verifier.verify(token)
    clock.now += 131  # past exp + leeway
    await refused(verifier, token, "expired")


async def test_the_verified_token_cache_does_not_outlive_exp(make, clock):
    verifier = make(JwtIssuerConfig(issuer=ISS, secret=SECRET, leeway=0))
    token = sign("HS256", claims(clock, exp=int(clock.now) + 20))
    assert await verifier.verify(token)
    clock.now += 20
    await refused(verifier, token, "expired")


async def test_missing_or_malformed_claims(make, clock):
    verifier = make(JwtIssuerConfig(issuer=ISS, secret=SECRET))
    await refused(verifier, sign("HS256", claims(clock, exp=None)), "missing exp")
    await refused(verifier, sign("HS256", claims(clock, exp="soon")), "invalid claims")
    await refused(verifier, sign("HS256", claims(clock, exp=True)), "invalid claims")
    await refused(verifier, sign("HS256", claims(clock, sub=None)), "missing subject")


async def test_wrong_and_unknown_issuers(server, make, clock):
    verifier = make(
        JwtIssuerConfig(issuer=ISS, jwks=server.url),
        JwtIssuerConfig(issuer="https://other.example", public_key=pem(ed25519.Ed25519PrivateKey.generate())),
    )
    # signed by ISS's key, claiming to come from the other issuer
    await refused(verifier, sign("EdDSA", claims(clock, iss="https://other.example")), "bad signature")
    await refused(verifier, sign("EdDSA", claims(clock, iss="https://evil.example")), "unknown issuer")
    await refused(verifier, sign("EdDSA", claims(clock, iss=None)), "unknown issuer")
    await refused(verifier, by_hand({"alg": "EdDSA"}, claims(clock, iss=["x"]), None), "unknown issuer")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "x.y.z",
        "a.b.c.d",
        "!!!.***.$$$",
        "....",
        b64(b"not json") + ".e30.",
        "e30.bm90IGpzb24.",
        "ü.ü.ü",
    ],
)
async def test_garbage_is_a_malformed_token(remote, server, token):
    await refused(remote, token, "malformed token")
    assert server.fetches == 0


async def test_symmetric_and_encryption_keys_from_a_remote_jwks_are_ignored(remote, server, clock):
    server.document["keys"] += [
        {"kty": "oct", "k": b64(SECRET.encode()), "kid": "oct1", "alg": "HS256"},
        public_jwk("RS256", "enc1", use="enc"),
        public_jwk("RS256", "wrong-alg", alg="PS256"),
        {**RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True), "kid": "leaked"},  # private material published
        public_jwk("RS256", "weak", private=rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    ]
    await refused(remote, sign("HS256", claims(clock), kid="oct1"), "algorithm not allowed")
    assert await remote.verify(sign("RS256", claims(clock)))
    # none of them was loaded as anything else either
    for kid in ("oct1", "enc1", "wrong-alg", "leaked", "weak"):
        await refused(remote, sign("RS256", claims(clock), kid=kid), "unknown kid")


async def test_a_rotated_issuer_key_is_picked_up_without_restart(remote, server, clock):
    assert await remote.verify(sign("RS256", claims(clock)))
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server.document = {"keys": [public_jwk("RS256", "rs256-v2", private=new)]}
    clock.now += 5
    found = await remote.verify(sign("RS256", claims(clock, jti="j-2"), kid="rs256-v2", key=new))
    assert found.jti == "j-2" and server.fetches == 2


async def test_concurrent_verifications_with_a_cold_cache_share_one_fetch(remote, server, clock):
    server.delay = 0.05
    tokens = [sign(alg, claims(clock, jti=f"j-{i}")) for i in range(10) for alg in KEYS]
    results = await asyncio.gather(*(remote.verify(t) for t in tokens))
    assert len(results) == 30 and server.fetches == 1


async def test_concurrent_unknown_kids_share_one_refetch(remote, server, clock):
    await remote.verify(sign("RS256", claims(clock)))
    server.delay = 0.05
    tokens = [sign("RS256", claims(clock), kid=f"nope-{i}") for i in range(10)]
    results = await asyncio.gather(*(remote.verify(t) for t in tokens), return_exceptions=True)
    assert {r.reason for r in results} == {"unknown kid"} and server.fetches == 2


async def test_an_unreachable_jwks_is_retried_on_the_next_token(remote, server, clock):
    server.status = 500
    await refused(remote, sign("ES256", claims(clock)), "issuer keys unavailable")
    await refused(remote, sign("ES256", claims(clock)), "issuer keys unavailable")
    assert server.fetches == 2
    server.status = 200
    assert await remote.verify(sign("ES256", claims(clock)))


async def test_a_cached_jwks_keeps_serving_while_the_issuer_is_down(server, make, clock):
    verifier = make(JwtIssuerConfig(issuer=ISS, jwks=server.url, jwks_cache="60s"))
    await verifier.verify(sign("ES256", claims(clock, jti="a")))
    server.status = 503
    clock.now += 61
    assert await verifier.verify(sign("ES256", claims(clock, jti="b")))
    assert server.fetches == 2  # it tried, failed, and used the keys it had


@pytest.mark.parametrize(
    "document", [[], {"keys": "x"}, {"nokeys": []}, {"keys": [], "pad": "x" * (1 << 20)}]
)
async def test_a_broken_jwks_document_gives_issuer_keys_unavailable(remote, server, clock, document):
    server.document = document
    await refused(remote, sign("ES256", claims(clock)), "issuer keys unavailable")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
_jwk_fields = {
    f: _json | st.sampled_from(["RSA", "EC", "OKP", "oct", "P-256", "Ed25519", "sig"])
    for f in ("kty", "crv", "use", "alg", "kid", "x", "n", "e")
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(_json | st.fixed_dictionaries({}, optional=_jwk_fields), max_size=4))
async def test_junk_keys_beside_a_good_one_leave_the_good_one_usable(make, clock, junk):
    async def fetch(url: str) -> dict:
        return {"keys": [*junk, public_jwk("EdDSA", "eddsa")]}

    verifier = make(JwtIssuerConfig(issuer=ISS, jwks="https://issuer.example/jwks"), fetch=fetch)
    assert (await verifier.verify(sign("EdDSA", claims(clock)))).subject == "svc-1"


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(remote, server, clock):
    server.delay = 0.1
    first = asyncio.create_task(remote.verify(sign("ES256", claims(clock, jti="a"))))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(remote.verify(sign("ES256", claims(clock, jti="b"))))
    await asyncio.sleep(0.02)
    first.cancel()
    assert (await second).jti == "b" and server.fetches == 1


async def test_nothing_listens_gives_issuer_keys_unavailable(make, clock):
    verifier = make(JwtIssuerConfig(issuer=ISS, jwks="http://127.0.0.1:9/jwks"))
    await refused(verifier, sign("ES256", claims(clock)), "issuer keys unavailable")


async def test_a_repeated_token_is_served_from_the_verified_cache(server, make, clock):
    verifier = make(JwtIssuerConfig(issuer=ISS, jwks=server.url, jwks_cache="1s"))
    token = sign("RS256", claims(clock))
    first = await verifier.verify(token)
    clock.now += 2  # the JWKS is stale now; a full verification would fetch it again
    assert await verifier.verify(token) is first and server.fetches == 1
    clock.now += 60  # the cache trusts a token for at most a minute
    assert await verifier.verify(token) == first and server.fetches == 2


# --- role mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "default", "role"),
    [
        ("platform-admin", None, "admin"),
        ("reader platform-ops", None, "operator"),  # space-separated: first match wins
        (["unknown", "platform-ops", "platform-admin"], None, "operator"),
        ("unknown", None, None),  # nothing maps and no default: refused later (403)
        ("unknown", "guest", "guest"),
        (None, "guest", "guest"),
        (42, None, None),
    ],
)
async def test_role_mapping(make, clock, value, default, role):
    config = JwtIssuerConfig(
        issuer=ISS,
        secret=SECRET,
        role_claim="groups",
        roles={"platform-admin": "admin", "platform-ops": "operator"},
        default_role=default,
    )
    assert (await make(config).verify(sign("HS256", claims(clock, groups=value)))).role == role


async def test_subject_from_another_claim(make, clock):
    verifier = make(JwtIssuerConfig(issuer=ISS, secret=SECRET, subject_claim="client_id"))
    assert (await verifier.verify(sign("HS256", claims(clock, client_id="agent-7")))).subject == "agent-7"


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one of jwks, secret or public_key"),
        ({"secret": SECRET, "public_key": pem(ED_KEY)}, "got secret and public_key"),
        ({"secret": "short"}, "at least 32 bytes"),
        ({"jwks": "https://i.example/jwks", "algorithms": ["HS256"]}, "HS256 goes with a secret"),
        ({"secret": SECRET, "algorithms": ["RS256"]}, "HS256 goes with a secret"),
        ({"jwks": "ftp://i.example/jwks"}, "is not a JWKS URL"),
        ({"public_key": "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----"}, "not a PEM public key"),
        ({"public_key": pem(ec.generate_private_key(ec.SECP384R1()))}, "must be RSA"),
        ({"public_key": pem(ED_KEY), "algorithms": ["RS256"]}, "is EdDSA, not in algorithms"),
        ({"jwks": "https://i.example/jwks", "leeway": "soon"}, "is not a duration"),
    ],
)
def test_issuer_config_is_validated(fields, message):
    with pytest.raises(ValidationError, match=message):
        JwtIssuerConfig(issuer=ISS, **fields)


def test_auth_config_carries_jwt_issuers():
    assert AuthConfig().jwt.issuers == []
    auth = AuthConfig.model_validate(
        {"jwt": {"issuers": [{"issuer": ISS, "jwks": "https://i.example/jwks", "leeway": "5s"}]}}
    )
    assert auth.jwt.issuers[0].leeway == 5.0 and auth.jwt.issuers[0].jwks_cache == 300.0
    with pytest.raises(ValidationError, match="listed twice"):
        JwtConfig(issuers=[{"issuer": ISS, "secret": SECRET}, {"issuer": ISS, "secret": SECRET}])
    with pytest.raises(ValidationError, match="Extra inputs"):
        JwtIssuerConfig(issuer=ISS, secret=SECRET, jku="https://x")


# --- the gateway's own keys ------------------------------------------------------------------


class Interleaved:
    """The memory KV, yielding to the event loop before each call: MemoryKV never suspends, so
    without this two "replicas" in one loop would take turns instead of racing."""

    def __init__(self) -> None:
        self.kv = open_state("memory://")

    async def get(self, *args, **kwargs):
        await asyncio.sleep(0)
        return await self.kv.get(*args, **kwargs)

    async def put(self, *args, **kwargs):
        await asyncio.sleep(0)
        return await self.kv.put(*args, **kwargs)


@pytest.fixture
def kv():
    return Interleaved()


def local_claims(clock: Clock, **overrides) -> dict:
    return {
        "iss": LOCAL,
        "sub": "client-1",
        "role": "analyst",
        "exp": int(clock.now) + 3 * 86400,
        **overrides,
    }


async def test_sign_and_verify_through_the_local_issuer(kv, make, clock):
    keys = SigningKeys(kv, clock=clock)
    verifier = make(local=keys, local_issuer=LOCAL)
    token = await keys.sign(local_claims(clock, jti="t-1"))
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    found = await verifier.verify(token)
    assert (found.issuer, found.subject, found.role, found.jti) == (LOCAL, "client-1", "analyst", "t-1")
    entry = await kv.get("_signing", "keyring")
    assert json.loads(entry.value)["keys"][0]["kid"] == jwt.get_unverified_header(token)["kid"]
    # an HS256 token keyed with our public key bytes is still algorithm confusion
    public = (await keys.current()).public_key.public_bytes_raw()
    forged = by_hand({"alg": "HS256", "kid": (await keys.current()).kid}, local_claims(clock), public)
    await refused(verifier, forged, "algorithm not allowed")
    await refused(verifier, await keys.sign(local_claims(clock, exp=None)), "missing exp")


async def test_rotation_keeps_the_old_key_within_overlap_then_drops_it(kv, make, clock):
    keys = SigningKeys(kv, overlap=86400, clock=clock)
    old_token = await keys.sign(local_claims(clock))
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    new_kid = await keys.rotate()
    assert new_kid != old_kid
    assert [k["kid"] for k in (await keys.jwks())["keys"]] == [new_kid, old_kid]
    assert jwt.get_unverified_header(await keys.sign(local_claims(clock)))["kid"] == new_kid
    clock.now += 86400 - 100
    assert await make(local=keys, local_issuer=LOCAL).verify(old_token)
    clock.now += 101
    await refused(make(local=keys, local_issuer=LOCAL), old_token, "unknown kid")
    jwks = await keys.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [new_kid]
    assert jwks["keys"][0] | {"x": "?"} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": "?",
        "kid": new_kid,
        "alg": "EdDSA",
        "use": "sig",
    }
    assert "d" not in jwks["keys"][0]


async def test_the_current_key_rotates_itself_when_old(kv, clock):
    keys = SigningKeys(kv, rotate_every=7 * 86400, clock=clock)
    first = await keys.current()
    clock.now += 7 * 86400 - 1
    assert (await keys.current()).kid == first.kid
    clock.now += 1
    second = await keys.current()
    assert second.kid != first.kid and await keys.public_key(first.kid) is not None


async def test_replicas_agree_on_one_key_and_see_each_others_rotation(kv, make, clock):
    a, b = SigningKeys(kv, clock=clock), SigningKeys(kv, clock=clock)
    first_a, first_b = await asyncio.gather(a.current(), b.current())  # both race to create it
    assert first_a.kid == first_b.kid
    assert len(json.loads((await kv.get("_signing", "keyring")).value)["keys"]) == 1
    new_kid = await a.rotate()
    token = await a.sign(local_claims(clock))
    assert (await make(local=b, local_issuer=LOCAL).verify(token)).subject == "client-1"  # b reloads for it
    clock.now += 5
    assert (await b.current()).kid == new_kid  # b's cached ring expired: it signs with the new key too


async def test_concurrent_auto_rotation_by_replicas_makes_one_new_key(kv, clock):
    a, b = SigningKeys(kv, clock=clock), SigningKeys(kv, clock=clock)
    await asyncio.gather(a.current(), b.current())
    clock.now += 8 * 86400
    new_a, new_b = await asyncio.gather(a.current(), b.current())
    assert new_a.kid == new_b.kid
    assert len((await a.jwks())["keys"]) == 2


async def test_unknown_local_kid_and_a_configured_issuer_clash(kv, make, clock):
    keys = SigningKeys(kv, clock=clock)
    verifier = make(local=keys, local_issuer=LOCAL)
    forged = jwt.encode(local_claims(clock), ed25519.Ed25519PrivateKey.generate(), "EdDSA", {"kid": "nope"})
    await refused(verifier, forged, "unknown kid")
    with pytest.raises(ValueError, match="both configured"):
        JwtVerifier([JwtIssuerConfig(issuer=LOCAL, secret=SECRET)], local=keys, local_issuer=LOCAL)
