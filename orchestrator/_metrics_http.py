"""Serving /metrics from a worker or a coordinator (`--metrics-port`).

A prefork worker runs steps in pool processes, each with its own memory, so their samples
go through files: prometheus_client's multiprocess mode, where every process writes its
own file under PROMETHEUS_MULTIPROC_DIR and the process serving /metrics adds them up.
prometheus_client chooses that mode once, when it is first imported, so `prepare()` sets
the directory before anything imports it; pool processes are forked after it and inherit
both. Coordinators use the same path (one process, one file set): one way to serve for
whatever pool `-P` picks.

The directory is this process's own, made fresh at start: a directory shared by two
workers would add their samples together and each would serve the sum, and files left by
an earlier run would be served as if they were this one's. It is removed at exit (a
process killed with SIGKILL leaves it in the temporary directory).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

from celery import signals

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> str:
    """Give this process (and the pool processes it will fork) a fresh samples directory;
    before prometheus_client is imported."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics directory was "
                           "set: pool processes would each keep samples nobody serves")
    path = tempfile.mkdtemp(prefix="orchestrator-metrics-")
    os.environ[ENV] = path
    atexit.register(_remove, path, os.getpid())
    signals.worker_process_shutdown.connect(_process_ends, weak=False,
                                            dispatch_uid="orchestrator-metrics")
    return path


def serve(port: int, address: str, collectors: Iterable[Any] = ()) -> None:
    """Serve the samples of every process of this worker (and `collectors`) on
    http://address:port/metrics, from a daemon thread. OSError if the port is taken."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, os.environ[ENV])
    for collector in collectors:
        registry.register(collector)
    start_http_server(port, address, registry)


def _process_ends(pid: int | None = None, **kwargs: Any) -> None:
    """A pool process exits: prometheus_client's bookkeeping for it. Only its live gauges
    go (none are defined today); its counters and histograms stay, so its counts are not
    lost when the pool replaces it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid if pid is not None else os.getpid())


def _remove(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not from a forked pool process that ran atexit hooks
        shutil.rmtree(path, ignore_errors=True)
