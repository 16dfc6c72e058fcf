"""Workflows the tests run, in embedded mode and on worker subprocesses.

Steps talk to the test through Redis (ORCHESTRATOR_REDIS_URL): they record what they did
under `t:<run id>:...` keys and wait for keys the test sets, so tests synchronise on events.
"""

from __future__ import annotations

import json
import operator
import os
import time
from typing import Annotated, Any

import redis
from pydantic import BaseModel

from orchestrator import (
    END,
    START,
    AnyOf,
    Call,
    EchoAgent,
    Event,
    HumanApproval,
    Next,
    NonRetryable,
    Parallel,
    Sleep,
    Wait,
    Workflow,
    reducer,
    step,
)

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


# ---- parallel -----------------------------------------------------------------------


class FanInput(BaseModel):
    width: int = 3


class FanState(BaseModel):
    seed: int = 0
    linux: str | None = None
    mac: str | None = None
    shared: str | None = None
    logs: Annotated[list[str], reducer(operator.add)] = []
    rounds: int = 0


def square(ctx: Any) -> int:
    return int(ctx.item) ** 2 + ctx.state.seed


def fan_map(ctx: Any) -> Parallel:
    ctx.set_state(seed=1)  # branches see the state as it is at the fork
    return Parallel.map(square, range(ctx.input.width), "Gather")


def gather(ctx: Any) -> Next:
    return Next(END, output=ctx.step_results["square"])


fan_out = Workflow("FanOut").input(FanInput).state(FanState).flow({
    START: "Fan", "Fan": fan_map, "Gather": gather})

GATHER_QUEUE = "gather"  # a test can hold the chord's body by consuming no such queue
fan_out_far_gather = Workflow("FanOutFarGather").input(FanInput).state(FanState).flow({
    START: "Fan", "Fan": fan_map, "Gather": step(gather, queue=GATHER_QUEUE)})


def linux(ctx: Any) -> str:
    ctx.set_state(linux=f"linux-{ctx.state.seed}", logs=["linux built"])
    return "L"


def mac(ctx: Any) -> str:
    ctx.set_state(mac="mac", logs=["mac built"])
    return "M"


def win(ctx: Any) -> dict[str, str]:
    return {"os": "win"}


def fork_three(ctx: Any) -> Parallel:
    ctx.set_state(seed=7)
    return Parallel([linux, mac, win], "Join3")


three_way = Workflow("ThreeWay").state(FanState).flow({
    START: "Fork", "Fork": fork_three,
    "Join3": lambda ctx: Next(END, output=sorted(ctx.step_results)),
})


def writes_shared_a(ctx: Any) -> None:
    ctx.set_state(shared="a")


def writes_shared_b(ctx: Any) -> None:
    ctx.set_state(shared="b")


conflict = Workflow("Conflict").state(FanState).flow({
    START: "Fork",
    "Fork": lambda ctx: Parallel({"left": writes_shared_a, "right": writes_shared_b}, "End"),
    "End": lambda ctx: END,
})


@step(retries=0)
def breaks(ctx: Any) -> None:
    note(ctx, "started")
    raise RuntimeError("the mac builder is on fire")


def slow_sibling(ctx: Any) -> str:
    note(ctx, "started")
    wait_key(f"t:{ctx.run_id}:release", timeout=120)
    note(ctx, "finished")
    return "slow done"


