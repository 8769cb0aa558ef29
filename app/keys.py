"""API keys segrelay issues to its customers: `sr_<key id>_<secret>`, stored only as an HMAC."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from app.crypto import KeyHasher

_FORMAT = re.compile(r"^sr_([a-z0-9]{12})_[A-Za-z0-9_-]{32,}$")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    tenant: str
    digest: str
    created_at: float
    expires_at: float | None = None
    vendors: tuple[str, ...] = ()  # empty: every vendor
    revoked: bool = False

    def public(self) -> dict[str, object]:
        return {"key_id": self.key_id, "tenant": self.tenant, "created_at": self.created_at,
                "expires_at": self.expires_at, "vendors": list(self.vendors), "revoked": self.revoked}


def new_key(hasher: KeyHasher, tenant: str, now: float, expires_at: float | None,
            vendors: tuple[str, ...]) -> tuple[str, KeyRecord]:
    key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    key = f"sr_{key_id}_{secrets.token_urlsafe(32)}"
    return key, KeyRecord(key_id, tenant, hasher.digest(key), now, expires_at, vendors)


def key_id_of(key: str) -> str | None:
    """The non-secret lookup id carried by a key, or None when it is not one of ours."""
    match = _FORMAT.match(key)
    return match.group(1) if match else None
