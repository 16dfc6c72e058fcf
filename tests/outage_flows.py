"""A workflow that keeps workers busy while a test restarts Redis under them.

Each step works for a while (BUSY_SECONDS) and records its side effect in a file, not in
Redis: the record must survive the outage the test causes, and a step must not fail just
because Redis is briefly away while it runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel

from orchestrator import END, START, Next, Workflow

STEPS = 4
BUSY_SECONDS = 0.2
EFFECTS_DIR = "ORCHESTRATOR_TEST_EFFECTS_DIR"


class BusyState(BaseModel):
    done: int = 0


def _effect(ctx: Any) -> None:
    # One line per execution; O_APPEND keeps concurrent processes' lines whole.
    line = f"{ctx.idempotency_key} {ctx.step} {os.getppid()}\n"  # the parent: the worker
    with open(Path(os.environ[EFFECTS_DIR]) / f"{ctx.run_id}.log", "a") as f:
        f.write(line)


def _work(index: int) -> Any:
    def work(ctx: Any) -> Any:
        time.sleep(BUSY_SECONDS)  # the step's own work, so it is mid-step when Redis goes
        _effect(ctx)
        ctx.set_state(done=ctx.state.done + 1)
        if index == STEPS:
            return Next(END, output=ctx.state.done)
        return f"S{index + 1}"

    work.__name__ = work.__qualname__ = f"work{index}"
    return work


busy = (Workflow("Busy", "Steps that take a while").state(BusyState)
        .persistence(key_prefix="busy:")
        .flow({START: "S1", **{f"S{i}": _work(i) for i in range(1, STEPS + 1)}}))


class Effect(NamedTuple):
    key: str  # the step's idempotency key: one per dispatch token
    step: str
    worker_pid: int


def effects(directory: Path) -> list[Effect]:
    """Every execution of a step so far, of every run."""
    return [Effect(k, s, int(pid)) for path in sorted(directory.glob("*.log"))
            for k, s, pid in (line.split() for line in path.read_text().splitlines())]
