"""Benchmark workflows: a 10-step no-op chain, a self-loop, and a fan-out."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from orchestrator import END, START, Next, Parallel, Workflow


def _to(target: str) -> Any:
    def hop(ctx: Any) -> str:
        return target

    return hop


noop10 = Workflow("Noop10", "Ten no-op steps").persistence(key_prefix="bench:").flow({
    START: "S1",
    **{f"S{i}": _to(f"S{i + 1}") for i in range(1, 10)},
    "S10": _to(END),
})


class LoopInput(BaseModel):
    times: int = 200


class LoopState(BaseModel):
    n: int = 0


def tick(ctx: Any) -> str:
    ctx.set_state(n=ctx.state.n + 1)
    return "Tick" if ctx.state.n < ctx.input.times else END


loop = (Workflow("BenchLoop").input(LoopInput).state(LoopState)
        .persistence(key_prefix="bench:").flow({START: "Tick", "Tick": tick}))


class FanInput(BaseModel):
    width: int = 8


def noop_branch(ctx: Any) -> int:
    return 1


def fan(ctx: Any) -> Parallel:
    return Parallel.map(noop_branch, range(ctx.input.width), "Gather")


def gather(ctx: Any) -> Next:
    return Next(END, output=sum(ctx.step_results["noop_branch"]))


fan_out = (Workflow("BenchFanOut").input(FanInput).persistence(key_prefix="bench:")
           .flow({START: "Fan", "Fan": fan, "Gather": gather}))
