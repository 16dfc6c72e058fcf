"""Where the CPU of one step goes: our per-step work in one process, phase by phase.

Usage:
    .venv/bin/python bench/stepcost.py [--steps 2000] [--width 8]
        [--redis-url redis://127.0.0.1:6379/15] [--json]

Needs Redis; the database in --redis-url is FLUSHED. No Celery worker: this process plays
the worker. `Runtime.execute` runs each dispatched task of a run against a RedisStore, and
the dispatcher only collects the commands (Celery's publish, the same one message per step
a raw chain sends, is left out). First without a profiler (CPU and wall time per step), then
under cProfile with a CPU clock, to split that CPU time into phases:

  loop step      one iteration of bench/flows.py's loop (set_state, go to itself)
  fan-out branch one branch of a --width fan-out (the whole record is loaded per branch)
  run start      WorkflowRunner.run's work in the app (validate, create, no dispatch)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.flows import fan_out, loop, noop10  # noqa: E402
from orchestrator import Settings  # noqa: E402
from orchestrator._dispatch.base import Dispatcher  # noqa: E402
from orchestrator._engine import Command, SendFork, SendTask  # noqa: E402
from orchestrator._runtime import Runtime  # noqa: E402

# (label, file suffix, function name): cumulative CPU of these, per step.
PHASES = [
    ("WorkerExecution.execute (all of it)", "_worker.py", "execute"),
    ("  store.begin_task: load + lease, 1 round trip", "redis.py", "begin_task"),
    ("    parse the record (pydantic)", "redis.py", "_loaded"),
    ("  run_task: context, the step, its outcome", "_executor.py", "run_task"),
    ("  Committer.apply: decide + commit", "_committer.py", "apply"),
    ("    engine.apply", "_engine.py", "apply"),
    ("      record.model_copy(deep=True)", "main.py", "model_copy"),
    ("    store.commit: serialize + script, 1 round trip", "redis.py", "commit"),
    ("      model_dump_json", "main.py", "model_dump_json"),
    ("  store.record_branch (branches), 1 round trip", "redis.py", "record_branch"),
    ("  lease heartbeat hold/release", "_leases.py", "hold"),
    ("Runtime.start (run start)", "_runtime.py", "start"),
    ("  Registry.register -> spec_of -> Workflow.version", "_registry.py", "register"),
    ("  store.create, 1 round trip", "redis.py", "create"),
    ("redis-py: socket reads + writes (all calls)", "connection.py", "send_packed_command"),
    ("redis-py: read_response (all calls)", "connection.py", "read_response"),
]


class Collect(Dispatcher):
    def __init__(self) -> None:
        self.sent: list[Command] = []

    def send(self, commands: Sequence[Command]) -> None:
        self.sent.extend(commands)


def measure(fn: Callable[[], None], n: int) -> dict[str, Any]:
    """Run `fn` n times plain, then n times under a CPU-clock profiler."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    wall, cpu = (time.perf_counter() - t) / n * 1000, (time.process_time() - c) / n * 1000
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    phases = {}
    for label, suffix, name in PHASES:
        cum = sum(v[3] for k, v in stats.items() if k[0].endswith(suffix) and k[2] == name)
        if cum:
            phases[label] = cum / total  # share of the profiled CPU time
    return {"wall_ms": wall, "cpu_ms": cpu, "phases": phases}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="steps, branches and starts")
    parser.add_argument("--width", type=int, default=8, help="fan-out width (default 8)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15",
                        help="Redis to use; its database is flushed (default DB 15)")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    client = redis.Redis.from_url(a.redis_url)
    client.flushdb()
    out = Collect()
    runtime = Runtime(out, Settings(redis_url=a.redis_url, workflows=()),
                      [loop, fan_out, noop10])
    report: dict[str, Any] = {}
    try:
        runtime.start(loop, {"times": 10**9})

        def loop_step() -> None:
            cmd = out.sent.pop()
            assert isinstance(cmd, SendTask), cmd
            runtime.execute(cmd.workflow, cmd.run_id, cmd.task.token)

        for _ in range(200):  # warm
            loop_step()
        report["loop step"] = measure(loop_step, a.steps)

        branches: list[tuple[str, int, str]] = []

        def branch() -> None:
            if not branches:  # a new fan-out: start it, run Fan, keep its branches
                out.sent.clear()
                runtime.start(fan_out, {"width": a.width})
                cmd = out.sent.pop()
                assert isinstance(cmd, SendTask), cmd
                runtime.execute(cmd.workflow, cmd.run_id, cmd.task.token)
                fork = out.sent.pop()
                assert isinstance(fork, SendFork), fork
                branches.extend((fork.run_id, t.token, t.branch or "") for t in fork.tasks)
            run_id, token, name = branches.pop()
            runtime.execute(fan_out.name, run_id, token, name)

        for _ in range(a.width * 4):
            branch()
        branches.clear()
        report["fan-out branch"] = measure(branch, a.steps)

        def start() -> None:
            runtime.start(noop10, {})
            out.sent.clear()

        report["run start"] = measure(start, a.steps)
    finally:
        client.flushdb()
    if a.json:
        print(json.dumps(report, indent=2))
        return report
    print("(the fan-out branch rows include a share of starting and running each fan-out's"
          " Fan step)")
    for what, r in report.items():
        print(f"== {what}: {r['cpu_ms']:.3f} ms CPU, {r['wall_ms']:.3f} ms wall, unprofiled")
        for label, share in r["phases"].items():
            print(f"   {label:52} {share * 100:5.1f}%  ~{share * r['cpu_ms']:.3f} ms")
    return report


if __name__ == "__main__":
    main()
