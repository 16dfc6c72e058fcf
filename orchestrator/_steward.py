"""The Steward: a registry of workflows, published to Redis so apps can find them by name.

Every worker and coordinator process announces itself with a lease (`CatalogHeartbeat`,
a Celery bootstep): the workflow entries, which of them it executes, and its recovery
settings. The lease is renewed every third of its TTL and the entries are rewritten where
missing, so a Redis that lost its data is repaired within one heartbeat, and a host that
stops renewing drops out of the catalog after the TTL. An app that never imports the
workflow code reads the catalog, validates input against the published JSON schema and
starts runs by name.

Keys (P is `Settings.key_prefix`):
    P catalog        hash  workflow name -> CatalogEntry JSON (hosts left empty)
    P catalog:live   zset  host -> when its lease expires (Redis TIME, seconds)
    P catalog:hosts  hash  host -> {"serves": {name: version}, "settings": {...},
                                    "coordinator": bool}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis
from celery import bootsteps
from celery.utils.nodenames import default_nodename, host_format
from pydantic import BaseModel

from . import _graph
from ._config import COORDINATOR_QUEUE, Settings
from ._definition import Workflow
from ._dispatch.base import broker_queues
from ._records import FlowSpec, StepPolicy, StepSpec
from ._registry import spec_of
from ._stores.redis import connect

log = logging.getLogger("orchestrator.steward")

DEFAULT_KEY_PREFIX = Settings().key_prefix
# The recovery settings a Client takes from the cluster: the timers it records when it
# starts a run must be the ones the coordinators act on.
CLUSTER_SETTINGS = ("redispatch_after", "join_after", "lease_ttl")


def catalog_key(key_prefix: str = DEFAULT_KEY_PREFIX) -> str:
    return f"{key_prefix}catalog"


class CatalogEntry(BaseModel):
    """What the catalog says about one workflow; `hosts` are the live hosts executing it."""

    name: str
    description: str
    version: str
    key_prefix: str
    input_schema: dict[str, Any]
    state_schema: dict[str, Any]
    graph: dict[str, list[str]]
    shape: dict[str, dict[str, Any]] = {}  # each step's next steps, fork branches, gate
    queues: dict[str, str]
    steps: dict[str, dict[str, Any]]
    imperative: bool
    initial_state: dict[str, Any]
    events: dict[str, dict[str, Any] | None] = {}  # event name -> payload schema (None: any)
    content_hash: str = ""  # the definition's hash, whatever its version label
    hosts: list[str] = []
    versions: dict[str, list[str]] = {}  # every version live hosts serve -> those hosts
    published_at: float = 0.0

    def spec(self) -> FlowSpec:
        """The engine's view, rebuilt from the catalog (no reducers: starting needs none)."""
        return FlowSpec(self.name, self.version,
                        {n: StepSpec(StepPolicy.model_validate(o["policy"]), o.get("route"))
                         for n, o in self.steps.items()})


class Steward:
    """`steward.register(wf)` (also usable as a decorator on a function returning one)."""

    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._workflows: dict[str, Workflow] = {}
        for wf in workflows:
            self.register(wf)

    def register(self, wf: Workflow) -> Workflow:
        wf.check_complete()
        known = self._workflows.get(wf.name)
        if known is not None and known.content_hash != wf.content_hash:
            raise ValueError(f"the Steward already has a different workflow named {wf.name!r}")
        self._workflows[wf.name] = wf
        return wf

    def __iter__(self) -> Any:
        return iter(self._workflows.values())

    def __len__(self) -> int:
        return len(self._workflows)

    def get(self, name: str) -> Workflow:
        return self._workflows[name]

    def publish(self, client: redis.Redis, host: str | None = None, *,
                settings: Settings | None = None) -> list[CatalogEntry]:
        return publish(client, self._workflows.values(), host, settings=settings)


def entry_of(wf: Workflow) -> CatalogEntry:
    spec = spec_of(wf)
    return CatalogEntry(
        name=wf.name, description=wf.description, version=wf.version_id,
        content_hash=wf.content_hash,
        key_prefix=wf.persistence_options.key_prefix,
        input_schema=wf.input_model.model_json_schema(),
        state_schema=wf.state_model.model_json_schema(),
        graph=_graph.edges(wf), queues=wf.queues(),
        shape={n: dict(node) for n, node in _graph.shape(wf).items()},
        steps={n: {"policy": s.policy.model_dump(mode="json"), "route": s.route}
               for n, s in spec.steps.items()},
        imperative=wf.is_imperative, initial_state=wf.state_model().model_dump(mode="json"),
        events={n: m.model_json_schema() if m else None for n, m in wf.event_models.items()},
        published_at=time.time(),
    )


