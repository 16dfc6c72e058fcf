"""`orchestrator dev`: the docker-compose topology as local processes, Procfile style.

Redis, one coordinator, N workers, Flower, and the example run: each child's output is
prefixed with its name, and Ctrl-C stops them all. Redis is the one `--redis-url` or
ORCHESTRATOR_REDIS_URL names, else 127.0.0.1 on `--redis-port`; dev starts a redis-server
only where nothing answers and the address is this machine's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, NoReturn
from urllib.parse import urlsplit

import click
import redis
from rich.console import Console
from rich.text import Text

from . import _redis_url as redis_urls
from ._config import Settings
from ._stores.redis import redact

COLOURS = ["cyan", "green", "magenta", "yellow", "blue", "red"]
CLI = [sys.executable, "-m", "orchestrator.cli"]
EXAMPLE = ["run", "BuildAndDeploy", "--remote", "--input", '{"repo": "acme/app"}',
           "--timeout", "300"]
READY = "ready."  # what Celery logs once a node consumes its queues
GRACE = 20.0  # seconds a child gets to shut down warm before SIGKILL

console = Console(highlight=False, soft_wrap=True)


class Stopped(Exception):
    """A signal asked us to stop."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    colour: str
    oneshot: bool = False  # expected to exit (the example), so its exit is not a failure
    last: bool = False  # stopped after the others (Redis: workers still write while stopping)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def relay(self, stream: IO[bytes]) -> None:
        prefix = (f"{self.name:>12} | ", self.colour)
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if READY in line:
                self.ready.set()
            # Text, not markup: Celery prints "[tasks]" and paths that markup would eat or
            # choke on, and a dead reader thread would leave the child blocked on a full pipe.
            console.print(Text.assemble(prefix, line))
        stream.close()


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Plan:
    workers: int
    concurrency: int
    flower_port: int | None
    redis_url: str
    example: bool
    exit_after_example: bool


class Topology:
    """The children, and the one place that decides when to give up on them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[Child] = []
        self.signals = 0

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only count: the main thread notices at its next poll, never mid-cleanup.
        self.signals += 1

    def start(self, name: str, argv: list[str], *, extra_env: dict[str, str] | None = None,
              oneshot: bool = False, last: bool = False) -> Child:
        # A session of its own per child: the terminal's Ctrl-C reaches only us, and we
        # can signal a child's whole group (Celery's pool processes included).
        proc = subprocess.Popen(argv, env={**self.env, **(extra_env or {})},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, proc, COLOURS[len(self.children) % len(COLOURS)], oneshot, last)
        assert proc.stdout is not None
        child.reader = threading.Thread(target=child.relay, args=(proc.stdout,), daemon=True)
        child.reader.start()
        self.children.append(child)
        return child

    def wait_until(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Poll `done`; give up on a signal, a child that died, or the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if self.signals:
                raise Stopped
            dead = [c for c in self.children if not c.oneshot and c.proc.poll() is not None]
            if dead:
                names = ", ".join(f"{c.name} (exit {c.proc.returncode})" for c in dead)
                raise click.ClickException(f"{names} exited while waiting for {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise click.ClickException(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.1)

    def idle(self) -> NoReturn:
        self.wait_until(lambda: False, None, "Ctrl-C")
        raise AssertionError("wait_until returns only once its predicate holds")

    def stop(self) -> None:
        """The apps first, Redis last; a second signal skips the grace period."""
        patience = self.signals
        self._terminate([c for c in reversed(self.children) if not c.last], patience)
        self._terminate([c for c in reversed(self.children) if c.last], patience)

    def _terminate(self, batch: list[Child], patience: int) -> None:
        for child in batch:
            if child.proc.poll() is None:
                _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        for child in batch:
            while (child.proc.poll() is None and time.monotonic() < deadline
                   and self.signals <= patience):
                time.sleep(0.05)
            # Also after a clean exit: a pool process that outlived its parent is still ours.
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()
            if child.reader is not None:
                child.reader.join(5)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pings(url: str) -> bool:
    client = redis_urls.client(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """Our environment, with every setting (group options included) as ORCHESTRATOR_*."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            env[f"ORCHESTRATOR_{f.name.upper()}"] = _env_value(value)
    env["ORCHESTRATOR_REDIS_URL"] = redis_url
    env.pop("ORCHESTRATOR_BROKER_URL", None)  # the local topology is Redis all the way
    return env


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _ensure_redis(topology: Topology, url: str, scratch: str) -> None:
    if redis_urls.is_sentinel(url):  # a deployment of its own: never started here
        if not _pings(url):
            raise click.ClickException(f"no primary answers through the sentinels of "
                                       f"{redact(url)}")
        console.print("using the Redis primary the sentinels name")
        return
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if _answers(port, host):
        if not _pings(url):
            raise click.ClickException(f"something other than Redis (or a Redis that refuses "
                                       f"us) listens at {host}:{port}")
        console.print(f"using the Redis already at {host}:{port}")
        return
    if host not in LOCAL_HOSTS:
        raise click.ClickException(f"no Redis answers at {host}:{port}")
    binary = shutil.which("redis-server")
    if binary is None:
        raise click.ClickException("redis-server is not installed (or pass the URL of one)")
    topology.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                             "--appendonly", "yes", "--dir", scratch, "--save", ""],
                   last=True)
    topology.wait_until(lambda: _pings(url), 30, "redis-server")


