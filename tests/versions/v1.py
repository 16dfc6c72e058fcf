"""Rollout, version 1: A, a gate, then B."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from orchestrator import END, START, HumanApproval, Next, Wait, Workflow
from tests.flows import note


class RolloutInput(BaseModel):
    gate: bool = True
    count: int = 0


class RolloutState(BaseModel):
    count: int = 0


def a(ctx: Any) -> Any:
    note(ctx, "ran", version="1")
    ctx.set_state(count=ctx.input.count)
    return Wait(HumanApproval(approvers=["ops"]), "B") if ctx.input.gate else "B"


def b(ctx: Any) -> Next:
    note(ctx, "ran", version="1")
    return Next(END, output={"version": "1"})


rollout = (Workflow("Rollout", "Two steps around a gate", version="1")
           .input(RolloutInput).state(RolloutState).persistence(key_prefix="roll:")
           .flow({START: "A", "A": a, "B": b}))
