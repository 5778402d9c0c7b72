"""Users' passwords and sessions.

Passwords are stored as salted scrypt hashes. Verifying a hash costs tens of milliseconds on
purpose, so a verified ``user:password`` session is cached (keyed by a fast digest of the session, never
the session itself) for ``ttl`` seconds; a password change drops the user's cached sessions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.errors import AuthError

_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_PREFIX = "scrypt"


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return f"{_PREFIX}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        prefix, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if prefix != _PREFIX:
        return False
    digest = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt_b64), **_SCRYPT)
    return hmac.compare_digest(digest, base64.b64decode(digest_b64))


def random_password() -> str:
    return secrets.token_urlsafe(18)


def split_session(session: object) -> tuple[str, str]:
    """``user:password`` -> (user, password). The password may itself contain colons."""
    if not isinstance(session, str) or ":" not in session:
        raise AuthError("[one.auth] Session string must be \"user:password\"")
    user, password = session.split(":", 1)
    if not user:
        raise AuthError("[one.auth] Session string has no user name")
    return user, password


@dataclass
class SessionCache:
    """Remembers sessions whose password was verified, for ``ttl`` seconds of the injected clock."""

    clock: Callable[[], float]
    ttl: float = 300.0
    _entries: dict[bytes, tuple[int, float]] = field(default_factory=dict)

    @staticmethod
    def _key(session: str) -> bytes:
        return hashlib.blake2b(session.encode(), digest_size=32).digest()

    def lookup(self, session: str) -> int | None:
        entry = self._entries.get(self._key(session))
        if entry is None:
            return None
        user_id, expires = entry
        if self.clock() >= expires:
            self._entries.pop(self._key(session), None)
            return None
        return user_id

    def remember(self, session: str, user_id: int) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[self._key(session)] = (user_id, self.clock() + self.ttl)

    def forget_user(self, user_id: int) -> None:
        self._entries = {k: v for k, v in self._entries.items() if v[0] != user_id}
