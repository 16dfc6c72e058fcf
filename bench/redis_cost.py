"""What a step costs Redis: commands, network bytes and redis-server CPU, split by kind.

Usage:
    .venv/bin/python bench/redis_cost.py [--runs 100] [--fans 25] [--wide 4]
        [--throughput-runs 300] [--port 6391] [--json]

Starts three redis-servers of its own (ports --port, +1, +2; no persistence), so that
`INFO` deltas are this bench's alone and split by kind, exactly:

  store   ORCHESTRATOR_REDIS_URL: run records, history, leases, indexes (our Lua scripts)
  broker  ORCHESTRATOR_BROKER_URL: kombu's Redis transport (the task messages)
  chord   Celery's Redis result backend, which holds only the chord counters; the runtime
          puts it on ORCHESTRATOR_REDIS_URL, this bench moves it to a server of its own by
          patching `celery_config` in every process (bench/_split_backend.py)

It runs `orchestrator worker -c 2` and `orchestrator coordinator` hosting bench/flows.py,
and around each measured batch reads `INFO commandstats`, `INFO stats`
(total_net_input_bytes, total_net_output_bytes, total_commands_processed) and `INFO cpu`
(used_cpu_sys + used_cpu_user) of each server:

  chain step      --runs runs of Noop10 in flight (create, 10 no-op steps, finish): / steps
  fork branch     --fans fan-outs of 8 (Fan, 8 branches, Gather): / branches; again with
                  --wide fan-outs of 50
  throughput      --throughput-runs runs of Noop10 in flight: steps/s, and redis CPU-ms
                  per step (all three servers summed), hence the steps/s at which one
                  redis-server core would be saturated

With --single all three kinds share one redis-server (store and chord counters in db 0,
broker in db 1, as a deployment with one Redis has them): no split by kind, but the CPU
of one event loop serving everything, for the saturation estimate.

Commands are `INFO commandstats` calls, which include the commands Lua scripts run and
MULTI/EXEC; round trips are bench/roundtrips.py's. Bytes are what Redis read (in) and
wrote (out). The coordinator's idle traffic (sweep ticks, catalog heartbeats) and
redis-server's own cron are measured for 3 s before and reported per second; they are
not subtracted from the figures per step (the saturation line says what subtracting does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.throughput import WORKER_FLAGS, processes  # noqa: E402
from bench.throughput import wait_done as throughput_wait_done  # noqa: E402

KINDS = ("store", "broker", "chord")
POLL = 0.05  # the bench's own loads of a run it waits for count as the store's commands


def wait_done(handle: Any, timeout: float = 600.0) -> Any:
    """throughput's, looking every 50 ms: one load per run waited for, plus one per 50 ms
    of the batch (~0.1 load per chain step, in the store's figures)."""
    return throughput_wait_done(handle, timeout, POLL)


@contextmanager
def redis_servers(port: int, workdir: Path, single: bool) -> Iterator[dict[str, str]]:
    """Three throwaway redis-servers (or one, `single`): kind -> URL."""
    exe = shutil.which("redis-server") or "redis-server"
    procs, urls = [], {}
    try:
        for i, kind in enumerate(KINDS):
            p = port + i
            if single:
                urls[kind] = f"redis://127.0.0.1:{port}/{1 if kind == 'broker' else 0}"
                if i:
                    continue
                p = port
            else:
                urls[kind] = f"redis://127.0.0.1:{p}/0"
            procs.append(subprocess.Popen(
                [exe, "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL))
        for url in urls.values():
            client = redis.Redis.from_url(url)
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    break
                time.sleep(0.05)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def snapshot(client: redis.Redis) -> dict[str, Any]:
    info = client.info("all")
    calls = {k[len("cmdstat_"):].upper(): v["calls"] for k, v in info.items()
             if k.startswith("cmdstat_")}
    return {"calls": calls, "in": info["total_net_input_bytes"],
            "out": info["total_net_output_bytes"],
            "cpu": info["used_cpu_sys"] + info["used_cpu_user"], "mem": info["used_memory"]}


def delta(before: dict[str, Any], after: dict[str, Any], n: float) -> dict[str, Any]:
    calls = {c: (after["calls"].get(c, 0) - before["calls"].get(c, 0)) / n
             for c in after["calls"]}
    calls = {c: v for c, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v > 0}
    # INFO itself is counted once per snapshot taken on this server
    calls.pop("INFO", None)
    return {"commands": sum(calls.values()),
            "bytes_in": (after["in"] - before["in"]) / n,
            "bytes_out": (after["out"] - before["out"]) / n,
            "cpu_ms": (after["cpu"] - before["cpu"]) * 1000 / n, "calls": calls}


def measured(clients: dict[str, redis.Redis], work: Callable[[], int]) -> dict[str, Any]:
    before = {k: snapshot(c) for k, c in clients.items()}
    t = time.perf_counter()
    n = work()
    wall = time.perf_counter() - t
    after = {k: snapshot(c) for k, c in clients.items()}
    by_kind = {k: delta(before[k], after[k], n) for k in clients}
    total = {f: sum(by_kind[k][f] for k in clients)
             for f in ("commands", "bytes_in", "bytes_out", "cpu_ms")}
    return {"n": n, "wall_s": wall, "per_s": n / wall, "total": total, "by_kind": by_kind}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--fans", type=int, default=25)
    parser.add_argument("--wide", type=int, default=4)
    parser.add_argument("--throughput-runs", type=int, default=300)
    parser.add_argument("--port", type=int, default=6391)
    parser.add_argument("--single", action="store_true",
                        help="one redis-server for store, broker and chord counters")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)

    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-redis-cost-") as tmp, \
            redis_servers(a.port, Path(tmp), a.single) as urls:
        env = {**os.environ, "ORCHESTRATOR_REDIS_URL": urls["store"],
               "ORCHESTRATOR_BROKER_URL": urls["broker"], "BENCH_CHORD_URL": urls["chord"],
               "ORCHESTRATOR_WORKFLOWS": "bench.flows", "PYTHONPATH": str(ROOT)}
        os.environ["BENCH_CHORD_URL"] = urls["chord"]
        from bench import _split_backend  # noqa: F401  (before create_app)
        from bench.flows import fan_out, noop10
        from orchestrator import Settings, WorkflowRunner, create_app

        app = create_app(Settings.from_env(env))
        assert app.conf.result_backend == urls["chord"], app.conf.result_backend
        clients = ({"all": redis.Redis.from_url(urls["store"])} if a.single else
                   {k: redis.Redis.from_url(u) for k, u in urls.items()})
        cli = [sys.executable, "-m", "bench._split_backend"]
        with processes(Path(tmp), env) as procs:
            procs.start("worker", [*cli, "worker", "-c", "2", "-l", "WARNING", *WORKER_FLAGS])
            procs.start("coordinator", [*cli, "coordinator", "-l", "WARNING", *WORKER_FLAGS])
            chains, fans = WorkflowRunner(noop10, app=app), WorkflowRunner(fan_out, app=app)
            for h in [chains.run() for _ in range(4)] + [fans.run({"width": 2})]:
                wait_done(h, 120)

            def idle() -> int:
                time.sleep(3)
                return 3

            def runs(n: int) -> Callable[[], int]:
                def go() -> int:
                    for h in [chains.run() for _ in range(n)]:
                        wait_done(h)
                    return n * 10
                return go

            def forks(n: int, width: int) -> Callable[[], int]:
                def go() -> int:
                    for h in [fans.run({"width": width}) for _ in range(n)]:
                        assert wait_done(h).output == width
                    return n * width
                return go

            report["idle, per second"] = measured(clients, idle)
            report["chain step"] = measured(clients, runs(a.runs))
            report["fork branch, width 8"] = measured(clients, forks(a.fans, 8))
            report["fork branch, width 50"] = measured(clients, forks(a.wide, 50))
            report["throughput, chain step"] = measured(clients, runs(a.throughput_runs))
    if a.json:
        print(json.dumps(report, indent=2))
        return report
    for what, r in report.items():
        t = r["total"]
        print(f"== per {what} ({r['n']} measured, {r['per_s']:.0f}/s): "
              f"{t['commands']:.2f} commands, "
              f"{t['bytes_in']:.0f} B in, {t['bytes_out']:.0f} B out, "
              f"redis CPU {t['cpu_ms']:.3f} ms")
        for kind, k in r["by_kind"].items():
            listed = ", ".join(f"{c} {v:.2f}" for c, v in k["calls"].items())
            print(f"   {kind:7} {k['commands']:6.2f} commands "
                  f"{k['bytes_in']:7.0f} B in {k['bytes_out']:7.0f} B out "
                  f"cpu {k['cpu_ms']:.3f} ms: {listed}")
    tp = report["throughput, chain step"]
    cpu = tp["total"]["cpu_ms"]
    idle = report["idle, per second"]["total"]["cpu_ms"]  # ms of CPU per second
    net = cpu - idle / tp["per_s"]
    print(f"== redis CPU {cpu:.3f} ms per step at {tp['per_s']:.0f} steps/s "
          f"({net:.3f} ms less the idle {idle:.1f} ms/s): {cpu * 1000:.0f} ms of CPU "
          f"per 1,000 steps/s; one core saturates near {1000 / cpu:.0f} steps/s "
          f"({1000 / net:.0f} from the net figure)")
    if "store" in tp["by_kind"]:
        store = tp["by_kind"]["store"]["cpu_ms"]
        print(f"   the store's server alone: {store:.3f} ms per step, {1000 / store:.0f} "
              f"steps/s")
    return report


if __name__ == "__main__":
    main()
