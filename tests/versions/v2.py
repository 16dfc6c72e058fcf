"""Rollout, version 2: B is now B2, and the state's count may not be negative. Runs of
version 1 move here with `orchestrator runs upgrade` (B becomes B2)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from orchestrator import END, START, HumanApproval, Next, Wait, Workflow
from tests.flows import note


class RolloutInput(BaseModel):
    gate: bool = True
    count: int = 0


class RolloutState(BaseModel):
    count: int = Field(default=0, ge=0)


def a(ctx: Any) -> Any:
    note(ctx, "ran", version="2")
    ctx.set_state(count=max(0, ctx.input.count))
    return Wait(HumanApproval(approvers=["ops"]), "B2") if ctx.input.gate else "B2"


def b2(ctx: Any) -> Next:
    note(ctx, "ran", version="2")
    return Next(END, output={"version": "2"})


rollout = (Workflow("Rollout", "Two steps around a gate", version="2")
           .input(RolloutInput).state(RolloutState).persistence(key_prefix="roll:")
           .flow({START: "A", "A": a, "B2": b2})
           .upgrades("1", steps={"B": "B2"}))
