"""Keys derived from the server secret: AES-GCM for stored payloads, HMAC for API keys."""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE = 12


def derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"segrelay/" + purpose).derive(secret)


class Sealer:
    """Encrypts payloads at rest: nonce || AES-256-GCM(payload)."""

    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(derive(secret, b"payload/v1"))

    def seal(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, None)

    def open(self, sealed: bytes) -> bytes:
        return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], None)


class KeyHasher:
    """HMAC-SHA256 of API keys under a key derived from the server secret."""

    def __init__(self, secret: bytes) -> None:
        self._key = derive(secret, b"api-key/v1")

    def digest(self, api_key: str) -> str:
        return hmac.new(self._key, api_key.encode(), hashlib.sha256).hexdigest()

    def matches(self, api_key: str, stored: str) -> bool:
        return hmac.compare_digest(self.digest(api_key), stored)
