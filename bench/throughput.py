"""Our distributed runtime beside raw Celery, on the same Redis, in one invocation.

Usage: python bench/throughput.py [--runs 100] [--loop 200] [--chords 50] [--width 8]
                                  [--redis-url redis://127.0.0.1:6379/15] [--json]

Phases run one after the other (never competing for the cores), each with its own worker
subprocess (prefork, concurrency 2), on a database this script flushes:
  raw Celery (its baseline settings, prefetch 4), raw Celery with prefetch 1 (our setting),
  then ours: `orchestrator worker -c 2` plus `orchestrator coordinator`.
Measures per-step latency (one 200-hop chain / a 200-iteration loop), steps/s with many
chains (runs) of 10 no-op steps in flight, branches/s of chords (fan-outs), and whether
the cost of a step grows with a run's history (first vs last 50 loop iterations).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: `bench` and `orchestrator` from the checkout
WORKER_FLAGS = ["--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "WARNING"]


@contextmanager
def processes(*argvs: list[str], env: dict[str, str]) -> Iterator[None]:
    procs = [subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for argv in argvs]
    try:
        yield
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_until(predicate: Callable[[], Any], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish")
        time.sleep(0.005)


def raw_celery(url: str, prefetch: int, runs: int, hops: int, chords: int,
               width: int) -> dict[str, float]:
    env = {**os.environ, "BENCH_REDIS_URL": url, "BENCH_PREFETCH": str(prefetch),
           "PYTHONPATH": str(ROOT)}
    os.environ.update(BENCH_REDIS_URL=url, BENCH_PREFETCH=str(prefetch))
    from celery import chain, chord, group

    from bench.raw_celery import app, join, noop

    app.conf.update(broker_url=url, result_backend=url, worker_prefetch_multiplier=prefetch)
    celery = str(Path(sys.executable).parent / "celery")
    with processes([celery, "-A", "bench.raw_celery", "worker", "-c", "2", "-P", "prefork",
                    *WORKER_FLAGS], env=env):
        noop.delay().get(timeout=60)  # the worker is up
        t = time.perf_counter()
        chain(*[noop.s() for _ in range(hops)]).apply_async().get(timeout=300)
        hop_ms = (time.perf_counter() - t) / hops * 1000
        t = time.perf_counter()
        results = [chain(*[noop.s() for _ in range(10)]).apply_async() for _ in range(runs)]
        for r in results:
            r.get(timeout=300)
        steps_s = runs * 10 / (time.perf_counter() - t)
        t = time.perf_counter()
        results = [chord(group(noop.s() for _ in range(width)), join.s()).apply_async()
                   for _ in range(chords)]
        for r in results:
            assert r.get(timeout=300) == width
        branches_s = chords * width / (time.perf_counter() - t)
    return {"hop_ms": hop_ms, "steps_s": steps_s, "branches_s": branches_s}


def ours(url: str, runs: int, hops: int, chords: int, width: int) -> dict[str, float]:
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": url, "ORCHESTRATOR_WORKFLOWS": "bench.flows",
           "PYTHONPATH": str(ROOT)}
    os.environ.update(ORCHESTRATOR_REDIS_URL=url, ORCHESTRATOR_WORKFLOWS="bench.flows")
    from bench.flows import fan_out, loop, noop10
    from orchestrator import Settings, WorkflowRunner, create_app

    app = create_app(Settings.from_env())
    client = redis.Redis.from_url(url)
    cli = [sys.executable, "-m", "orchestrator.cli"]
    with processes([*cli, "worker", "-c", "2", "-n", "bench@%h", *WORKER_FLAGS],
                   [*cli, "coordinator", "-n", "bench-coord@%h", *WORKER_FLAGS], env=env):

        def completed(ids: list[str]) -> bool:
            statuses = client.hmget("bench:status", ids)
            return all(s == b"completed" for s in statuses)

        warm = WorkflowRunner(noop10, app=app).run()
        warm.result(timeout=120)

        handle = WorkflowRunner(loop, app=app).run({"times": hops})
        t = time.perf_counter()
        wait_until(lambda: completed([handle.run_id]))
        hop_ms = (time.perf_counter() - t) / hops * 1000
        ticks = [e["at"] for e in handle.history() if e["event"] == "step_completed"]
        window = min(50, (len(ticks) - 1) // 2)
        first = (ticks[window] - ticks[0]) / window
        last = (ticks[-1] - ticks[-1 - window]) / window

        runner = WorkflowRunner(noop10, app=app)
        t = time.perf_counter()
        ids = [runner.run().run_id for _ in range(runs)]
        wait_until(lambda: completed(ids))
        steps_s = runs * 10 / (time.perf_counter() - t)

        fanner = WorkflowRunner(fan_out, app=app)
        t = time.perf_counter()
        ids = [fanner.run({"width": width}).run_id for _ in range(chords)]
        wait_until(lambda: completed(ids))
        branches_s = chords * width / (time.perf_counter() - t)
        outputs = {fanner.attach(i).result(timeout=1).output for i in ids}
        assert outputs == {width}, outputs
    return {"hop_ms": hop_ms, "steps_s": steps_s, "branches_s": branches_s,
            "loop_first50_ms": first * 1000, "loop_last50_ms": last * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="chains/runs of 10 in flight")
    parser.add_argument("--loop", type=int, default=200,
                        help="hops for per-step latency (at least 3)")
    parser.add_argument("--chords", type=int, default=50)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    flush = redis.Redis.from_url(a.redis_url).flushdb
    flush()
    raw = raw_celery(a.redis_url, 4, a.runs, a.loop, a.chords, a.width)
    flush()
    raw1 = raw_celery(a.redis_url, 1, a.runs, a.loop, a.chords, a.width)
    flush()
    us = ours(a.redis_url, a.runs, a.loop, a.chords, a.width)
    flush()
    report = {
        "raw_celery": raw, "raw_celery_prefetch1": raw1, "ours": us,
        "ratio_steps_s": us["steps_s"] / raw["steps_s"],
        "ratio_branches_s": us["branches_s"] / raw["branches_s"],
        "ratio_hop_latency": us["hop_ms"] / raw["hop_ms"],
        "loop_last50_over_first50": us["loop_last50_ms"] / us["loop_first50_ms"],
    }
    if a.json:
        print(json.dumps(report, indent=2))
        return
    rows = [("per-step latency (ms)", "hop_ms"), ("steps/s, chains of 10", "steps_s"),
            (f"branches/s, chords of {a.width}", "branches_s")]
    print(f"{'':34}{'raw celery':>12}{'raw, pf=1':>12}{'ours':>12}{'ours/raw':>10}")
    for label, key in rows:
        print(f"{label:34}{raw[key]:12.2f}{raw1[key]:12.2f}{us[key]:12.2f}"
              f"{us[key] / raw[key]:10.2f}")
    print(f"loop: first 50 iterations {us['loop_first50_ms']:.2f} ms/step, last 50 "
          f"{us['loop_last50_ms']:.2f} ms/step (ratio {report['loop_last50_over_first50']:.2f})")


if __name__ == "__main__":
    main()
