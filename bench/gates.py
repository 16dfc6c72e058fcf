"""Gates: Redis memory per parked run, and latency from approve() to the next step starting.

Usage: python bench/gates.py [--runs 10000] [--approvals 50] [--redis-url URL]
Needs Redis (default redis://127.0.0.1:6379/15, which it flushes). Starts one worker and
one coordinator as subprocesses (`orchestrator worker|coordinator`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis

from orchestrator import (
    END,
    START,
    HumanApproval,
    Next,
    Settings,
    Wait,
    Workflow,
    WorkflowRunner,
    create_app,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the worker imports `bench.gates`

from bench.nodes import start_node, stop_nodes, wait_until  # noqa: E402


def _release(ctx: Any) -> Next:
    # The moment the step after the gate starts, in the run's own key.
    redis.Redis.from_url(os.environ["ORCHESTRATOR_REDIS_URL"]).set(
        f"bench:{ctx.run_id}:released", repr(time.time()))
    return Next(END, output="released")


parked = Workflow("BenchParked").persistence(key_prefix="bench:").flow({
    START: lambda ctx: Wait(HumanApproval(approvers=["ops-lead"]), "Release"),
    "Release": _release,
})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--approvals", type=int, default=50)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": args.redis_url,
           "ORCHESTRATOR_WORKFLOWS": "bench.gates", "PYTHONPATH": str(ROOT)}
    os.environ.update({k: env[k] for k in ("ORCHESTRATOR_REDIS_URL", "ORCHESTRATOR_WORKFLOWS")})
    procs = [start_node("coordinator", env, "bench-coord"),
             start_node("worker", env, "bench-worker")]
    try:
        runner = WorkflowRunner(parked, app=create_app(Settings.from_env(), [parked],
                                                       import_modules=False))
        before = client.info("memory")["used_memory"]
        started = time.perf_counter()
        handles = [runner.run(run_id=f"p{i}") for i in range(args.runs)]
        wait_until(lambda: client.scard("bench:gates") == args.runs, 1200, "runs to park")
        parked_s = time.perf_counter() - started
        per_run = (client.info("memory")["used_memory"] - before) / args.runs
        queued = sum(client.llen(q) for q in [*client.scan_iter("orchestrator.steps*"),
                                                 b"orchestrator.coordinator"])

        latencies = []
        for handle in handles[: args.approvals]:
            t0 = time.time()
            handle.approve(by="ops-lead")
            key = f"bench:{handle.run_id}:released"
            wait_until(lambda k=key: client.exists(k), 60, "the step after the gate")
            latencies.append((float(client.get(key) or 0) - t0) * 1000)
        result = {
            "parked_runs": args.runs, "seconds_to_park": round(parked_s, 1),
            "redis_bytes_per_parked_run": round(per_run),
            "broker_messages_while_parked": queued,
            "approve_to_next_step_ms_median": round(statistics.median(latencies), 2),
            "approve_to_next_step_ms_p95": round(
                statistics.quantiles(latencies, n=20)[-1], 2) if len(latencies) > 1 else None,
        }
        print(json.dumps(result) if args.json else
              "\n".join(f"{k:36} {v}" for k, v in result.items()))
    finally:
        stop_nodes(procs)


if __name__ == "__main__":
    main()
