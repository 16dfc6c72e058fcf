"""Benchmark workflows: a 10-step no-op chain, a self-loop, a fan-out, and a gate.

Workers host them with `ORCHESTRATOR_WORKFLOWS=bench.flows`. Every step is a no-op, so a
benchmark measures the runtime (messages, Redis, the engine), not user code.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from orchestrator import END, START, HumanApproval, Next, Parallel, Wait, Workflow

PREFIX = "bench:"


def _hop(target: str) -> Any:
    """A no-op step that goes to `target`."""

    def hop(ctx: Any) -> str:
        return target

    hop.__name__ = hop.__qualname__ = f"to_{target}"
    return hop


# START -> S1 -> ... -> S10 -> END: ten tasks, no input, no state.
noop10 = (
    Workflow("Noop10", "Ten no-op steps")
    .persistence(key_prefix=PREFIX)
    .flow({START: "S1", **{f"S{i}": _hop(f"S{i + 1}") for i in range(1, 10)}, "S10": _hop(END)})
)


class LoopInput(BaseModel):
    times: int = 200


class LoopState(BaseModel):
    n: int = 0


def tick(ctx: Any) -> str:
    """Count one iteration; come back here until `times` iterations have run."""
    ctx.set_state(n=ctx.state.n + 1)
    return "Tick" if ctx.state.n < ctx.input.times else END


# One step that returns itself `times` times: the run's history grows, its record does not.
loop = (
    Workflow("BenchLoop", "A step that loops on itself")
    .input(LoopInput)
    .state(LoopState)
    .persistence(key_prefix=PREFIX)
    .flow({START: "Tick", "Tick": tick})
)


class FanInput(BaseModel):
    width: int = 8


def noop_branch(ctx: Any) -> int:
    """One branch of the fan-out (module level: any worker imports it by reference)."""
    return 1


def fan(ctx: Any) -> Parallel:
    return Parallel.map(noop_branch, range(ctx.input.width), "Gather")


def gather(ctx: Any) -> Next:
    outputs = ctx.step_results["noop_branch"]
    return Next(END, output=sum(outputs))


# Fan -> width x noop_branch (a chord) -> Gather -> END; the output is the branch count.
fan_out = (
    Workflow("BenchFanOut", "A fan-out of no-op branches")
    .input(FanInput)
    .persistence(key_prefix=PREFIX)
    .flow({START: "Fan", "Fan": fan, "Gather": gather})
)


def released(ctx: Any) -> Next:
    """The step after the gate: its output is the moment it started (this host's clock)."""
    return Next(END, output=time.time())


# START -> a gate for "bench" -> Released -> END: approve() to the next step starting.
gated = (
    Workflow("BenchGate", "A gate, then one step")
    .persistence(key_prefix=PREFIX)
    .flow({START: lambda ctx: Wait(HumanApproval(approvers=["bench"]), "Released"),
           "Released": released})
)

__all__ = ["fan_out", "gated", "loop", "noop10", "noop_branch", "released"]
