"""A Redis Sentinel deployment on loopback ports: a primary, its replicas, three sentinels.

Real `redis-server` processes (sentinels are `redis-server --sentinel` with a config file
of their own, which they rewrite), each with a temporary directory. Used by
tests/test_failover.py and bench/failover.py.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.conftest import free_port, wait_for

SERVICE = "mymaster"


def _binary() -> str:
    return shutil.which("redis-server") or "/usr/bin/redis-server"


class Node:
    """One redis-server (data node or sentinel) on 127.0.0.1:port."""

    def __init__(self, name: str, root: Path, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.dir = root / name
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []

    def start(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        client = self.client(timeout=1)
        wait_for(lambda: _pings(client), 20, 0.02, what=f"{self.name} to start")
        client.close()

    def restart(self) -> None:
        self.start(self.argv)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 5) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class SentinelDeployment:
    """`replicas` replicas of one primary, watched by `sentinels` sentinels (quorum 2).

    A primary is declared down after `down_after_ms` without a reply; a failover the
    elected sentinel does not finish is retried after `failover_timeout_ms`."""

    def __init__(self, replicas: int = 1, sentinels: int = 3, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000, service: str = SERVICE) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="orch-sentinel-"))
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data = [Node("primary", self.root)] + [
            Node(f"replica{i + 1}", self.root) for i in range(replicas)]
        self.sentinels = [Node(f"sentinel{i + 1}", self.root) for i in range(sentinels)]

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    def _data_argv(self, node: Node, replica_of: Node | None) -> list[str]:
        argv = [_binary(), "--port", str(node.port), "--bind", "127.0.0.1",
                "--dir", str(node.dir), "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of.port)]
        return argv

    def start(self) -> None:
        primary = self.data[0]
        primary.start(self._data_argv(primary, None))
        for replica in self.data[1:]:
            replica.start(self._data_argv(replica, primary))
        wait_for(lambda: all(_link_up(r) for r in self.data[1:]), 30, 0.05,
                 what="the replicas to sync")
        quorum = 2 if len(self.sentinels) >= 2 else 1
        for s in self.sentinels:
            conf = s.dir / "sentinel.conf"
            conf.write_text("\n".join([
                f"port {s.port}", "bind 127.0.0.1", "protected-mode no", f"dir {s.dir}",
                f"sentinel monitor {self.service} 127.0.0.1 {primary.port} {quorum}",
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.service} 1", ""]))
            s.start([_binary(), str(conf), "--sentinel"])
        wait_for(self._sentinels_agree, 30, 0.1, what="the sentinels to see every node")

    def _sentinels_agree(self) -> bool:
        want_replicas, want_others = len(self.data) - 1, len(self.sentinels) - 1
        for s in self.sentinels:
            try:
                state = s.client(1).sentinel_master(self.service)
            except redis.RedisError:
                return False
            if (state["num-slaves"] < want_replicas
                    or state["num-other-sentinels"] < want_others):
                return False
        return True

    def primary_port(self) -> int | None:
        """Where the sentinels' majority says the primary is (None: no majority answers)."""
        seen: dict[int, int] = {}
        for s in self.sentinels:
            if not s.alive:
                continue
            try:
                _, port = s.client(1).sentinel_get_master_addr_by_name(self.service)
            except (redis.RedisError, TypeError):
                continue
            seen[int(port)] = seen.get(int(port), 0) + 1
        best = max(seen.items(), key=lambda kv: kv[1], default=None)
        return best[0] if best and best[1] > len(self.sentinels) // 2 else None

    def primary(self) -> Node:
        port = self.primary_port()
        return next(n for n in self.data if n.port == port)

    def kill_primary(self) -> tuple[Node, float]:
        """SIGKILL the primary; the node and the time.monotonic() of the kill."""
        node = self.primary()
        assert node.proc is not None
        node.proc.kill()
        killed = time.monotonic()
        node.proc.wait(10)
        node.proc = None
        return node, killed

    def wait_promoted(self, old: Node, timeout: float = 30) -> Node:
        """Block until every sentinel names a new primary that says it is one."""
        def promoted() -> Node | None:
            port = self.primary_port()
            if port is None or port == old.port:
                return None
            node = next(n for n in self.data if n.port == port)
            try:
                role = node.client(1).info("replication")["role"]
            except redis.RedisError:
                return None
            return node if role == "master" else None

        found: Node = wait_for(promoted, timeout, 0.02, what="a replica to be promoted")
        return found

    def rejoin(self, old: Node, replica_of: Node | None = None) -> None:
        """Start a killed primary again: as it was (the sentinels make it a replica of the
        promoted one when they next look at it, within about 10 s), or at once as a replica
        of `replica_of`, as a node restarted with the current topology would be. Either
        way it resyncs and drops what it never replicated."""
        old.start(self._data_argv(old, replica_of))
        wait_for(lambda: _link_up(old), 30, 0.05, what=f"{old.name} to rejoin as a replica")

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _link_up(node: Node) -> bool:
    try:
        info = node.client(1).info("replication")
    except redis.RedisError:
        return False
    return info.get("role") == "slave" and info.get("master_link_status") == "up"
