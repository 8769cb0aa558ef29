"""The key check: a header verified once is trusted as long as its key's record is (SEGRELAY_KEY_CACHE_SECONDS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.auth import Authenticator
from app.crypto import KeyHasher
from app.errors import UnauthorizedError
from app.keys import new_key
from app.store import Store, open_store
from tests.support import SECRET, basic

NOW = 1_800_000_000.0


class CountingHasher(KeyHasher):
    def __init__(self, secret: bytes) -> None:
        super().__init__(secret)
        self.digests = 0

    def digest(self, api_key: str) -> str:
        self.digests += 1
        return super().digest(api_key)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    yield opened
    await opened.close()


async def issue(store: Store, hasher: KeyHasher, tenant: str = "acme", expires_at: float | None = None) -> str:
    """A key saved in the store (its record's id is the key's); a counting hasher starts counting after it."""
    key, record = new_key(hasher, tenant, NOW, expires_at, ())
    await store.save_key(record)
    if isinstance(hasher, CountingHasher):
        hasher.digests = 0
    return key


async def test_a_header_verified_once_is_not_hashed_again_until_the_record_is_read_again(store: Store) -> None:
    hasher = CountingHasher(SECRET.encode())
    key = await issue(store, hasher)
    auth = Authenticator(store, hasher, ttl=5.0)
    for offset in (0.0, 1.0, 4.9):
        assert (await auth.authenticate(basic(key), now=NOW + offset)).tenant == "acme"
    assert hasher.digests == 1
    await auth.authenticate(basic(key), now=NOW + 5.1)  # the record was read again: so is the key checked
    assert hasher.digests == 2


async def test_a_forged_key_with_a_known_id_is_refused_even_after_the_real_one(store: Store) -> None:
    hasher = KeyHasher(SECRET.encode())
    key = await issue(store, hasher)
    auth = Authenticator(store, hasher, ttl=5.0)
    await auth.authenticate(basic(key), now=NOW)
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with pytest.raises(UnauthorizedError, match="Unknown API key"):
        await auth.authenticate(basic(forged), now=NOW + 1)


async def test_revocation_and_expiry_reach_a_verified_header_within_the_cache_time(store: Store) -> None:
    hasher = KeyHasher(SECRET.encode())
    key = await issue(store, hasher, expires_at=NOW + 100)
    auth = Authenticator(store, hasher, ttl=5.0)
    record = await auth.authenticate(basic(key), now=NOW)
    await store.revoke_key(record.key_id)
    await auth.authenticate(basic(key), now=NOW + 1)  # within the cache time: as documented
    with pytest.raises(UnauthorizedError, match="API key revoked"):
        await auth.authenticate(basic(key), now=NOW + 6)
    other = await issue(store, hasher, "beta", expires_at=NOW + 3)
    await auth.authenticate(basic(other), now=NOW)
    with pytest.raises(UnauthorizedError, match="API key expired"):
        await auth.authenticate(basic(other), now=NOW + 3.5)  # expiry is checked on every request


async def test_with_no_cache_every_request_is_checked(store: Store) -> None:
    hasher = CountingHasher(SECRET.encode())
    key = await issue(store, hasher)
    auth = Authenticator(store, hasher, ttl=0.0)
    for _ in range(3):
        await auth.authenticate(basic(key), now=NOW)
    assert hasher.digests == 3
