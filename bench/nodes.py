"""Worker and coordinator subprocesses for the bench scripts, and polling with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def start_node(kind: str, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    """`orchestrator worker|coordinator` at WARNING, in a session of its own (so its pool
    goes with it); a worker gets two pool processes."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", kind, "-l", "WARNING", "-n", f"{name}@%h",
         "--without-mingle", "--without-gossip", *(["-c", "2"] if kind == "worker" else [])],
        env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def stop_nodes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    procs = list(procs)
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(30)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