# Renew one host's lease, drop the expired ones, and (re)write catalog entries, which say
# the version new runs start on: the newest served. A version is as new as it was first
# published (`first_seen`), so bringing back an old version's workers for its runs in
# flight does not send new runs there. An entry is written when it is missing (Redis lost
# its data), when its version no live host runs any more, and on a host's first
# announcement of its own version or of one first seen after the entry's.
_ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- One label, one definition: a first announcement of other code under a version label
-- that another live host serves is refused before anything is written.
for i = 4, #ARGV, 4 do
  if ARGV[i + 2] == '1' then
    local name, version = ARGV[i], ARGV[i + 1]
    local known = redis.call('HGET', KEYS[4], name .. '@' .. version)
    if known and cjson.decode(known).content_hash ~= cjson.decode(ARGV[i + 3]).content_hash then
      for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')) do
        local info = redis.call('HGET', KEYS[3], h)
        if h ~= ARGV[1] and info and cjson.decode(info).serves[name] == version then
          return {'conflict', name, version, h}
        end
      end
    end
  end
end
for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], h)
  redis.call('HDEL', KEYS[3], h)
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
local function runs(name, version)
  for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')) do
    local info = redis.call('HGET', KEYS[3], h)
    if info and cjson.decode(info).serves[name] == version then return true end
  end
  return false
end
local function seen(name, version)
  return tonumber(redis.call('HGET', KEYS[5], name .. '@' .. version) or '0')
end
for i = 4, #ARGV, 4 do
  local name, version, force, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  redis.call('HSETNX', KEYS[5], name .. '@' .. version, tostring(now))
  local current = redis.call('HGET', KEYS[1], name)
  local write = current == false
  if not write then
    local was = cjson.decode(current).version
    if was == version then
      write = force == '1'
    else
      write = not runs(name, was) or (force == '1' and seen(name, version) > seen(name, was))
    end
  end
  if write then redis.call('HSET', KEYS[1], name, entry) end
  if force == '1' then
    redis.call('HSET', KEYS[4], name .. '@' .. version, entry)
  else
    redis.call('HSETNX', KEYS[4], name .. '@' .. version, entry)
  end
