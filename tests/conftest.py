"""Fixtures: a private redis-server per session, and real Celery processes.

Everything runs against real parts: a redis-server this session starts on a free port
(so tests can restart it and never touch the machine's data), worker and coordinator
subprocesses started through the real CLI, and SIGKILL for the fault tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

if TYPE_CHECKING:
    from orchestrator import RunStore, Workflow, WorkflowRunner
    from orchestrator._runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def queued(client: redis.Redis) -> int:
    """Messages waiting in every step queue, whatever its workflow and version."""
    return sum(int(client.llen(k)) for k in client.scan_iter("orchestrator.steps@*"))


def step_queue(wf: Any, queue: str = "orchestrator.steps") -> str:
    """The broker queue of `queue` for the version of `wf` (a worker hosting it reads it)."""
    from orchestrator._dispatch.base import queue_for

    return queue_for(queue, wf.name, wf.version_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def get_json(url: str) -> Any:
    """The JSON at `url`, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


class RedisServer:
    """A redis-server of our own, with AOF so a restart loses nothing."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="orch-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 20, what="redis-server to start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database for one test."""
    client = redis_server.client()
    client.flushall()
    yield redis_server.url
    client.close()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# ---- Celery processes -------------------------------------------------------------------

TEST_ENV = {
    "ORCHESTRATOR_WORKFLOWS": "workers,tests.flows",
    "ORCHESTRATOR_LEASE_TTL": "2",
    "ORCHESTRATOR_REDISPATCH_AFTER": "3",
    "ORCHESTRATOR_JOIN_AFTER": "1",
    "ORCHESTRATOR_SWEEP_INTERVAL": "0.2",
    "ORCHESTRATOR_VISIBILITY_TIMEOUT": "30",
}


class Process:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its pool children."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(20)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class Cluster:
    """Workers and coordinators as real subprocesses of `orchestrator worker|coordinator`."""

    def __init__(self, redis_url: str, tmp: Path, **env: str) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.env = {**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
                    "PYTHONPATH": str(ROOT), **env}
        self.procs: list[Process] = []
        from orchestrator import Settings, create_app

        self.settings = Settings.from_env(self.env)
        self.app = create_app(self.settings)

    def _start(self, kind: str, name: str, *extra: str) -> Process:
        argv = [sys.executable, "-m", "orchestrator.cli", kind, "-l", "INFO", "-n",
                f"{name}@%h", "--without-mingle", "--without-gossip", *extra]
        proc = Process(name, argv, self.env, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def worker(self, name: str | None = None, concurrency: int = 1, *extra: str) -> Process:
        name = name or f"w{uuid.uuid4().hex[:6]}"
        proc = self._start("worker", name, "-c", str(concurrency), *extra)
        self.wait_ready(proc)
        return proc

    def coordinator(self, name: str | None = None, *extra: str) -> Process:
        name = name or f"coord{uuid.uuid4().hex[:6]}"
        proc = self._start("coordinator", name, "-c", "2", *extra)
        self.wait_ready(proc)
        return proc

    def console(self, *extra: str) -> tuple[Process, str]:
        """`orchestrator console` on a free loopback port: (process, its base URL)."""
        port = free_port()
        argv = [sys.executable, "-m", "orchestrator.cli", "console", "--port", str(port),
                "--log-level", "warning", *extra]
        proc = Process(f"console{port}", argv, self.env, self.tmp / f"console{port}.log")
        self.procs.append(proc)

        def up() -> bool:
            if proc.proc.poll() is not None:
                raise AssertionError(f"the console exited:\n{proc.tail()}")
            return answers(port)

        wait_for(up, 60, 0.1, what="the console to answer")
        return proc, f"http://127.0.0.1:{port}"

    def wait_ready(self, proc: Process, timeout: float = 60) -> None:
        def ready() -> bool:
            if proc.proc.poll() is not None:
                raise AssertionError(f"{proc.name} exited:\n{proc.tail()}")
            return "ready." in proc.log.read_text(errors="replace")

        wait_for(ready, timeout, 0.1, what=f"{proc.name} to be ready")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)


@pytest.fixture
def cluster_factory(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**env: str) -> Cluster:
        c = Cluster(redis_url, tmp_path, **env)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    """One coordinator and two single-process workers."""
    c = cluster_factory()
    c.coordinator("coord")
    c.worker("w1")
    c.worker("w2")
    return c


@pytest.fixture
def local_runtimes() -> Iterator[Callable[[RunStore], Runtime]]:
    """In-process runtimes over a given store, closed after the test: a sweeper left
    running would claim the timers of the tests that come after it."""
    from orchestrator import local_runtime

    made: list[Runtime] = []

    def make(store: RunStore) -> Runtime:
        made.append(local_runtime(store))
        return made[-1]

    yield make
    for runtime in made:
        runtime.close()


Runner = Callable[["Workflow"], "WorkflowRunner"]


@pytest.fixture(params=["embedded", "distributed"])
def make_runner(request: pytest.FixtureRequest, redis_url: str,
                monkeypatch: pytest.MonkeyPatch) -> Runner:
    """Runs a test in both modes: in-process threads, and a real cluster."""
    from orchestrator import WorkflowRunner

    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", redis_url)
    if request.param == "embedded":
        return lambda wf: WorkflowRunner(wf)
    cluster: Cluster = request.getfixturevalue("cluster")
    return lambda wf: WorkflowRunner(wf, app=cluster.app)
