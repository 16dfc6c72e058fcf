"""ORCHESTRATOR_REDIS_URL's two forms, and what each client is made from them."""

from __future__ import annotations

import time

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from orchestrator import Settings
from orchestrator import _redis_url as urls
from orchestrator._stores.redis import connect, redact

FULL = ("redis+sentinel://orch:p%40ss@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/3"
        "?sentinel_password=s3cret&sentinel_username=watch")


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    s = urls.parse_sentinel(FULL)
    assert s.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (s.service, s.db, s.username, s.password) == ("mymaster", 3, "orch", "p@ss")
    assert (s.sentinel_username, s.sentinel_password) == ("watch", "s3cret")
    short = urls.parse_sentinel("redis+sentinel://h1:1,h2:2/svc")
    assert (short.db, short.username, short.password, short.sentinel_password) == (
        0, None, None, None)
    assert urls.parse_sentinel("redis+sentinel://:pw@h/svc/0").password == "pw"


@pytest.mark.parametrize("url, problem", [
    ("redis+sentinel://h1:26379", "/<service>"),
    ("redis+sentinel://h1:26379/svc/x", "not a number"),
    ("redis+sentinel://h1:port/svc", "port is not a number"),
    ("redis+sentinel:///svc", "names no sentinel"),
    ("redis+sentinel://h/svc/0?master=x", "unknown options"),
])
def test_a_bad_sentinel_url_is_refused_with_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        urls.parse_sentinel(url)
    with pytest.raises(ValueError, match="ORCHESTRATOR_REDIS_URL"):
        Settings(redis_url=url)


def test_celery_gets_kombus_sentinel_form_and_transport_options() -> None:
    settings = Settings(redis_url=FULL)
    conf = settings.celery_config()
    chunks = ["sentinel://orch:p%40ss@10.0.0.1:26379/3", "sentinel://orch:p%40ss@10.0.0.2:26379/3",
              "sentinel://orch:p%40ss@[::1]:26380/3"]
    assert conf["broker_url"] == conf["result_backend"] == ";".join(chunks)
    for key in ("broker_transport_options", "result_backend_transport_options"):
        options = conf[key]
        assert options["master_name"] == "mymaster"
        assert options["sentinel_kwargs"]["password"] == "s3cret"
        assert options["sentinel_kwargs"]["username"] == "watch"
        assert options["sentinel_kwargs"]["socket_timeout"] > 0
        assert options["visibility_timeout"] == settings.visibility_timeout
    # A broker of its own keeps its own form.
    amqp = Settings(redis_url=FULL, broker_url="amqp://guest@h//").celery_config()
    assert amqp["broker_url"] == "amqp://guest@h//"
    assert "master_name" not in amqp["broker_transport_options"]
    assert amqp["result_backend_transport_options"]["master_name"] == "mymaster"
    plain = Settings(redis_url="redis://h:1/0").celery_config()
    assert plain["broker_url"] == plain["result_backend"] == "redis://h:1/0"


def test_the_celery_app_uses_celerys_sentinel_backend_and_kombus_sentinel_transport() -> None:
    from celery.backends.redis import SentinelBackend

    from orchestrator import create_app

    app = create_app(Settings(redis_url="redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/0",
                              workflows=()))
    assert isinstance(app.backend, SentinelBackend)
    with app.connection_for_write() as conn:
        assert conn.transport_cls == "sentinel"


def test_the_store_client_asks_the_sentinels_for_the_primary() -> None:
    client = connect("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/svc/4")
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "svc"
    assert pool.connection_kwargs["db"] == 4 and pool.connection_kwargs["password"] == "pw"
    # Nobody answers on those ports: unreachable, and quickly (redis-py's own retries of
    # the sentinel clients made this ~30 s).
    began = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert time.monotonic() - began < 5


def test_passwords_are_redacted() -> None:
    assert redact(FULL) == ("redis+sentinel://orch:***@10.0.0.1:26379,10.0.0.2:26379,"
                            "[::1]:26380/mymaster/3?sentinel_username=watch&sentinel_password=***")
    assert "s3cret" not in redact(FULL) and "p%40ss" not in redact(FULL)
    assert redact("redis+sentinel://h/svc") == "redis+sentinel://h:26379/svc/0"
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
