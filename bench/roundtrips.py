"""Redis commands and round trips per step: raw Celery beside ours, from `redis-cli monitor`.

Usage:
    .venv/bin/python bench/roundtrips.py [--runs 20] [--width 8]
        [--redis-url redis://127.0.0.1:6379/15] [--json]

Needs Redis and `redis-cli`; the database in --redis-url is FLUSHED. MONITOR slows Redis
down, so this counts, it does not time. For each workload it records every command sent to
that database while the workload runs, and attributes each connection to the process that
holds it (this script, a worker's main process, a pool child, the coordinator):

  raw   --runs chains of 10 no-op tasks; --runs chords of --width (+ callback)
  ours  --runs runs of Noop10; --runs fan-outs of --width (Fan, branches, join, Gather)

A round trip is a run of commands from one connection with no other command between them
and less than 20 us apart (a pipeline arrives in one read, so Redis runs it back to back);
commands that Lua scripts run are counted apart, as they cost no round trip.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import redis  # noqa: E402

from bench.throughput import WORKER_FLAGS, processes, wait_done  # noqa: E402

LINE = re.compile(r'^(\d+\.\d+) \[(\d+) ([^\]]*)\] "([^"]+)"')
SAME_READ = 20e-6  # commands of one pipeline arrive together


def connection_owners(procs: dict[str, int]) -> dict[int, str]:
    """Local TCP port -> role of the process that owns it (role of a pool child:
    '<role> child')."""
    roles = {os.getpid(): "bench client"}
    for role, pid in procs.items():
        roles[pid] = role
        try:
            for child in psutil.Process(pid).children(recursive=True):
                roles[child.pid] = f"{role} child"
        except psutil.NoSuchProcess:
            continue
    owners = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.pid in roles and conn.raddr and conn.laddr:
            owners[conn.laddr.port] = roles[conn.pid]
    return owners


def monitored(url: str, work: Callable[[], int], procs: dict[str, int]) -> dict[str, Any]:
    """Run `work` (returns how many steps it ran) under MONITOR; count per step."""
    parts = urlsplit(url)
    db = (parts.path or "/0").lstrip("/") or "0"
    cli = shutil.which("redis-cli") or "redis-cli"
    with tempfile.NamedTemporaryFile("w+b", suffix=".monitor") as out:
        mon = subprocess.Popen([cli, "-h", parts.hostname or "127.0.0.1",
                                "-p", str(parts.port or 6379), "monitor"], stdout=out)
        try:
            time.sleep(0.3)
            owners = connection_owners(procs)
            steps = work()
            time.sleep(0.3)
            owners.update(connection_owners(procs))
        finally:
            mon.terminate()
            mon.wait(10)
        out.seek(0)
        lines = out.read().decode(errors="replace").splitlines()

    commands: collections.Counter[tuple[str, str]] = collections.Counter()
    trips: collections.Counter[str] = collections.Counter()
    scripted: collections.Counter[str] = collections.Counter()
    last: tuple[str, float] | None = None
    for line in lines:
        m = LINE.match(line)
        if m is None or m.group(2) != db:
            continue
        at, client, name = float(m.group(1)), m.group(3), m.group(4).upper()
        if client == "lua":
            scripted[name] += 1
            continue
        port = int(client.rsplit(":", 1)[1]) if ":" in client else -1
        role = owners.get(port, "other")
        commands[role, name] += 1
        if last is None or last[0] != client or at - last[1] > SAME_READ:
            trips[role] += 1
        last = (client, at)
    by_role: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for (role, name), n in sorted(commands.items()):
        by_role[role][name] = n / steps
    return {
        "steps": steps,
        "commands_per_step": sum(commands.values()) / steps,
        "round_trips_per_step": sum(trips.values()) / steps,
        "round_trips_by_role": {r: n / steps for r, n in sorted(trips.items())},
        "commands_by_role": dict(by_role),
        "lua_commands_per_step": {n: c / steps for n, c in scripted.most_common()},
    }


def raw(url: str, a: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    os.environ.update(BENCH_REDIS_URL=url, BENCH_PREFETCH=str(a.raw_prefetch))
    from celery import chain, chord, group

    from bench.raw_celery import app, join, noop

    app.conf.update(broker_url=url, result_backend=url,
                    worker_prefetch_multiplier=a.raw_prefetch)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    celery = str(Path(sys.executable).parent / "celery")
    with processes(logdir, env) as procs:
        procs.start("raw-worker", [celery, "-A", "bench.raw_celery", "worker", "-c", "2",
                                   "-P", "prefork", "-l", "WARNING", *WORKER_FLAGS])
        group([chain(*[noop.s() for _ in range(10)]) for _ in range(4)]).apply_async().get(
            timeout=120)
        pids = {"worker": procs.procs[0][1].pid}

        def chains() -> int:
            results = [chain(*[noop.s() for _ in range(10)]).apply_async()
                       for _ in range(a.runs)]
            for r in results:
                r.get(timeout=300)
            return a.runs * 10

        def chords() -> int:
            results = [chord(group([noop.s() for _ in range(a.width)]), join.s()).apply_async()
                       for _ in range(a.runs)]
            for r in results:
                assert r.get(timeout=300) == a.width
            return a.runs * a.width

        return {"chain step": monitored(url, chains, pids),
                "chord branch": monitored(url, chords, pids)}


def ours(url: str, a: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": url, "ORCHESTRATOR_WORKFLOWS": "bench.flows",
           "PYTHONPATH": str(ROOT)}
    from bench.flows import fan_out, noop10
    from orchestrator import Settings, WorkflowRunner, create_app

    app = create_app(Settings.from_env(env))
    cli = [sys.executable, "-m", "orchestrator.cli"]
    with processes(logdir, env) as procs:
        procs.start("worker", [*cli, "worker", "-c", "2", "-l", "WARNING", *WORKER_FLAGS])
        procs.start("coordinator", [*cli, "coordinator", "-l", "WARNING", *WORKER_FLAGS])
        chains, fans = WorkflowRunner(noop10, app=app), WorkflowRunner(fan_out, app=app)
        for h in [chains.run() for _ in range(4)] + [fans.run({"width": 2})]:
            wait_done(h, 120)
        pids = {name: proc.pid for name, proc in procs.procs}

        def runs() -> int:
            for h in [chains.run() for _ in range(a.runs)]:
                wait_done(h)
            return a.runs * 10

        def fan_outs() -> int:
            for h in [fans.run({"width": a.width}) for _ in range(a.runs)]:
                wait_done(h)
            return a.runs * a.width

        return {"chain step": monitored(url, runs, pids),
                "fan-out branch": monitored(url, fan_outs, pids)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="chains / runs / fan-outs")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--raw-prefetch", type=int, default=4)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15",
                        help="Redis to use; its database is flushed (default DB 15)")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    client = redis.Redis.from_url(a.redis_url)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-roundtrips-") as tmp:
        try:
            client.flushdb()
            report["raw"] = raw(a.redis_url, a, Path(tmp))
            client.flushdb()
            report["ours"] = ours(a.redis_url, a, Path(tmp))
        finally:
            client.flushdb()
    if a.json:
        print(json.dumps(report, indent=2))
        return report
    for side, workloads in report.items():
        for what, r in workloads.items():
            print(f"== {side}: per {what} ({r['steps']} measured): "
                  f"{r['round_trips_per_step']:.2f} round trips, "
                  f"{r['commands_per_step']:.2f} commands, "
                  f"{sum(r['lua_commands_per_step'].values()):.2f} more inside Lua")
            for role, cmds in r["commands_by_role"].items():
                listed = ", ".join(f"{n} {c:.2f}" for n, c in
                                   sorted(cmds.items(), key=lambda kv: -kv[1]))
                print(f"   {role:18} {r['round_trips_by_role'].get(role, 0):5.2f} trips: "
                      f"{listed}")
            if r["lua_commands_per_step"]:
                listed = ", ".join(f"{n} {c:.2f}" for n, c in r["lua_commands_per_step"].items())
                print(f"   {'in Lua':18}        {listed}")
    return report


if __name__ == "__main__":
    main()
