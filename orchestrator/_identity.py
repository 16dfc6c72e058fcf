"""Users, groups and API tokens, kept in Redis beside the catalog.

Keys (P is `Settings.key_prefix`):
    P users     hash  name -> JSON {"password": argon2id hash, "groups": [...], "role": ...,
                                   "created": epoch seconds}
    P tokens    hash  sha256(token) hex -> JSON {"user": name, "created": epoch seconds}

Passwords are hashed with argon2id (argon2-cffi's `PasswordHasher`, its default
parameters); a token is `secrets.token_urlsafe(32)`, shown once, and only its SHA-256 is
stored (a token has 256 random bits: a fast hash is enough, and lets a lookup be one HGET).
Removing a user revokes their tokens.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ._stores.base import StoreUnavailable
from ._stores.redis import connect, redact, unavailable_as_store_error

Rows = list[dict[str, Any]]
ROLES = ("viewer", "operator", "admin")  # each may do what the ones before it may
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

__all__ = ["ROLES", "StoreUnavailable", "UnknownToken", "UnknownUser", "User", "UserExists",
           "Users"]


class UnknownUser(LookupError):
    """No user of that name (CLI exit 3)."""


class UnknownToken(LookupError):
    """No such token, or revoked already (CLI exit 3)."""


class UserExists(ValueError):
    """A user of that name exists already (CLI exit 2)."""


@dataclass(frozen=True)
class User:
    name: str
    role: str = "viewer"
    groups: tuple[str, ...] = ()
    created: float = 0.0
    password_hash: str = field(default="", repr=False)

    def may(self, role: str) -> bool:
        """This user's role is `role` or above it (viewer < operator < admin)."""
        return ROLES.index(self.role) >= ROLES.index(role)

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "groups": list(self.groups),
                "created": self.created}


def check_name(kind: str, name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"{kind} name {name!r} must be 1-64 letters, digits, '.', '_', '@' "
                         f"or '-', starting with a letter or digit")
    return name


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """The user and token store. Errors: UnknownUser, UserExists, ValueError (bad name,
    role or empty password), StoreUnavailable (Redis down)."""

    def __init__(self, client: redis.Redis | None = None, key_prefix: str = "orchestrator:",
                 *, url: str = "redis://127.0.0.1:6379/0",
                 hasher: PasswordHasher | None = None) -> None:
        self.redis = client or connect(url)
        self.safe_url = redact(url)
        self.users_key = f"{key_prefix}users"
        self.tokens_key = f"{key_prefix}tokens"
        self.hasher = hasher or PasswordHasher()

    # ---- users --------------------------------------------------------------------------

    @unavailable_as_store_error
    def add(self, name: str, password: str, *, groups: tuple[str, ...] | list[str] = (),
            role: str = "viewer") -> User:
        check_name("user", name)
        for g in groups:
            check_name("group", g)
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not password:
            raise ValueError("an empty password is refused")
        user = User(name, role, tuple(sorted(set(groups))), time.time(),
                    self.hasher.hash(password))
        doc = json.dumps({"password": user.password_hash, "groups": list(user.groups),
                          "role": user.role, "created": user.created})
        if not self.redis.hsetnx(self.users_key, name, doc):
            raise UserExists(f"user {name!r} exists already")
        return user

    @unavailable_as_store_error
    def get(self, name: str) -> User:
        raw = self.redis.hget(self.users_key, name)
        if raw is None:
            raise UnknownUser(f"no user {name!r}")
        return _user(name, raw)

    @unavailable_as_store_error
    def find(self, name: str) -> User | None:
        raw = self.redis.hget(self.users_key, name)
        return None if raw is None else _user(name, raw)

    @unavailable_as_store_error
    def list(self) -> list[User]:
        raw = self.redis.hgetall(self.users_key)
        return sorted((_user(_text(k), v) for k, v in raw.items()), key=lambda u: u.name)

    @unavailable_as_store_error
    def remove(self, name: str) -> int:
        """Remove the user and revoke their tokens; how many tokens went."""
        if not self.redis.hdel(self.users_key, name):
            raise UnknownUser(f"no user {name!r}")
        return self._drop_tokens(lambda owner: owner == name)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user if `password` is theirs; None otherwise (unknown user included)."""
        user = self.find(name)
        if user is None or not password:
            # As long as a real check, so a probe cannot tell which names exist.
            with contextlib.suppress(VerificationError):
                self.hasher.verify(_dummy_hash(), password or "-")
            return None
        try:
            self.hasher.verify(user.password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return user

    # ---- tokens -------------------------------------------------------------------------

    @unavailable_as_store_error
    def create_token(self, name: str) -> str:
        """A new API token for user `name`: returned once, only its hash is kept."""
        self.get(name)
        token = secrets.token_urlsafe(32)
        self.redis.hset(self.tokens_key, token_digest(token),
                        json.dumps({"user": name, "created": time.time()}))
        return token

    @unavailable_as_store_error
    def user_for_token(self, token: str) -> User | None:
        """The user a token belongs to; None for an unknown or revoked token, or one whose
        user was removed."""
        raw = self.redis.hget(self.tokens_key, token_digest(token))
        if raw is None:
            return None
        return self.find(json.loads(raw)["user"])

    @unavailable_as_store_error
    def revoke(self, token_or_id: str) -> None:
        """Revoke a token, given the token itself or its id (the hash `tokens list` shows,
        or a unique start of it of at least 8 characters)."""
        digest = token_digest(token_or_id)
        if self.redis.hdel(self.tokens_key, digest):
            return
        ids = [i for i in map(_text, self.redis.hkeys(self.tokens_key))
               if len(token_or_id) >= 8 and i.startswith(token_or_id)]
        if len(ids) > 1:
            raise ValueError(f"{token_or_id!r} starts more than one token id")
        if not ids or not self.redis.hdel(self.tokens_key, ids[0]):
            raise UnknownToken("no such token (revoked already?)")

    @unavailable_as_store_error
    def tokens(self, name: str | None = None) -> Rows:
        """Token ids (their hashes) with owner and creation time; never the tokens."""
        rows = []
        for k, v in self.redis.hgetall(self.tokens_key).items():
            doc = json.loads(v)
            if name is None or doc["user"] == name:
                rows.append({"id": _text(k), "user": doc["user"], "created": doc["created"]})
        return sorted(rows, key=lambda r: (r["user"], r["created"]))

    def _drop_tokens(self, owned: Any) -> int:
        gone = [k for k, v in self.redis.hgetall(self.tokens_key).items()
                if owned(json.loads(v)["user"])]
        return int(self.redis.hdel(self.tokens_key, *gone)) if gone else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _user(name: str, raw: bytes | str) -> User:
    doc = json.loads(raw)
    return User(name, doc.get("role", "viewer"), tuple(doc.get("groups", ())),
                float(doc.get("created", 0.0)), doc["password"])


@functools.cache
def _dummy_hash() -> str:
    return PasswordHasher().hash("not a password anybody has")
