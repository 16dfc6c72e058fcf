"""A workflow for the Sentinel failover test: sequential steps, a fan-out, an optional gate.

Every step and branch records its side effect in a side channel that the failover does not
touch: a plain redis-server of the test's own (`ORCHESTRATOR_TEST_SIDE_URL`), never the
Redis under test. Per idempotency key (one per dispatched token, stable across
redeliveries) it counts executions (`INCR`) and applies the effect once (`SET NX`), as a
step with an external side effect should.

    Prep -> Fan =fork=> [leaf x width] -> Gather ?gate? -> Finish
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from pydantic import BaseModel

from orchestrator import END, START, HumanApproval, Next, Parallel, Wait, Workflow

SIDE_URL = "ORCHESTRATOR_TEST_SIDE_URL"
WORK_SECONDS = 0.02  # each step's own work, so the kill finds steps mid-flight
APPROVER = "ops-lead"

_side: dict[str, redis.Redis] = {}


def side() -> redis.Redis:
    url = os.environ[SIDE_URL]
    if url not in _side:
        _side[url] = redis.Redis.from_url(url)
    return _side[url]


def effect(ctx: Any, what: str) -> None:
    """Count this execution; apply the effect once per idempotency key."""
    key = ctx.idempotency_key
    pipe = side().pipeline(transaction=False)
    pipe.incr(f"exec:{key}")
    pipe.set(f"applied:{key}", what, nx=True)
    pipe.sadd(f"keys:{ctx.run_id}", key)
    pipe.execute()


class In(BaseModel):
    gated: bool = False
    width: int = 3


class State(BaseModel):
    sequential: int = 0  # each sequential step adds one: a state change applied twice shows


def prep(ctx: Any) -> str:
    time.sleep(WORK_SECONDS)
    effect(ctx, "prep")
    ctx.set_state(sequential=ctx.state.sequential + 1)
    return "Fan"


def fan(ctx: Any) -> Parallel:
    effect(ctx, "fan")
    return Parallel.map(leaf, range(ctx.input.width), "Gather")


def leaf(ctx: Any) -> int:
    time.sleep(WORK_SECONDS)
    effect(ctx, f"leaf{ctx.item}")
    return int(ctx.item) ** 2


def gather(ctx: Any) -> Any:
    effect(ctx, "gather")
    ctx.set_state(sequential=ctx.state.sequential + 1)
    if ctx.input.gated:
        return Wait(HumanApproval(approvers=[APPROVER]), "Finish")
    return "Finish"


def finish(ctx: Any) -> Next:
    time.sleep(WORK_SECONDS)
    effect(ctx, "finish")
    ctx.set_state(sequential=ctx.state.sequential + 1)
    return Next(END, output={"sequential": ctx.state.sequential,
                             "total": sum(ctx.step_results["leaf"])})


failover = (Workflow("Failover", "Steps, a fan-out and a gate across a Redis failover")
            .input(In).state(State).persistence(key_prefix="fo:")
            .flow({START: "Prep", "Prep": prep, "Fan": fan, "Gather": gather,
                   "Finish": finish}))


def expected_output(width: int) -> dict[str, int]:
    return {"sequential": 3, "total": sum(i * i for i in range(width))}