def broken_after_sibling(ctx: Any) -> None:
    # Fail only once the sibling is running, so the revoke must stop a live task.
    deadline = time.monotonic() + 60
    while not any(e["step"].endswith(("[slow]", "/slow_sibling]"))
                  for e in events(r(), ctx.run_id)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    breaks(ctx)


failing_branch = Workflow("FailingBranch").flow({
    START: "Fork",
    "Fork": lambda ctx: Parallel({"slow": slow_sibling, "broken": broken_after_sibling}, "End"),
    "End": lambda ctx: END,
})


def loop_fork(ctx: Any) -> Parallel:
    return Parallel([linux, mac], "AfterFork")


def after_fork(ctx: Any) -> str:
    ctx.set_state(rounds=ctx.state.rounds + 1)
    return "Fork" if ctx.state.rounds < 3 else "Second"


def second_fan(ctx: Any) -> Parallel:
    return Parallel.map(square, [3, 4], "Done")


fork_in_loop = Workflow("ForkInLoop").state(FanState).flow({
    START: "Fork", "Fork": loop_fork, "AfterFork": after_fork, "Second": second_fan,
    "Done": lambda ctx: Next(END, output={"rounds": ctx.state.rounds,
                                          "logs": len(ctx.state.logs),
                                          "squares": ctx.step_results["square"]}),
})


# ---- agents -------------------------------------------------------------------------


class NotingAgent(EchoAgent):
    """EchoAgent that tells the test when it is closed (the step may run in a worker)."""

    def __init__(self, run_id: str, name: str = "reviewer") -> None:
        super().__init__(name)
        self.run_id = run_id

    def close(self) -> None:
        super().close()
        r().rpush(f"t:{self.run_id}:closed", self.name)


async def review_politely(ctx: Any) -> Next:
    async with await ctx.agents.reviewer(ctx.run_id, "polite") as agent:
        verdict = agent.review("all good")
    return Next("Sloppy", output=verdict)


def review_sloppily(ctx: Any) -> Next:
    agent = ctx.agents.reviewer(ctx.run_id, "sloppy")  # never closed by the step
    return Next("Crashy", output=agent.review("TODO: fix"))


@step(retries=0)
def review_and_crash(ctx: Any) -> str:
    ctx.agents.reviewer(ctx.run_id, "crashy").review("x")
    raise ValueError("crashed with an agent open")


with_agents = Workflow("WithAgents").agents({"reviewer": NotingAgent}).flow({
    START: "Polite", "Polite": review_politely, "Sloppy": review_sloppily,
    "Crashy": review_and_crash,
})


# ---- many runs parked at a gate ----------------------------------------------------------


parked = Workflow("Parked").persistence(key_prefix="parked:").flow({
    START: lambda ctx: Wait(HumanApproval(approvers=["ops-lead"]), "Release"),
    "Release": lambda ctx: Next(END, output="released"),
})


def build_arch(ctx: Any) -> str:
    ctx.set_state(logs=[f"{ctx.item} built"])
    return f"{ctx.item}-{ctx.state.linux}-{ctx.state.seed}"


def linux_archs(ctx: Any) -> Parallel:
    ctx.set_state(linux="fanned")  # its own branches see this; the join merges it
    return Parallel.map(build_arch, ["x86", "arm"])


def where_am_i(ctx: Any) -> str:
    return str(ctx.branch)


def fork_nested(ctx: Any) -> Parallel:
    ctx.set_state(seed=7)
    return Parallel({
        "linux": linux_archs,  # fans out again when it runs
        "mac": mac,
        "win": Parallel({"x64": where_am_i, "arm64": where_am_i}),  # nested as written
    }, "Bundle")


nested = Workflow("Nested").state(FanState).flow({
    START: "Fork", "Fork": fork_nested,
    "Bundle": lambda ctx: Next(END, output={k: ctx.step_results[k] for k in ("linux", "mac",
                                                                               "win")}),
})


def fans_into_breaking(ctx: Any) -> Parallel:
    return Parallel([slow_sibling, broken_after_sibling])


nested_failing = Workflow("NestedFailing").flow({
    START: "Fork", "Fork": lambda ctx: Parallel({"outer": fans_into_breaking}, "End"),
    "End": lambda ctx: END,
})


def nests_with_then(ctx: Any) -> Parallel:
    return Parallel([linux], "Bundle")


nested_with_then = Workflow("NestedWithThen").state(FanState).flow({
    START: "Fork", "Fork": lambda ctx: Parallel([nests_with_then], "Bundle"),
    "Bundle": lambda ctx: END,
})


class BlobInput(BaseModel):
    size: int = 10


blob = Workflow("Blob").input(BlobInput).flow({
    START: "Emit", "Emit": lambda ctx: Next(END, output="x" * ctx.input.size)})


# ---- hardening: failures Flower must show, crash loops, timeouts, backlogs ---------------


def doomed_step(ctx: Any) -> str:
    raise ValueError(f"doomed {ctx.run_id}")


doomed = Workflow("Doomed", "A step that raises").flow({START: doomed_step})


def suicidal_step(ctx: Any) -> str:
    note(ctx, "started")
    os._exit(1)  # the pool child dies; Celery requeues the message (reject_on_worker_lost)


suicidal = Workflow("Suicidal", "A step that kills its own process").flow(
    {START: "Die", "Die": suicidal_step})


@step(timeout=1.0)
def overrun_step(ctx: Any) -> str:
    key = f"t:{ctx.run_id}:ticks"
    try:
        while True:  # until the timeout interrupts it
            r().incr(key)
            time.sleep(0.05)
    except BaseException as exc:
        r().set(f"t:{ctx.run_id}:interrupted", type(exc).__name__)
        raise


overrun = Workflow("Overrun", "A step past its timeout").flow({START: overrun_step})


class SlowInput(BaseModel):
    seconds: float = 0.25


def slow_step(ctx: Any) -> str:
    time.sleep(ctx.input.seconds)
    return END


slow = Workflow("Slow", "One slow step").input(SlowInput).flow({START: slow_step})


# ---- durable timers -------------------------------------------------------------------


class NapInput(BaseModel):
    seconds: float = 0.2


def nap(ctx: Any) -> Wait:
    note(ctx, "nap")
    return Wait(Sleep(seconds=ctx.input.seconds), "Wake")


def wake(ctx: Any) -> Next:
    note(ctx, "woke")
    return Next(END, output=ctx.step_results["Nap"])


napping = (Workflow("Napping", "Sleeps on a durable timer").input(NapInput)
           .persistence(key_prefix="nap:").flow({START: "Nap", "Nap": nap, "Wake": wake}))


# ---- events, AnyOf and child workflows -------------------------------------------------


class Payment(BaseModel):
    amount: int
    currency: str = "EUR"


class ShopInput(BaseModel):
    hold: bool = False  # the first step waits for the test's `t:<run>:go` first


def prepare(ctx: Any) -> str:
    if ctx.input.hold:
        note(ctx, "holding")
        wait_key(f"t:{ctx.run_id}:go")
    note(ctx, "prepared")
    return "AwaitPayment"


def await_payment(ctx: Any) -> Wait:
    return Wait(Event("paid", model=Payment, timeout=120, on_timeout="Cancel"), "Ship")


def ship(ctx: Any) -> Next:
    paid = ctx.step_results["AwaitPayment"]
    note(ctx, "shipped", amount=paid.amount, model=type(paid).__name__)
    return Next(END, output=paid.model_dump())


shop = (Workflow("Shop", "Waits for a payment event").input(ShopInput)
        .events(paid=Payment, cancel=None).persistence(key_prefix="shop:")
        .flow({START: prepare, "AwaitPayment": await_payment, "Ship": ship,
               "Cancel": lambda ctx: END}))


def hold_release(ctx: Any) -> Wait:
    return Wait(AnyOf(approved=HumanApproval(approvers=["ops"]), cancelled=Event("cancel")),
                {"approved": "Release", "cancelled": "Cleanup"})


def release(ctx: Any) -> Next:
    note(ctx, "released")
    return Next(END, output=ctx.step_results["Hold"])


def cleanup(ctx: Any) -> Next:
    note(ctx, "cleaned")
    return Next(END, output=ctx.step_results["Hold"])


either = (Workflow("Either", "Approval or cancellation, whichever comes first")
          .events(cancel=None).persistence(key_prefix="shop:")
          .flow({START: "Hold", "Hold": hold_release, "Release": release, "Cleanup": cleanup}))


class ChildInput(BaseModel):
    x: int
    hold: bool = False


class ChildState(BaseModel):
    seen: int = 0


def child_work(ctx: Any) -> Next:
    note(ctx, "child ran", x=ctx.input.x)
    if ctx.input.hold:
        wait_key(f"t:{ctx.run_id}:go")
    if ctx.input.x < 0:
        raise NonRetryable(f"cannot double {ctx.input.x}")
    ctx.set_state(seen=ctx.input.x)
    return Next(END, output={"doubled": 2 * ctx.input.x})


doubler = (Workflow("Doubler", "A child workflow").input(ChildInput).state(ChildState)
           .persistence(key_prefix="kids:").flow({START: child_work}))


class ParentInput(BaseModel):
    x: int = 1
    hold: bool = False
    by_name: bool = False


def call_child(ctx: Any) -> Call:
    note(ctx, "calling")
    child = "Doubler" if ctx.input.by_name else doubler
    return Call(child, {"x": ctx.input.x, "hold": ctx.input.hold}, "Done",
                on_failure="Recover" if ctx.input.x == -2 else None)


def parent_done(ctx: Any) -> Next:
    return Next(END, output=ctx.step_results["CallChild"])


parenting = (Workflow("Parenting", "Calls Doubler as a child run").input(ParentInput)
             .persistence(key_prefix="shop:")
             .flow({START: "CallChild", "CallChild": call_child, "Done": parent_done,
                    "Recover": parent_done}))


def call_doubler(ctx: Any) -> Call:
    return Call(doubler, {"x": ctx.item})


def fan_out_children(ctx: Any) -> Parallel:
    return Parallel.map(call_doubler, ctx.input.items, "Sum")


def sum_children(ctx: Any) -> Next:
    ended = ctx.step_results["call_doubler"]
    return Next(END, output={"total": sum(e["output"]["doubled"] for e in ended),
                             "children": [e["run_id"] for e in ended]})


class FanInput(BaseModel):
    items: list[int] = [1, 2, 3]


fan_children = (Workflow("FanChildren", "A fork over child runs").input(FanInput)
                .persistence(key_prefix="shop:")
                .flow({START: fan_out_children, "Sum": sum_children}))
