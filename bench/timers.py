"""Timers: runs asleep on a durable timer, and how late 1,000 timers due at one instant fire.

Usage: python bench/timers.py [--runs 1000] [--lead 20] [--coordinators 1] [--redis-url URL]
Needs Redis (default redis://127.0.0.1:6379/15, which it flushes). Starts one worker and
`--coordinators` coordinators as subprocesses (`orchestrator worker|coordinator`), with the
default sweep (every 1 s, 500 runs a pass). Every run sleeps `Until` the same instant,
`--lead` seconds after the first start; lateness is `woke_at - slept_until` of each run (the
coordinator's sweep firing the timer), read back from the runs' results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel

from orchestrator import (
    END,
    START,
    RunStatus,
    Settings,
    Until,
    Wait,
    Workflow,
    WorkflowRunner,
    create_app,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the worker imports `bench.timers`

from bench.nodes import start_node, stop_nodes, wait_until  # noqa: E402


class At(BaseModel):
    at: float


def _sleep(ctx: Any) -> Wait:
    return Wait(Until(datetime.fromtimestamp(ctx.input.at, UTC)), "Done")


sleepers = (Workflow("BenchSleepers").input(At).persistence(key_prefix="timers:")
            .flow({START: _sleep, "Done": lambda ctx: END}))


def _quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--lead", type=float, default=20.0,
                        help="seconds from the first start to the instant every timer is due")
    parser.add_argument("--coordinators", type=int, default=1)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": args.redis_url,
           "ORCHESTRATOR_WORKFLOWS": "bench.timers", "PYTHONPATH": str(ROOT)}
    os.environ.update({k: env[k] for k in ("ORCHESTRATOR_REDIS_URL", "ORCHESTRATOR_WORKFLOWS")})
    procs = [start_node("worker", env, "bench-worker")]
    procs += [start_node("coordinator", env, f"bench-coord{i}") for i in range(args.coordinators)]
    try:
        app = create_app(Settings.from_env(), [sleepers], import_modules=False)
        runner = WorkflowRunner(sleepers, app=app)
        store = runner.store
        before = client.info("memory")["used_memory"]
        at = store.now() + args.lead
        handles = [runner.run({"at": at}, run_id=f"s{i}") for i in range(args.runs)]
        asleep = lambda: store.count_runs("BenchSleepers")[RunStatus.WAITING]  # noqa: E731
        wait_until(lambda: asleep() == args.runs or store.now() >= at, args.lead + 60,
              "runs to fall asleep")
        if asleep() != args.runs:
            raise SystemExit(f"only {asleep()} of {args.runs} asleep before the instant: "
                             f"raise --lead")
        per_run = (client.info("memory")["used_memory"] - before) / args.runs
        queued = sum(client.llen(q) for q in [*client.scan_iter("orchestrator.steps*"),
                                                 b"orchestrator.coordinator"])
        done = lambda: store.count_runs("BenchSleepers")[RunStatus.COMPLETED]  # noqa: E731
        wait_until(lambda: done() == args.runs, args.lead + 600, "every timer to fire")
        late = [(r.step_results[START]["woke_at"] - r.step_results[START]["slept_until"]) * 1000
                for r in (h.record() for h in handles)]
        result = {
            "sleeping_runs": args.runs, "coordinators": args.coordinators,
            "redis_bytes_per_sleeping_run": round(per_run),
            "broker_messages_while_asleep": queued,
            "timer_lateness_ms_p50": round(statistics.median(late), 1),
            "timer_lateness_ms_p99": round(_quantile(late, 99), 1),
            "timer_lateness_ms_max": round(max(late), 1),
        }
        print(json.dumps(result) if args.json else
              "\n".join(f"{k:36} {v}" for k, v in result.items()))
    finally:
        stop_nodes(procs)


if __name__ == "__main__":
    main()
