"""API keys on the in-memory state backend with an injected clock."""

from __future__ import annotations

import pytest

from bridgeway.security.keys import KeyStore
from bridgeway.state import open_state


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store():
    clock = Clock()
    return KeyStore(open_state("memory://"), clock=clock), clock


async def test_a_created_key_authenticates_and_only_its_hash_is_stored(store):
    keys, _ = store
    token, record = await keys.create("ci", "analyst", services=["sim"])
    assert token.startswith(f"bw_{record.id}_")
    found = await keys.authenticate(token)
    assert found is not None and (found.name, found.role, found.services) == ("ci", "analyst", ("sim",))
    entry = await keys.kv.get("_keys", record.id)
    secret = token.split("_", 2)[2]
    assert secret.encode() not in entry.value  # the secret itself is never stored
    assert "secret_sha256" not in record.public() and "previous_sha256" not in record.public()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # wrong secret
        lambda t: "bw_0000000000_" + t.split("_", 2)[2],  # unknown id
        lambda t: t.removeprefix("bw_"),  # not a key at all
        lambda t: "",
        lambda t: "bw_short_x",
    ],
)
async def test_wrong_tokens_are_refused(store, mangle):
    keys, _ = store
    token, _ = await keys.create("ci", "analyst")
    assert await keys.authenticate(mangle(token)) is None


async def test_expiry_and_revocation(store):
    keys, clock = store
    token, record = await keys.create("temp", "analyst", expires_in=60)
    clock.now += 59
    assert await keys.authenticate(token) is not None
    clock.now += 2
    assert await keys.authenticate(token) is None
    token, record = await keys.create("ci", "analyst")
    revoked = await keys.revoke(record.id)
    assert revoked is not None and revoked.revoked_at == clock.now
    assert await keys.authenticate(token) is None
    assert await keys.revoke("0000000000") is None


async def test_rotation_keeps_the_old_key_for_the_grace_period(store):
    keys, clock = store
    old, record = await keys.create("svc", "analyst")
    new, rotated = await keys.rotate(record.id, grace=300)
    assert new != old and rotated.id == record.id
    assert await keys.authenticate(new) is not None
    assert await keys.authenticate(old) is not None  # within the grace period
    clock.now += 301
    assert await keys.authenticate(old) is None
    assert await keys.authenticate(new) is not None
    await keys.revoke(record.id)
    assert await keys.rotate(record.id, grace=10) is None  # a revoked key is not brought back


async def test_list_shows_every_key(store):
    keys, _ = store
    ids = {(await keys.create(f"k{i}", "analyst"))[1].id for i in range(7)}
    assert {r.id for r in await keys.list()} == ids
