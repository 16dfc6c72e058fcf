"""What tracing adds to a step, in three setups, each in a process of its own (the global
TracerProvider can be set once per process):

  absent     opentelemetry cannot be imported (as without the otel extra): no hook at all
  no-op      opentelemetry installed, no TracerProvider set (the API's default)
  recording  an SDK TracerProvider whose spans go to a processor that drops them (the
             cost of making spans, without an exporter's)

Usage:
    .venv/bin/python bench/tracing_cost.py [--steps 3000] [--rounds 5] [--json]

Two measures per setup, medians over --rounds (the setups interleaved in each round, so
machine drift hits them alike):

  hooks    the middleware hooks a worker calls around one step (before_step, after_step),
           alone, per step
  loop     one step of bench/flows.py's loop run by `Runtime.execute` on a MemoryStore (no
           Redis, no Celery: the smallest whole step there is, so any cost shows), per step
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SETUPS = ("absent", "no-op", "recording")

CHILD = r"""
import json, sys, time
setup, steps = sys.argv[1], int(sys.argv[2])
if setup == "absent":
    sys.modules["opentelemetry"] = None
elif setup == "recording":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    provider = TracerProvider()
    provider.add_span_processor(SpanProcessor())  # on_end does nothing: spans are dropped
    trace.set_tracer_provider(provider)
from bench.flows import loop
from orchestrator import MemoryStore, Settings
from orchestrator._dispatch.base import Dispatcher
from orchestrator._engine import SendTask
from orchestrator._runtime import Runtime

class Collect(Dispatcher):
    def __init__(self): self.sent = []
    def send(self, commands): self.sent.extend(commands)

out, store = Collect(), MemoryStore(loop.persistence_options.key_prefix)
runtime = Runtime(out, Settings(workflows=()), [loop], store_factory=lambda prefix: store)
runtime.start(loop, {"times": 10**9})
hooks = runtime.committer.hooks

def step():
    cmd = out.sent.pop()
    runtime.execute(cmd.workflow, cmd.run_id, cmd.task.token)

for _ in range(300):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
loop_us = (time.perf_counter() - t) / steps * 1e6

record = store.load(out.sent[-1].run_id).record
task = record.task
t = time.perf_counter()
for _ in range(steps):
    if hooks:  # as _worker.WorkerExecution._run calls them
        hooks.call("before_step", record, task)
        hooks.call("after_step", record, task, False, 0.0)
hooks_us = (time.perf_counter() - t) / steps * 1e6
print(json.dumps({"loop_us": loop_us, "hooks_us": hooks_us, "hooked": bool(hooks)}))
"""


def run(setup: str, steps: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, setup, str(steps)], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    samples: dict[str, list[dict[str, Any]]] = {s: [] for s in SETUPS}
    for i in range(a.rounds):
        order = SETUPS if i % 2 == 0 else SETUPS[::-1]
        for setup in order:
            samples[setup].append(run(setup, a.steps))
    report = {s: {"hooks_us": statistics.median(x["hooks_us"] for x in samples[s]),
                  "loop_us": statistics.median(x["loop_us"] for x in samples[s]),
                  "loop_us_range": [min(x["loop_us"] for x in samples[s]),
                                    max(x["loop_us"] for x in samples[s])],
                  "hooked": samples[s][0]["hooked"]} for s in SETUPS}
    if a.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'setup':10} {'hooks/step':>12} {'loop step':>12}  loop range over {a.rounds} rounds")
    for s, r in report.items():
        lo, hi = r["loop_us_range"]
        print(f"{s:10} {r['hooks_us']:10.2f}us {r['loop_us']:10.1f}us  {lo:.1f}-{hi:.1f}us"
              f"{'' if r['hooked'] else '  (no hooks)'}")


if __name__ == "__main__":
    main()
