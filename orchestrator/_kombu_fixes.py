"""Two patches for kombu's Redis transport (checked against kombu 5.7.0, the newest).

The first, a compat fix.

Workers died when Redis restarted under load: `CRITICAL Unrecoverable error:
AttributeError("'NoneType' object has no attribute 'hostname'")`. The sequence, in celery's
`Consumer.on_connection_error_after_connected` (celery/worker/consumer/consumer.py:476-487):

1. `connection.collect()` closes the channels. The task channel's first close fails with a
   connection error before it reaches its QoS (a BRPOP was in flight:
   kombu/transport/redis.py `Channel.close` reads it first), so its unacked deliveries are
   not yet restored. `Transport.close_connection` then stops at the first channel whose close
   raises (the pidbox or gossip channel deleting its auto-delete fanout queue), and
   `Connection._do_close_transport` (kombu/connection.py:429) sets `transport.client = None`.
2. `connection.close()` closes the task channel again. This time it gets as far as
   `QoS.restore_unacked_once` (virtual/base.py:300) -> `QoS.restore_unacked`
   (redis.py:494) -> `Channel._create_client` -> `Channel._connparams` (redis.py:1959),
   which reads `self.connection.client.hostname` from the detached transport.
3. The AttributeError is not a connection error, so neither `Connection.maybe_close_channel`
   nor celery's `ignore_errors` swallow it, and the worker stops. Idle workers survive
   because with no unacked delivery `restore_unacked_once` returns before connecting.

The same dereference fails the same way in kombu #582 (Gossip's channel close). The fix: a
channel whose connection has been closed raises the connection error it really is, which
every caller already handles. Nothing is lost by not restoring there: Redis is unreachable
at that moment anyway, the deliveries stay in the `unacked` hash until `restore_visible`
brings them back after `visibility_timeout`, and our coordinator re-dispatches a lost step
after `redispatch_after` (the fencing token makes any duplicate harmless).

A second patch, for speed: kombu's Redis channel builds a new `redis.Redis` client for every
message it publishes (`Channel.conn_or_acquire` -> `_create_client`), and a client's
constructor fills its table of ~170 response callbacks each time: a fifth of the CPU of
sending one task. `reuse_client(channel)` makes a channel keep the client it made and hand it
out again while its connection pool is the same one (a client is only a handle on that
pool, safe across threads; kombu replaces the pool after a disconnect, and then a new client
is made). Only the channels our dispatcher publishes on, and a worker's task channel (its
acks and the unacked index of each delivery, made the same way), get it, not every kombu
channel of the process (another Celery app in it is left as kombu made it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_installed = False


def install() -> None:
    """Patch kombu's Redis channel once per process (create_app calls this)."""
    global _installed
    if _installed:
        return
    channel: Any = kombu_redis.Channel  # the stubs do not declare its private methods
    original = channel._connparams

    @functools.wraps(original)
    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError(
                "kombu channel used after its broker connection was closed")
        return original(self, asynchronous)

    channel._connparams = _connparams

    _installed = True


def reuse_client(chan: object) -> None:
    """Make a kombu Redis channel reuse one client for its publishes (see above)."""
    if not isinstance(chan, kombu_redis.Channel) or "conn_or_acquire" in vars(chan):
        return
    channel: Any = chan  # the stubs do not declare its private methods

    @contextlib.contextmanager
    def conn_or_acquire(client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = channel.pool
        cached = vars(channel).get("_orchestrator_client")
        if cached is None or cached.connection_pool is not pool:
            cached = channel._orchestrator_client = channel._create_client()
        yield cached

    channel.conn_or_acquire = conn_or_acquire
