"""Workflows the tests run, in embedded mode and on worker subprocesses.

Steps talk to the test through Redis (ORCHESTRATOR_REDIS_URL): they record what they did
under `t:<run id>:...` keys and wait for keys the test sets, so tests synchronise on events.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from pydantic import BaseModel

from orchestrator import END, START, HumanApproval, Next, Wait, Workflow, step

_clients: dict[str, redis.Redis] = {}


def r() -> redis.Redis:
    url = os.environ.get("ORCHESTRATOR_REDIS_URL", "redis://127.0.0.1:6379/0")
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


def note(ctx: Any, what: str, **extra: Any) -> None:
    entry = {"what": what, "step": ctx.step, "attempt": ctx.attempt, "pid": os.getpid(), **extra}
    r().rpush(f"t:{ctx.run_id}:events", json.dumps(entry))


def events(client: redis.Redis, run_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.lrange(f"t:{run_id}:events", 0, -1)]


def wait_key(key: str, timeout: float = 120) -> None:
    """Block a step until the test sets `key` (bounded, so a broken test cannot hang)."""
    deadline = time.monotonic() + timeout
    while not r().exists(key):
        if time.monotonic() > deadline:
            raise TimeoutError(f"test never set {key}")
        time.sleep(0.02)


# ---- loops and branches -------------------------------------------------------------


class LoopInput(BaseModel):
    times: int = 200


class LoopState(BaseModel):
    n: int = 0


def tick(ctx: Any) -> str:
    ctx.set_state(n=ctx.state.n + 1)
    return "Tick" if ctx.state.n < ctx.input.times else END


loop = (Workflow("Loop", "A step that returns itself").input(LoopInput).state(LoopState)
        .persistence(key_prefix="loop:").flow({START: "Tick", "Tick": tick}))


class BranchInput(BaseModel):
    value: int


def check(ctx: Any) -> str:
    return "Big" if ctx.input.value > 10 else "Small"


branching = Workflow("Branching").input(BranchInput).flow({
    START: "Check",
    "Check": check,
    "Big": lambda ctx: Next(END, output="big"),
    "Small": lambda ctx: Next(END, output="small"),
})


# ---- control: pause, stop, kill ---------------------------------------------------------


def held(ctx: Any) -> str:
    note(ctx, "started")
    wait_key(f"t:{ctx.run_id}:release")
    note(ctx, "finished")
    return "B"


def b_step(ctx: Any) -> str:
    note(ctx, "started")
    return "C"


def c_step(ctx: Any) -> Next:
    note(ctx, "started")
    return Next(END, output="done")


three_steps = Workflow("ThreeSteps").flow({START: "A", "A": held, "B": b_step, "C": c_step})


def killable(ctx: Any) -> Next:
    note(ctx, "started")
    if r().set(f"t:{ctx.run_id}:first", 1, nx=True):
        wait_key(f"t:{ctx.run_id}:never", timeout=300)  # the test kills us here
    note(ctx, "finished")
    return Next("After", output={"pid": os.getpid(), "attempt": ctx.attempt})


killable_flow = Workflow("Killable").flow({
    START: "Work", "Work": killable, "After": lambda ctx: END})


class FlakyState(BaseModel):
    tries: int = 0


@step(retries=2, backoff=1.5)
def flaky(ctx: Any) -> Next:
    note(ctx, "started")
    if r().incr(f"t:{ctx.run_id}:flaky") == 1:
        raise ConnectionError("first try always fails")
    return Next(END, output={"attempt": ctx.attempt})


flaky_flow = Workflow("Flaky").state(FlakyState).flow({START: "Work", "Work": flaky})


def count_once(ctx: Any) -> Next:
    r().incr(f"t:{ctx.run_id}:count")
    wait_key(f"t:{ctx.run_id}:release")
    return Next("Done", output=ctx.attempt)


counting = Workflow("Counting").flow({
    START: "Count", "Count": count_once, "Done": lambda ctx: Next(END, output="ok")})


# ---- bad things ---------------------------------------------------------------------


class NState(BaseModel):
    n: int = 0


def set_bad_state(ctx: Any) -> str:
    ctx.set_state(n="not a number")
    return END


bad_state = Workflow("BadState").state(NState).flow({START: "Set", "Set": set_bad_state})

bad_transition = Workflow("BadTransition").flow({
    START: "Go", "Go": lambda ctx: "Nowhere", "Elsewhere": lambda ctx: END})

bad_output = Workflow("BadOutput").flow({
    START: "Emit", "Emit": lambda ctx: Next(END, output={"when": object()})})


# ---- imperative ---------------------------------------------------------------------


class ImperativeState(BaseModel):
    done: list[str] = []


def imperative_body(ctx: Any) -> dict[str, Any]:
    for part in ("fetch", "transform", "load"):
        ctx.set_state(done=[*ctx.state.done, part])
        r().rpush(f"t:{ctx.run_id}:checkpoints", json.dumps(ctx.state.done))
        if part == "transform" and r().exists(f"t:{ctx.run_id}:hold"):
            wait_key(f"t:{ctx.run_id}:release")
    return {"parts": len(ctx.state.done)}


imperative = (Workflow("Imperative", "One function").state(ImperativeState)
              .execute(imperative_body))


# ---- gates ----------------------------------------------------------------------------


class GateInput(BaseModel):
    approvers: list[str] = ["ops-lead"]
    min_approvals: int = 1
    timeout: float | None = None
    on_timeout: str | None = None
    on_reject: str | None = None


def ask(ctx: Any) -> Wait:
    i = ctx.input
    return Wait(HumanApproval(approvers=i.approvers, min_approvals=i.min_approvals,
                              timeout=i.timeout, on_timeout=i.on_timeout, on_reject=i.on_reject,
                              prompt="Go ahead?", payload={"risk": "low"}), "Release")


def ending(label: str) -> Any:
    def finish(ctx: Any) -> Next:
        note(ctx, "started")
        return Next(END, output=label)

    finish.__name__ = label
    return finish


gated = Workflow("Gated").input(GateInput).flow({
    START: "Ask", "Ask": ask, "Release": ending("released"), "TimedOut": ending("timed_out"),
    "Rejected": ending("rejected"),
})
