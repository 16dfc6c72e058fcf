"""Who is asking: console sessions, API tokens, a trusted proxy's header, and the CSRF
tokens and login slow-down that keep them honest.

Sessions live in Redis (P console:session:<sha256 of the cookie>), not in a signed
cookie: signing out, removing a user or changing their role takes effect on the next
request, and a stolen Redis dump holds no usable cookie. The user is read afresh on every
request for the same reason.

Keys (P is `Settings.key_prefix`):
    P console:session:<digest>   JSON {"user", "csrf", "created"}, TTL SESSION_TTL
    P console:failures:<name>    failed sign-ins for a name, TTL FAILURE_WINDOW
    P console:failures-ip:<addr> failed sign-ins from an address, TTL FAILURE_WINDOW
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass, field

import redis
from starlette.requests import Request

from .._identity import User, Users
from ._service import Identity

SESSION_COOKIE = "orchestrator_session"
LOGIN_CSRF_COOKIE = "orchestrator_login_csrf"
SESSION_TTL = 8 * 3600
FAILURE_WINDOW = 15 * 60
FREE_FAILURES = 3  # failures before each next answer is delayed
MAX_DELAY = 8.0
LOCK_AFTER = 20  # failures for one name or address in the window: refuse outright

__all__ = ["Auth", "AuthOptions", "Session"]


@dataclass(frozen=True)
class AuthOptions:
    trust_header: str | None = None  # e.g. X-Forwarded-User, behind a single sign-on proxy
    trusted_proxies: tuple[str, ...] = ()  # addresses or networks that may set it
    secure_cookies: bool = False  # served over TLS (directly or by the proxy)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies]


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str
    created: float = field(default_factory=time.time)


class Auth:
    def __init__(self, users: Users, options: AuthOptions) -> None:
        self.users = users
        self.redis: redis.Redis = users.redis
        self.options = options
        self.prefix = users.users_key[: -len("users")] + "console:"
        self._proxies = options.networks()

    # ---- identities ---------------------------------------------------------------------

    def console_identity(self, request: Request) -> Identity | None:
        """The signed-in user of a console request (session cookie, or a trusted proxy's
        header); None when nobody is."""
        proxied = self.proxied_user(request)
        if proxied is not None:
            return Identity(proxied, "console")
        session = self.session(request)
        if session is None:
            return None
        user = self.users.find(session.user)
        return None if user is None else Identity(user, "console")

    def api_identity(self, request: Request) -> Identity | None:
        """The user of an API request: a bearer token; else the console's own session (its
        pages read the API to update live; writes then need the CSRF header too)."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            user = self.users.user_for_token(token.strip())
            return None if user is None else Identity(user, "api")
        return self.console_identity(request)

    def presented_token(self, request: Request) -> bool:
        return request.headers.get("authorization", "").lower().startswith("bearer ")

    def proxied_user(self, request: Request) -> User | None:
        """The user a trusted proxy names, only when the header is enabled and the request
        comes from a listed proxy address."""
        header = self.options.trust_header
        if not header or not self.from_trusted_proxy(request):
            return None
        name = request.headers.get(header, "").strip()
        return self.users.find(name) if name else None

    def from_trusted_proxy(self, request: Request) -> bool:
        if request.client is None:
            return False
        try:
            addr = ipaddress.ip_address(request.client.host)
        except ValueError:
            return False
        return any(addr in net for net in self._proxies)

    # ---- sessions -----------------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return None
        raw = self.redis.get(self._session_key(cookie))
        if raw is None:
            return None
        doc = json.loads(raw)
        return Session(doc["user"], doc["csrf"], doc["created"])

    def open_session(self, user: User) -> tuple[str, Session]:
        """A new session for `user`: (the cookie value, the session)."""
        cookie = secrets.token_urlsafe(32)
        session = Session(user.name, secrets.token_urlsafe(32))
        self.redis.set(self._session_key(cookie),
                       json.dumps({"user": session.user, "csrf": session.csrf,
                                   "created": session.created}), ex=SESSION_TTL)
        return cookie, session

    def close_session(self, request: Request) -> None:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            self.redis.delete(self._session_key(cookie))

    def _session_key(self, cookie: str) -> str:
        return f"{self.prefix}session:{hashlib.sha256(cookie.encode()).hexdigest()}"

    # ---- CSRF ---------------------------------------------------------------------------

    def csrf_token(self, request: Request) -> str | None:
        """The token a form of this request must carry back: the session's, or for the
        sign-in form the one in its own cookie."""
        session = self.session(request)
        if session is not None:
            return session.csrf
        return request.cookies.get(LOGIN_CSRF_COOKIE)

    def csrf_ok(self, request: Request, presented: str | None) -> bool:
        """A state-changing console request carries its session's token. A trusted-proxy
        user is given a session on their first page (the pages open it), so the proxy's
        own cookie is never enough to post."""
        expected = self.csrf_token(request)
        return bool(expected and presented and hmac.compare_digest(expected, presented))

    # ---- sign-in slow-down ----------------------------------------------------------------

    def delay_for(self, name: str, addr: str) -> tuple[float, bool]:
        """(seconds to wait before answering a sign-in, locked out) from recent failures
        for the name and from the address."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self._failures("failures", name))
        pipe.get(self._failures("failures-ip", addr))
        worst = max(int(n or 0) for n in pipe.execute())
        if worst >= LOCK_AFTER:
            return 0.0, True
        if worst < FREE_FAILURES:
            return 0.0, False
        return min(MAX_DELAY, 0.25 * 2 ** (worst - FREE_FAILURES)), False

    def failed(self, name: str, addr: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for kind, who in (("failures", name), ("failures-ip", addr)):
            pipe.incr(self._failures(kind, who))
            pipe.expire(self._failures(kind, who), FAILURE_WINDOW)
        pipe.execute()

    def succeeded(self, name: str) -> None:
        self.redis.delete(self._failures("failures", name))

    def _failures(self, kind: str, who: str) -> str:
        digest = hashlib.sha256(who.encode()).hexdigest()[:32]  # any text, bounded key
        return f"{self.prefix}{kind}:{digest}"
