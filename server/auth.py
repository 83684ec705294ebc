"""API keys: one checker for both transports, comparing in constant time."""

from __future__ import annotations

import hmac

from tokenrm.server.errors import Unauthenticated


class KeyChecker:
    """Accepts `Bearer <key>` for any configured key; with no keys configured, accepts all."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode()
        # Compare against every key, always, so timing says nothing about which one is close.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not matched:
            raise Unauthenticated("a valid API key is required: 'Authorization: Bearer <key>'")