def _start_cluster(topology: Topology, workers: int, concurrency: int) -> None:
    nodes = [topology.start("coordinator", [*CLI, "coordinator", "-n", "coordinator@%h"])]
    nodes += [topology.start(f"worker.{i}", [*CLI, "worker", "-n", f"worker{i}@%h",
                                             "-c", str(concurrency)])
              for i in range(1, workers + 1)]
    topology.wait_until(lambda: all(n.ready.is_set() for n in nodes), 120,
                        "the coordinator and workers to be ready")


def _start_flower(topology: Topology, port: int) -> None:
    # Checked first, or another server on the port would pass for Flower's readiness.
    if _answers(port):
        raise click.ClickException(f"port {port} is taken; pass --flower-port or --no-flower")
    # Never Flower's unauthenticated API (a page in any browser here could shut workers
    # down): basic auth, with a password made for this session unless one is configured.
    configured = os.environ.get("FLOWER_BASIC_AUTH")
    auth = configured or f"dev:{secrets.token_urlsafe(12)}"
    topology.start("flower", [*CLI, "flower", "--port", str(port)],
                   extra_env={"FLOWER_BASIC_AUTH": auth})
    topology.wait_until(lambda: _answers(port), 60, "Flower")
    login = "as FLOWER_BASIC_AUTH says" if configured else f"as {auth}"
    console.print(f"Flower: http://127.0.0.1:{port} (log in {login})", soft_wrap=True,
                  markup=False)


def _run_example(topology: Topology) -> int:
    runner = topology.start("example", [*CLI, *EXAMPLE], oneshot=True)
    topology.wait_until(lambda: runner.proc.poll() is not None, None, "the example")
    if runner.reader is not None:
        runner.reader.join(5)  # its result lines before our verdict
    console.print(f"example finished with exit code {runner.proc.returncode}")
    return runner.proc.returncode


def _run(topology: Topology, plan: Plan, scratch: str) -> int:
    _ensure_redis(topology, plan.redis_url, scratch)
    _start_cluster(topology, plan.workers, plan.concurrency)
    if plan.flower_port is not None:
        _start_flower(topology, plan.flower_port)
    console.print(f"[bold]ready[/bold]: coordinator and {plan.workers} worker(s) on "
                  f"{redact(plan.redis_url)}")
    code = _run_example(topology) if plan.example else 0
    if plan.exit_after_example:
        return code
    topology.idle()


def _redis_url(ctx: click.Context, settings: Settings, port: int) -> str:
    """The configured Redis (--redis-url or ORCHESTRATOR_REDIS_URL), else --redis-port's."""
    group = ctx.parent.params if ctx.parent is not None else {}
    configured = group.get("redis_url") or os.environ.get("ORCHESTRATOR_REDIS_URL")
    if not configured:
        return f"redis://127.0.0.1:{port}/0"
    if ctx.get_parameter_source("redis_port") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--redis-port goes without --redis-url and "
                               "ORCHESTRATOR_REDIS_URL (put the port in the URL)")
    return settings.redis_url


@click.command()
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pool processes per worker.")
@click.option("--flower/--no-flower", default=True, show_default=True)
@click.option("--flower-port", type=int, default=5555, show_default=True)
@click.option("--redis-port", type=int, default=6379, show_default=True,
              help="Without --redis-url or ORCHESTRATOR_REDIS_URL: use the Redis on "
                   "127.0.0.1 at this port, or start one there.")
@click.option("--example/--no-example", default=True, show_default=True,
              help="Run the BuildAndDeploy example once the cluster is ready.")
@click.option("--exit-after-example", is_flag=True,
              help="Stop everything once the example has finished (for scripts and CI); "
                   "exit with its exit code.")
@click.pass_context
def dev(ctx: click.Context, workers: int, concurrency: int, flower: bool, flower_port: int,
        redis_port: int, example: bool, exit_after_example: bool) -> None:
    """Start Redis, a coordinator, workers and Flower as local processes."""
    settings = ctx.find_object(Settings) or Settings.from_env()
    plan = Plan(workers, concurrency, flower_port if flower else None,
                _redis_url(ctx, settings, redis_port), example, exit_after_example)
    topology = Topology(child_env(settings, plan.redis_url))
    previous = {s: signal.signal(s, topology.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    scratch = tempfile.mkdtemp(prefix="orchestrator-dev-")
    code = 0
    try:
        code = _run(topology, plan, scratch)
    except Stopped:
        console.print("stopping")
    finally:
        topology.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(scratch, ignore_errors=True)
    ctx.exit(code)
