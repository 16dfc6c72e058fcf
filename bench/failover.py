"""Runs in flight across a Redis Sentinel failover, at full size and in variants.

Usage: python bench/failover.py [--runs 500] [--replicas 1] [--min-replicas-ack 1]
                                [--rejoin replica|sentinel|none] [--workers 2] [--json]
       python bench/failover.py --commit-cost 2000 [--replicas 1]

Starts everything itself on free loopback ports (a primary, its replicas and three
sentinels, a side-channel redis-server, a coordinator and workers) and runs the scenario
tests/test_failover.py runs with 200: half the runs stop at a gate, gates open at the kill
are approved just before it, the primary is SIGKILLed once half the runs have started, the
rest start and are approved across the failover. Prints the figures (docs/operations.md,
"Redis Sentinel"). `--rejoin`: how the killed primary comes back: restarted as a replica of
the promoted one (replica), restarted as it was and left to the sentinels (sentinel), or
not at all (none: needs --replicas 2 or --min-replicas-ack 0, or nothing commits again).
`--commit-cost N`: instead, the median and p99 latency of N run creations (one Lua commit
each) through Sentinel with MIN_REPLICAS_ACK 0 and 1: what WAIT adds to a commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: tests.* are importable

from tests.conftest import RedisServer  # noqa: E402
from tests.failover_scenario import run_scenario  # noqa: E402
from tests.sentinels import SentinelDeployment  # noqa: E402


def commit_cost(deployment: SentinelDeployment, n: int) -> dict[str, float]:
    from orchestrator import _engine as engine
    from orchestrator._records import FlowSpec, StepPolicy, StepSpec
    from orchestrator._stores import RedisStore

    spec = FlowSpec("Cost", "v1", {"__start__": StepSpec(StepPolicy(queue="none"))})
    out: dict[str, float] = {}
    for ack in (0, 1, 0, 1):  # interleaved, each measured twice; the second counts
        store = RedisStore(deployment.url(), f"cost{ack}:", min_replicas_ack=ack)
        took = []
        for i in range(n):
            d = engine.start(spec, f"c{i}-{time.time_ns()}", {}, {}, 0.0)
            assert d.record is not None
            began = time.perf_counter()
            store.create(d.record, d.history, None)
            took.append((time.perf_counter() - began) * 1000)
        store.close()
        out[f"ack{ack}_median_ms"] = round(statistics.median(took), 3)
        out[f"ack{ack}_p99_ms"] = round(statistics.quantiles(took, n=100)[-1], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--min-replicas-ack", type=int, default=1)
    parser.add_argument("--rejoin", choices=["replica", "sentinel", "none"], default="replica")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--commit-cost", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.commit_cost:
        deployment = SentinelDeployment(replicas=args.replicas)
        try:
            deployment.start()
            print(json.dumps(commit_cost(deployment, args.commit_cost)))
        finally:
            deployment.stop()
        return
    if args.rejoin == "none" and args.min_replicas_ack >= args.replicas:
        parser.error("--rejoin none leaves too few replicas to acknowledge any commit")

    deployment = SentinelDeployment(replicas=args.replicas)
    side = RedisServer()
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-failover-"))
    try:
        deployment.start()
        side.start()
        figures = run_scenario(deployment, side, tmp, runs=args.runs, workers=args.workers,
                               concurrency=args.concurrency,
                               min_replicas_ack=args.min_replicas_ack, rejoin=args.rejoin,
                               timeout=max(240.0, args.runs * 0.5))
    finally:
        deployment.stop()
        side.stop()
        shutil.rmtree(side.dir, ignore_errors=True)
    print(json.dumps(dataclasses.asdict(figures)) if args.json else "\n".join(figures.lines()))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
