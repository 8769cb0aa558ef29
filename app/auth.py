"""`Authorization: Basic base64("<key>:")` -> the key's record, or a 401 that says what is wrong."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time

from app.crypto import KeyHasher
from app.errors import UnauthorizedError, UnavailableError
from app.keys import KeyRecord, key_id_of
from app.store import Store

# One answer whether the key is malformed, not in the store or its secret part wrong: which of them is not said.
UNKNOWN_KEY = "Unknown API key: check the key in the destination's settings in Segment (segrelay issued it)"


def api_key_from_header(header: str | None) -> str:
    if not header:
        raise UnauthorizedError("Missing Authorization header: expected Basic base64(\"<API key>:\")")
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise UnauthorizedError("Authorization must use the Basic scheme with the API key as username")
    credentials = credentials.strip()
    try:
        decoded = base64.b64decode(credentials + "=" * (-len(credentials) % 4), validate=True).decode()
    except (binascii.Error, ValueError):
        raise UnauthorizedError("Authorization credentials are not valid base64") from None
    key, colon, _ = decoded.partition(":")
    if not colon:
        raise UnauthorizedError("Authorization credentials must be \"<API key>:\" (the colon is missing)")
    if not key:
        raise UnauthorizedError("API key is empty: paste the key segrelay issued into the destination settings")
    return key


class Authenticator:
    """Verifies keys against the store, caching records briefly (revocation takes effect within `ttl`)."""

    def __init__(self, store: Store, hasher: KeyHasher, ttl: float = 5.0, timeout: float = 3.0) -> None:
        self._store, self._hasher, self._ttl, self._timeout = store, hasher, ttl, timeout
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        # Authorization headers that matched their key's record lately: the same header again within `ttl` is the
        # same key, so neither its base64 nor its HMAC is computed again (kept in memory only, like the key itself).
        self._verified: dict[str, tuple[float, KeyRecord]] = {}

    def verified(self, header: str | None, now: float) -> KeyRecord | None:
        """The key of a header that matched its record within `ttl` (checked as `authenticate` would), else None:
        the accept path's usual case, without a coroutine."""
        verified = self._verified.get(header) if header else None
        if verified is not None and verified[0] > now:
            return _usable(verified[1], now)
        return None

    async def authenticate(self, header: str | None, now: float | None = None) -> KeyRecord:
        now = time.time() if now is None else now
        return self.verified(header, now) or await self.verify(header, now)

    async def verify(self, header: str | None, now: float) -> KeyRecord:
        """`authenticate` once `verified` has not vouched for the header: decode it, look the key up (cached for
        `ttl`), compare its HMAC."""
        key = api_key_from_header(header)
        key_id = key_id_of(key)
        if key_id is None:
            raise UnauthorizedError(UNKNOWN_KEY)
        record = await self._lookup(key_id, now)
        if record is None or not self._hasher.matches(key, record.digest):
            raise UnauthorizedError(UNKNOWN_KEY)
        if self._ttl > 0 and header:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[header] = (self._cache[key_id][0], record)  # trusted as long as the record is
        return _usable(record, now)

    async def _lookup(self, key_id: str, now: float) -> KeyRecord | None:
        cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            record = await asyncio.wait_for(self._store.find_key(key_id), timeout=self._timeout)
        except TimeoutError:
            raise UnavailableError("Storage is slow to answer; retry later", retry_after=5) from None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key_id] = (now + self._ttl, record)
        return record


def _usable(record: KeyRecord, now: float) -> KeyRecord:
    if record.revoked:
        raise UnauthorizedError("API key revoked: paste a current key into the destination's settings in Segment")
    if record.expires_at is not None and record.expires_at <= now:
        raise UnauthorizedError("API key expired: paste a current key into the destination's settings in Segment")
    return record
