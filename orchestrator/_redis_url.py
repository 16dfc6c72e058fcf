"""Where Redis is: one URL, plain or through Sentinel, read here for every client.

`ORCHESTRATOR_REDIS_URL` (and `ORCHESTRATOR_BROKER_URL`) take either form:

    redis://[[user]:password@]host:6379/0                 one server (rediss:// for TLS)
    redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/mymaster/0
        [?sentinel_password=...&sentinel_username=...]

The Sentinel form names the sentinels (comma-separated, port 26379 if left out), the
service they monitor (`mymaster`) and the database (0 if left out). The user and password
are those of the primary and its replicas; sentinels that require a password of their own
get it as `sentinel_password` (and `sentinel_username`). Every Redis client the
orchestrator makes comes from here: the state store and the catalog (redis-py's
`Sentinel(...).master_for(service)`), and Celery's broker and result backend (kombu's and
Celery's `sentinel://h1:p1/0;sentinel://h2:p2/0` with `master_name` and `sentinel_kwargs`
in their transport options). So all of them ask the sentinels where the primary is when a
connection breaks, and follow a failover without a restart.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# Asking a sentinel where the primary is must not hang on one that does not answer, nor
# retry it: the next sentinel is asked instead. redis-py's defaults for these clients are
# no timeout at all and three retries with backoff from 1 s, which made every lookup wait
# ~30 s when no sentinel answered (and seconds per dead sentinel during a failover).
SENTINEL_SOCKET_TIMEOUT = 2.0
_QUERY = ("sentinel_username", "sentinel_password")


@dataclasses.dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    userinfo: str = ""  # as written (percent-encoded), for the URLs made from this one

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection options for the sentinels themselves (not for the primary)."""
        kwargs: dict[str, Any] = {"socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT,
                                  "socket_timeout": SENTINEL_SOCKET_TIMEOUT,
                                  "retry": Retry(NoBackoff(), 0)}
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        if self.sentinel_username is not None:
            kwargs["username"] = self.sentinel_username
        return kwargs


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel(url: str) -> SentinelURL:
    """The parts of a `redis+sentinel://` URL; ValueError, naming what is wrong, if bad."""
    if not is_sentinel(url):
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    sentinels = tuple(_host_port(h) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ValueError(f"{SENTINEL_SCHEME}:// URL names no sentinel (host:port,...)")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"{SENTINEL_SCHEME}:// URL must end in /<service>[/<db>], "
                         f"e.g. /mymaster/0")
    service = unquote(parts[0])
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ValueError(f"{SENTINEL_SCHEME}:// URL database {parts[1]!r} "
                         f"is not a number") from None
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_QUERY))
    if unknown:
        raise ValueError(f"{SENTINEL_SCHEME}:// URL has unknown options {unknown}; "
                         f"known: {list(_QUERY)}")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return SentinelURL(sentinels, service, db, username, password,
                       options.get("sentinel_username") or None,
                       options.get("sentinel_password") or None, userinfo)


def _host_port(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [::1]:26379
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"sentinel address {text!r} has no host")
    try:
        return host, int(port) if port else SENTINEL_PORT
    except ValueError:
        raise ValueError(f"sentinel address {text!r}: port is not a number") from None


def check(url: str) -> None:
    """Refuse a Sentinel URL nothing could connect with, before anything starts with it."""
    if is_sentinel(url):
        parse_sentinel(url)


def client(url: str, **options: Any) -> redis.Redis:
    """A redis-py client for `url`: a plain one, or one that asks the sentinels for the
    primary on every new connection (so a broken connection finds the promoted replica).
    `options` are connection options (timeouts, retry) for the primary's connections."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    s = parse_sentinel(url)
    sentinel = Sentinel(list(s.sentinels), sentinel_kwargs=s.sentinel_kwargs(), **options)
    return sentinel.master_for(s.service, db=s.db, username=s.username, password=s.password)


def celery_url(url: str) -> tuple[str, dict[str, Any]]:
    """The URL kombu (broker) and Celery (result backend) take for `url`, and the transport
    options it needs: unchanged for a plain URL; for Sentinel, one `sentinel://` URL per
    sentinel joined by `;` (each carrying the primary's credentials and the database), with
    `master_name` and `sentinel_kwargs` as options."""
    if not is_sentinel(url):
        return url, {}
    s = parse_sentinel(url)
    auth = f"{s.userinfo}@" if s.userinfo else ""
    urls = ";".join(f"sentinel://{auth}{_netloc(host, port)}/{s.db}"
                    for host, port in s.sentinels)
    return urls, {"master_name": s.service, "sentinel_kwargs": s.sentinel_kwargs()}


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redact(url: str) -> str:
    """The URL without its passwords, for error messages and logs."""
    if is_sentinel(url):
        try:
            s = parse_sentinel(url)
        except ValueError:
            return f"{SENTINEL_SCHEME}://(unparsable URL)"
        user = quote(s.username or "", safe="")
        auth = "" if not s.userinfo else (f"{user}:***@" if s.password is not None
                                           else f"{user}@")
        hosts = ",".join(_netloc(h, p) for h, p in s.sentinels)
        query = {k: ("***" if k == "sentinel_password" else v)
                 for k, v in (("sentinel_username", s.sentinel_username),
                              ("sentinel_password", s.sentinel_password)) if v is not None}
        tail = f"?{urlencode(query, safe='*')}" if query else ""
        return f"{SENTINEL_SCHEME}://{auth}{hosts}/{quote(s.service, safe='')}/{s.db}{tail}"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