end
return tostring(now)
"""


class VersionConflict(RuntimeError):
    """Other code is already published, and served, under this version label."""


@dataclasses.dataclass
class Announcement:
    """What one process tells the cluster about itself, every heartbeat."""

    host: str
    entries: list[CatalogEntry]
    serves: dict[str, str]  # workflow -> version, for those whose queues this host consumes
    settings: dict[str, float]
    coordinator: bool
    key_prefix: str = DEFAULT_KEY_PREFIX

    @classmethod
    def of(cls, workflows: Iterable[Workflow], host: str | None, settings: Settings,
           consumes: Iterable[str] | None = None) -> Announcement:
        """`consumes`: the queues this host reads (None: all of its workflows' queues).
        A host serves a workflow only if it reads one of its queues: a coordinator hosts
        the code but runs no steps, and a start must not go to a queue nobody reads."""
        workflows = list(workflows)
        queues = None if consumes is None else set(consumes)
        return cls(
            # The name celery gives the node (`w1@%h` -> `w1@box`), so a process that
            # publishes before its worker starts announces the same host the worker renews.
            host=host_format(default_nodename(host or socket.gethostname())),
            entries=[entry_of(wf) for wf in workflows],
            serves={wf.name: wf.version_id for wf in workflows
                    if queues is None or queues & broker_queues(wf)},
            settings={k: float(getattr(settings, k)) for k in CLUSTER_SETTINGS},
            coordinator=queues is not None and COORDINATOR_QUEUE in queues,
            key_prefix=settings.key_prefix,
        )

    def send(self, client: redis.Redis, ttl: float, first: bool = False) -> None:
        key = catalog_key(self.key_prefix)
        info = json.dumps({"serves": self.serves, "settings": self.settings,
                           "coordinator": self.coordinator})
        argv: list[str] = [self.host, repr(ttl), info]
        for e in self.entries:
            force = first and e.name in self.serves
            argv += [e.name, e.version, "1" if force else "0", e.model_dump_json()]
        answer = client.eval(_ANNOUNCE, 5, key, f"{key}:live", f"{key}:hosts",
                             f"{key}:versions", f"{key}:first_seen", *argv)
        if isinstance(answer, list):
            name, version, host = (_text(a) for a in answer[1:])
            raise VersionConflict(
                f"{name}@{version} is served by {host} with other code: two definitions "
                f"may not share a version label; give this one a new version=")

    def withdraw(self, client: redis.Redis) -> None:
        """Leave at once (a clean shutdown), instead of when the lease runs out."""
        key = catalog_key(self.key_prefix)
        pipe = client.pipeline()
        pipe.zrem(f"{key}:live", self.host)
        pipe.hdel(f"{key}:hosts", self.host)
        pipe.execute()


def publish(client: redis.Redis, workflows: Iterable[Workflow], host: str | None = None, *,
            settings: Settings | None = None,
            consumes: Iterable[str] | None = None) -> list[CatalogEntry]:
    """Announce `host` (default: this machine) as serving `workflows` for one lease.
    Processes keep it alive with `CatalogHeartbeat`; a one-off publish lapses after the
    TTL."""
    settings = settings or Settings.from_env()
    announcement = Announcement.of(workflows, host, settings, consumes)
    announcement.send(client, settings.catalog_ttl, first=True)
    return announcement.entries


@dataclasses.dataclass
class ClusterView:
    """The catalog and the live hosts, read in one round trip."""

    entries: dict[str, CatalogEntry]
    live: dict[str, dict[str, Any]]  # host -> what it announced

    @classmethod
    def read(cls, client: redis.Redis, key_prefix: str = DEFAULT_KEY_PREFIX) -> ClusterView:
        key = catalog_key(key_prefix)
        pipe = client.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(key)
        pipe.zrange(f"{key}:live", 0, -1, withscores=True)
        pipe.hgetall(f"{key}:hosts")
        (seconds, micros), raw, leases, infos = pipe.execute()
        now = seconds + micros / 1e6  # Redis's clock: the one the leases were written with
        live = {_text(h): json.loads(infos[h]) for h, expires in leases
                if expires > now and h in infos}
        entries = {}
        for name, doc in raw.items():
            entry = CatalogEntry.model_validate_json(doc)
            entry.hosts = sorted(h for h, info in live.items()
                                 if info["serves"].get(entry.name) == entry.version)
            served: dict[str, list[str]] = {}
            for h, info in sorted(live.items()):
                if entry.name in info["serves"]:
                    served.setdefault(info["serves"][entry.name], []).append(h)
            entry.versions = served
            entries[_text(name)] = entry
        return cls(entries, live)

    def hosts_of(self, workflow: str, version: str) -> list[str]:
        """The live hosts that execute `version` of `workflow`."""
        return sorted(h for h, info in self.live.items()
                      if info["serves"].get(workflow) == version)


    def cluster_settings(self) -> dict[str, float] | None:
        """See `read_cluster_settings`."""
        announced = ([i["settings"] for i in self.live.values() if i["coordinator"]]
                     or [i["settings"] for i in self.live.values()])
        if not announced:
            return None
        return {k: min(float(s[k]) for s in announced) for k in CLUSTER_SETTINGS}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_catalog(client: redis.Redis,
                 key_prefix: str = DEFAULT_KEY_PREFIX) -> dict[str, CatalogEntry]:
    """Every published workflow; `hosts` lists only the live hosts that execute it (empty
    when none does)."""
    return ClusterView.read(client, key_prefix).entries


def read_cluster_settings(client: redis.Redis,
                          key_prefix: str = DEFAULT_KEY_PREFIX) -> dict[str, float] | None:
    """The recovery settings (`CLUSTER_SETTINGS`) the live coordinators use, or the live
    workers if no coordinator is up; None when no host is live. Where hosts disagree the
    smallest value wins: a timer that comes early only makes the sweep look again, one that
    comes late delays recovery."""
    return ClusterView.read(client, key_prefix).cluster_settings()


class CatalogHeartbeat(bootsteps.StartStopStep):
    """In every worker and coordinator: announce this node before it consumes, renew the
    lease every third of the TTL (rewriting lost entries), and withdraw on shutdown."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._announcement: Announcement | None = None
        self._client: redis.Redis | None = None

    def start(self, worker: Any) -> None:
        runtime = worker.app.runtime
        ttl = runtime.settings.catalog_ttl
        announcement = self._announcement = Announcement.of(
            runtime.workflows.values(), worker.hostname, runtime.settings,
            consumes=worker.app.amqp.queues.consume_from)
        client = self._client = connect(runtime.settings.redis_url)

        def beat(first: bool) -> None:
            try:
                announcement.send(client, ttl, first)
            except VersionConflict as exc:  # Celery logs it and stops; the CLI exits 2
                worker.app.refused = exc
                raise
            except redis.RedisError as exc:  # Redis down: the next beat tries again
                log.warning("catalog heartbeat failed: %s", exc)

        beat(first=True)

        def loop() -> None:
            while not self._stop.wait(ttl / 3):
                beat(first=False)

        self._thread = threading.Thread(target=loop, name="orchestrator-catalog", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        client, self._client = self._client, None  # a cold shutdown may stop us twice
        if self._announcement is not None and client is not None:
            try:
                self._announcement.withdraw(client)
            except redis.RedisError as exc:  # the lease runs out on its own
                log.warning("could not withdraw %s from the catalog: %s",
                            self._announcement.host, exc)
            client.close()

    def terminate(self, worker: Any) -> None:  # a cold shutdown calls this, not stop()
        self.stop(worker)
