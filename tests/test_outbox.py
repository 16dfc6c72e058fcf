"""The outbox: where the broker is the store's own Redis, a create or a commit writes its
messages itself (one atomic script), instead of a publish after it."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from orchestrator import Settings, create_app
from orchestrator import _engine as engine
from orchestrator._engine import Revoke, SendFork, SendTask
from orchestrator._records import BranchResult, StepPolicy, Task
from orchestrator._registry import spec_of
from orchestrator._stores import Outbox, RedisStore
from tests import flows
from tests.conftest import step_queue

WF = flows.three_steps


def _commands(run_id: str) -> list[engine.Command]:
    step = Task(step="A", token=3, attempt=2, policy=StepPolicy(timeout=5))
    branches = (Task(step="A", token=4, branch="x"), Task(step="A", token=4, branch="y"))
    return [SendTask(run_id, WF.name, step, WF.version_id),
            SendFork(run_id, WF.name, 4, branches, WF.version_id)]


def _queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The queue's messages with their bodies decoded, minus what differs between two
    sends of the same task: the delivery tag, the fork's group id, and the args' repr
    that a publish also copies into the properties."""
    found = []
    for raw in client.lrange(queue, 0, -1):
        msg = json.loads(raw)
        msg["body"] = json.loads(base64.b64decode(msg["body"]))
        for key in ("delivery_tag", "argsrepr", "kwargsrepr"):
            msg["properties"].pop(key, None)
        if msg["headers"]["group"] is not None:
            msg["headers"]["group"] = "<group>"
        found.append(msg)
    return found


def _chord_keys(client: redis.Redis) -> list[tuple[str, Any, bool]]:
    """Each key of Celery's chord counters: its suffix, value and whether it expires."""
    keys = [k.decode() if isinstance(k, bytes) else k
            for k in client.keys("celery-taskset-meta-*")]
    return sorted((k.rsplit(".", 1)[1], client.get(k), client.ttl(k) > 0) for k in keys)


def _new_run(run_id: str) -> tuple[Any, list[dict[str, Any]]]:
    d = engine.start(spec_of(WF), run_id, {}, {}, 1.0)
    assert d.record is not None
    return d.record, d.history


def _stored(redis_url: str, run_id: str) -> tuple[RedisStore, Any, int]:
    """A store with run `run_id` created in it: the store, the record, its version."""
    store = RedisStore(redis_url, "t:")
    record, history = _new_run(run_id)
    assert store.create(record, history, None)
    return store, record, store.load(run_id).version


def test_outbox_messages_are_the_ones_celery_publishes(redis_url: str,
                                                       rclient: redis.Redis) -> None:
    """Field by field, after a round trip through a create script: so a Celery or kombu
    upgrade that changes its message format fails here, not in a worker."""
    app = create_app(Settings(redis_url=redis_url), [WF], import_modules=False)
    dispatcher = app.runtime.dispatcher
    queue = step_queue(WF)

    dispatcher.send(_commands("run1"))  # Celery's own send_task and chord size
    published, published_chord = _queued(rclient, queue), _chord_keys(rclient)
    rclient.flushdb()

    revoke = Revoke("run1", (Task(step="A", token=1),))
    built = dispatcher.outbox([*_commands("run1"), revoke])
    assert built is not None
    outbox, rest = built
    assert rest == [revoke]  # not a message: carried out after the commit
    record, history = _new_run("run1")
    assert RedisStore(redis_url, "t:").create(record, history, None, outbox)

    assert _queued(rclient, queue) == published
    assert len(published) == 3 and published[0]["headers"]["group_index"] == 1
    # A fork's branches are a group; its count is the store's, not Celery's backend's.
    assert published[0]["body"][2]["chord"] is None
    assert _chord_keys(rclient) == published_chord == []


def test_a_commit_that_loses_its_version_race_sends_nothing(redis_url: str,
                                                            rclient: redis.Redis) -> None:
    store, record, version = _stored(redis_url, "run2")
    outbox = Outbox((("q", "push", "one"), ("q2", "push", "two")))

    assert not store.commit(record, version + 1, record, [], None, None, outbox)
    assert rclient.llen("q") == 0 and rclient.llen("q2") == 0

    assert store.commit(record, version, record, [{"event": "x"}], None, None, outbox)
    assert rclient.lrange("q", 0, -1) == [b"one"] and rclient.lrange("q2", 0, -1) == [b"two"]
    assert store.history("run2")[-1]["event"] == "x"  # the entries before the outbox's
    # A start that finds its run id taken sends nothing either.
    assert not store.create(record, [], None, outbox)
    assert rclient.llen("q") == 1


def test_only_a_store_on_the_brokers_redis_sends_for_it(redis_url: str) -> None:
    assert RedisStore(redis_url, "t:").sends_for(redis_url)
    assert not RedisStore(redis_url, "t:").sends_for(redis_url.rsplit("/", 1)[0] + "/9")
    # Messages must wait for the replicas to have the commit they follow.
    assert not RedisStore(redis_url, "t:", min_replicas_ack=1).sends_for(redis_url)
    # A store on a client it was given may be anywhere.
    assert not RedisStore(redis_url, "t:", client=redis.Redis.from_url(redis_url)).sends_for(
        redis_url)


def test_a_publish_that_would_do_more_is_not_replaced(redis_url: str) -> None:
    """Sent events, a key prefix on the broker: a publish applies them, so the messages go
    out by publishing after the commit."""
    commands = _commands("run3")
    plain = create_app(Settings(redis_url=redis_url), [WF], import_modules=False)
    assert plain.runtime.dispatcher.outbox(commands) is not None
    assert plain.runtime.dispatcher.outbox([Revoke("run3", ())]) is None  # nothing to write

    events = create_app(Settings(redis_url=redis_url, task_events=True), [WF],
                        import_modules=False)
    assert events.runtime.dispatcher.outbox(commands) is None

    prefixed = create_app(Settings(redis_url=redis_url), [WF], import_modules=False)
    prefixed.conf.broker_transport_options = {"global_keyprefix": "x:"}
    assert prefixed.runtime.dispatcher.outbox(commands) is None


def test_a_commit_that_ends_the_run_announces_it_in_the_same_step(redis_url: str,
                                                                 rclient: redis.Redis) -> None:
    store, record, version = _stored(redis_url, "run4")
    pubsub = rclient.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("t:ended:{run4}")
    assert pubsub.get_message(timeout=1) is None  # the subscription is confirmed

    assert store.commit(record, version, record, [], None, None, Outbox(announce_end=True))
    heard = pubsub.get_message(timeout=5)
    assert heard is not None and heard["data"] == b"ended"
    assert not store.commit(record, version, record, [], None, None, Outbox(announce_end=True))
    assert pubsub.get_message(timeout=0.2) is None  # a commit that lost says nothing
    pubsub.close()


def test_a_join_reads_the_results_and_the_run_in_one_go(redis_url: str,
                                                       rclient: redis.Redis) -> None:
    store, _, _ = _stored(redis_url, "run5")
    done = BranchResult(output={"n": 1}, finished_at=2.0)
    rclient.hset("t:run:{run5}:fork:7", "a", done.model_dump_json())
    loaded, results = store.load_joining("run5", 7)
    assert results == {"a": done}
    assert (loaded.record, loaded.version, results) == (
        store.load("run5").record, store.load("run5").version, store.branch_results("run5", 7))
    assert loaded.record is not None and loaded.record.run_id == "run5"
