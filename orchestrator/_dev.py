"""`orchestrator dev`: the docker-compose topology as local processes, Procfile style.

Redis (started if nothing answers on its port), one coordinator, N workers, Flower, and the
example run: each child's output is prefixed with its name, and Ctrl-C stops them all.
"""

from __future__ import annotations

import contextlib
import functools
import os
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
from typing import IO

import click
from rich.console import Console

COLOURS = ["cyan", "green", "magenta", "yellow", "blue", "red"]
EXAMPLE_INPUT = '{"repo": "acme/app"}'

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    colour: str
    lines: list[str] = field(default_factory=list)

    def pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            console.print(f"[{self.colour}]{self.name:>12} |[/{self.colour}] {line}",
                          markup=True)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)


class Topology:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str]) -> Child:
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, proc, COLOURS[len(self.children) % len(COLOURS)])
        assert proc.stdout is not None
        threading.Thread(target=child.pump, args=(proc.stdout,), daemon=True).start()
        self.children.append(child)
        return child

    def stop(self) -> None:
        """SIGTERM every child's process group, newest first; SIGKILL what lingers."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                _signal_group(child.proc, signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.proc.wait(20)
            except subprocess.TimeoutExpired:
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait(5)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(predicate: Callable[[], bool], timeout: float, what: str,
          children: list[Child]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [c.name for c in children if c.proc.poll() is not None]
        if dead:
            raise click.ClickException(f"{', '.join(dead)} exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out waiting for {what}")
        time.sleep(0.1)


@click.command()
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--concurrency", type=int, default=1, show_default=True,
              help="Pool processes per worker.")
@click.option("--flower/--no-flower", default=True, show_default=True)
@click.option("--flower-port", type=int, default=5555, show_default=True)
@click.option("--redis-port", type=int, default=6379, show_default=True)
@click.option("--example/--no-example", default=True, show_default=True,
              help="Run the BuildAndDeploy example once the cluster is ready.")
@click.option("--exit-after-example", is_flag=True,
              help="Stop everything once the example has finished (for scripts and CI).")
def dev(workers: int, concurrency: int, flower: bool, flower_port: int, redis_port: int,
        example: bool, exit_after_example: bool) -> None:
    """Start Redis, a coordinator, workers and Flower as local processes."""
    if workers < 1:
        raise click.BadParameter("at least one worker", param_hint="--workers")
    url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": url, "FLOWER_UNAUTHENTICATED_API": "true",
           "PYTHONUNBUFFERED": "1"}
    env.pop("ORCHESTRATOR_BROKER_URL", None)  # the local topology is Redis all the way
    topology = Topology(env)
    scratch = tempfile.mkdtemp(prefix="orchestrator-dev-")
    cli = [sys.executable, "-m", "orchestrator.cli"]
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        if _answers(redis_port):
            console.print(f"using the Redis already on port {redis_port}")
        else:
            binary = shutil.which("redis-server")
            if binary is None:
                raise click.ClickException("redis-server is not installed")
            redis = topology.start("redis", [binary, "--port", str(redis_port), "--bind",
                                             "127.0.0.1", "--appendonly", "yes", "--dir",
                                             scratch, "--save", ""])
            _wait(lambda: _answers(redis_port), 30, "redis-server", [redis])
        coordinator = topology.start("coordinator", [*cli, "coordinator", "-n",
                                                     "coordinator@%h"])
        pool = [topology.start(f"worker.{i}", [*cli, "worker", "-n", f"worker{i}@%h", "-c",
                                               str(concurrency)])
                for i in range(1, workers + 1)]
        for child in [coordinator, *pool]:
            _wait(functools.partial(child.said, "ready."), 90, f"{child.name} to be ready",
                  topology.children)
        if flower:
            topology.start("flower", [*cli, "flower", f"--port={flower_port}",
                                      "--address=127.0.0.1"])
            _wait(lambda: _answers(flower_port), 60, "Flower", topology.children)
            console.print(f"Flower: http://127.0.0.1:{flower_port}")
        console.print(f"[bold]ready[/bold]: coordinator and {workers} worker(s) on {url}")
        if example:
            runner = topology.start("example", [*cli, "run", "BuildAndDeploy", "--remote",
                                                "--input", EXAMPLE_INPUT, "--timeout", "120"])
            runner_code = runner.proc.wait()
            code = runner_code
            console.print(f"example finished with exit code {runner_code}")
            if exit_after_example:
                return
        while not stop.wait(0.5):
            dead = [c.name for c in topology.children
                    if c.proc.poll() is not None and c.name != "example"]
            if dead:
                raise click.ClickException(f"{', '.join(dead)} exited")
    finally:
        topology.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(scratch, ignore_errors=True)
        if code:
            sys.exit(code)
