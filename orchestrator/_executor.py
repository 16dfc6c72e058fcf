"""Run one task's user code and turn what happened into an engine event.

This is the only place user step code is called. It builds the context, runs the function
(sync or async, with its timeout), closes agents the step left open, and reduces the
return value to data: a transition, an output and a state patch, or a failure that says
whether retrying could help.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import inspect
import json
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError

from ._agents import AgentBox
from ._context import StepContext, StepResults
from ._definition import (
    END,
    AnyOf,
    Branch,
    Call,
    Event,
    HumanApproval,
    Next,
    Parallel,
    Sleep,
    StepDef,
    Until,
    Wait,
    Workflow,
    resolve_ref,
)
from ._engine import (
    Arm,
    BranchSpec,
    Doze,
    Expect,
    FanOut,
    FirstOf,
    GateSpec,
    GoTo,
    Outcome,
    Spawn,
    StepDone,
    StepFailed,
    WaitFor,
)
from ._records import RunError, RunRecord, Task

DEFAULT_MAX_PAYLOAD = 1024 * 1024


class StepTimeout(TimeoutError):
    pass


class _BadResult(Exception):
    """The step returned something the runtime cannot use; retrying will not help."""


class ChildResolver(Protocol):
    def __call__(self, workflow: Workflow | str, input: Any) -> tuple[str, str, dict[str, Any]]:
        """The child's name, key prefix and validated input (raises on bad input or an
        unknown workflow)."""


def run_task(
    wf: Workflow,
    rec: RunRecord,
    task: Task,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    children: ChildResolver | None = None,
) -> StepDone | StepFailed:
    where = task.where
    agents = AgentBox(wf.agent_factories)
    notes: list[dict[str, Any]] = []
    step_def: StepDef | None = None
    try:
        step_def = resolve_ref(task.ref) if task.ref else wf.step_def(task.step)
        base_state = (rec.fork.state_seen_by(task.branch) if task.branch is not None and rec.fork
                      else rec.state)
        ctx = StepContext(
            run_id=rec.run_id, step=where, attempt=task.attempt, token=task.token,
            input=wf.input_model.model_validate(rec.input), state_model=wf.state_model,
            state=base_state,
            step_results=StepResults(rec.step_results, _result_models(wf, rec)),
            agents=agents, item=task.item, branch=task.branch,
            on_checkpoint=on_checkpoint if wf.is_imperative else None,
        )
        try:
            returned = _call(step_def, ctx, task.policy.timeout)
        finally:
            notes = [{**n, "step": where} for n in agents.close_leftovers()]
        if task.branch is not None and not isinstance(returned, Call):
            outcome = _branch_outcome(returned, step_def, max_payload)
        elif wf.is_imperative:
            outcome = GoTo(END, _output(returned, step_def, max_payload), True)
        elif task.branch is not None and isinstance(returned, Call):
            if returned.then != END or returned.on_failure is not None:
                raise _BadResult("a branch's Call has no then or on_failure: the child's "
                                 "result is the branch's output, its failure the branch's")
            outcome = _spawn(returned, children, max_payload)
        else:
            outcome = _outcome(returned, step_def, wf, max_payload, children)
        patch = ctx.state_patch
        _check_size(patch, max_payload, "state change")
        return StepDone(task.token, 0.0, patch, outcome, task.branch, tuple(notes))
    except _BadResult as exc:
        return _failed(task, where, exc, notes, retryable=False)
    except Exception as exc:
        # The definition's policy says which errors retry (it holds `retry_on`, which
        # does not travel in the task); an unloadable step retries by default.
        policy = step_def.options.policy if step_def is not None else task.policy
        return _failed(task, where, exc, notes, retryable=policy.retries_error(exc))


def _failed(
    task: Task, where: str, exc: BaseException, notes: list[dict[str, Any]], retryable: bool
) -> StepFailed:
    cause = exc.__cause__ if isinstance(exc, _BadResult) and exc.__cause__ else exc
    error = RunError(
        step=where,
        type=type(cause).__name__ if not isinstance(exc, _BadResult) else "InvalidStepResult",
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )
    return StepFailed(task.token, 0.0, error, retryable, task.branch, task.attempt, tuple(notes))


def _call(step_def: StepDef, ctx: StepContext, timeout: float | None) -> Any:
    fn = step_def.fn
    if inspect.iscoroutinefunction(fn):
        return _run_coroutine(fn(ctx), timeout)
    if timeout is None:
        result = fn(ctx)
    elif _soft_time_limit_armed():
        result = _call_under_soft_limit(fn, ctx, timeout)
    else:
        result = _call_with_timeout(fn, ctx, timeout)
    if inspect.isawaitable(result):
        return _run_coroutine(result, timeout)
    return result


def _run_coroutine(coro: Any, timeout: float | None) -> Any:
    async def bounded() -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise StepTimeout(f"step timed out after {timeout}s") from None

    try:
        return asyncio.run(bounded())
    except SoftTimeLimitExceeded:  # Celery's limit, at the same moment as our own
        raise StepTimeout(f"step timed out after {timeout}s") from None


def _soft_time_limit_armed() -> bool:
    """In a Celery prefork child the pool raises SoftTimeLimitExceeded in the main thread
    at the task's soft time limit (the dispatcher sets it to the step's timeout): that
    interrupts even a blocking call, which a helper thread cannot be."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        from billiard.pool import soft_timeout_sighandler
    except ImportError:
        return False
    usr1 = getattr(signal, "SIGUSR1", None)
    return usr1 is not None and signal.getsignal(usr1) is soft_timeout_sighandler


def _call_under_soft_limit(fn: Callable[[Any], Any], ctx: StepContext, timeout: float) -> Any:
    try:
        return fn(ctx)
    except SoftTimeLimitExceeded:
        raise StepTimeout(f"step timed out after {timeout}s") from None


def _call_with_timeout(fn: Callable[[Any], Any], ctx: StepContext, timeout: float) -> Any:
    """Run a sync step in a helper thread. Past the timeout the step fails, and the
    thread is interrupted: StepTimeout is raised inside it at its next Python bytecode
    (a blocking C call finishes first)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(ctx)
        except BaseException as exc:  # re-raised in the calling thread
            box["error"] = exc

    # In the caller's context: the step's log fields and trace span stay current in it.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,),
                              daemon=True, name=f"step-{ctx.step}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        _interrupt(thread)
        raise StepTimeout(f"step timed out after {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _interrupt(thread: threading.Thread) -> None:
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                   ctypes.py_object(StepTimeout))


def _outcome(returned: Any, step_def: StepDef, wf: Workflow, max_payload: int,
             children: ChildResolver | None) -> Outcome:
    if isinstance(returned, str):
        return GoTo(returned)
    if isinstance(returned, Next):
        output = _output(returned.output, step_def, max_payload)
        return GoTo(returned.step, output, True)
    if isinstance(returned, Wait):
        return _wait(returned, wf)
    if isinstance(returned, Call):
        return _spawn(returned, children, max_payload)
    if isinstance(returned, Parallel):
        if returned.then is None:
            raise _BadResult("returned Parallel(...) without then: name the step that gathers "
                             "the branches")
        return FanOut(_branch_specs(returned.branches), returned.then)
    raise _BadResult(
        f"returned {type(returned).__name__} {returned!r:.80}; a step returns a step name, "
        f"END, Next(step, output=...), Wait(...), Call(...) or Parallel(...)"
    )


def _wait(returned: Wait, wf: Workflow) -> Outcome:
    c, then = returned.condition, returned.then
    if isinstance(c, AnyOf):
        assert not isinstance(then, str)
        return FirstOf({arm: _arm(cond, then[arm], wf) for arm, cond in c.conditions.items()})
    assert isinstance(then, str)
    return _arm(c, then, wf)


def _arm(c: Any, then: str, wf: Workflow) -> Arm:
    if isinstance(c, Sleep):
        return Doze(then, seconds=c.duration)
    if isinstance(c, Until):
        return Doze(then, until=c.at.timestamp())
    if isinstance(c, Event):
        if c.name not in wf.event_models:
            raise _BadResult(
                f"waits for event {c.name!r}, which {wf.name} does not declare: add "
                f".events({{{c.name!r}: Model or None}}) to it, so senders are checked "
                f"before the run reaches its wait")
        declared = wf.event_models[c.name]
        if c.model is not None and c.model is not declared:
            raise _BadResult(f"Event({c.name!r}, model={c.model.__name__}) but {wf.name} "
                             f"declares {getattr(declared, '__name__', None)} for it")
        return Expect(c.name, then, c.timeout, c.on_timeout)
    if not isinstance(c, HumanApproval):
        raise _BadResult(f"Wait on {type(c).__name__}: wait on HumanApproval(...), "
                         f"Event(...), Sleep(...), Until(...) or AnyOf(...)")
    return WaitFor(GateSpec(
        approvers=tuple(c.approvers), then=then, min_approvals=c.min_approvals,
        timeout=c.timeout, on_timeout=c.on_timeout, on_reject=c.on_reject, prompt=c.prompt,
        payload=_jsonable(dict(c.payload), "gate payload"),
    ))


def _spawn(call: Call, children: ChildResolver | None, max_payload: int) -> Spawn:
    if children is None:
        raise _BadResult("this runtime cannot start child workflows")
    data = call.input.model_dump(mode="json") if isinstance(call.input, BaseModel) else call.input
    try:
        name, key_prefix, data = children(call.workflow, data or {})
    except ValidationError as exc:
        raise _BadResult(f"input for child {call.workflow_name} is invalid: {exc}") from exc
    except (LookupError, ValueError) as exc:
        raise _BadResult(f"cannot call {call.workflow_name}: {exc}") from exc
    _check_size(data, max_payload, "child input")
    return Spawn(name, key_prefix, data, call.then, call.on_failure)


def _branch_outcome(returned: Any, step_def: StepDef, max_payload: int) -> Outcome:
    """A branch returns its output, or fans out again with a Parallel of no `then`."""
    if isinstance(returned, Next | Wait):
        raise _BadResult(f"a branch returns its output (or a nested Parallel), not "
                         f"{type(returned).__name__}")
    if isinstance(returned, Parallel):
        if returned.then is not None:
            raise _BadResult(f"a branch's Parallel gathers into the branch itself: leave "
                             f"out then (got {returned.then!r})")
        return FanOut(_branch_specs(returned.branches))
    return GoTo(END, _output(returned, step_def, max_payload), True)


def _branch_specs(branches: Sequence[Branch]) -> tuple[BranchSpec, ...]:
    return tuple(
        BranchSpec(name=b.name, ref=b.ref, policy=b.options.policy, item=b.item,
                   has_item=b.has_item, children=_branch_specs(b.children))
        for b in branches
    )


def _output(value: Any, step_def: StepDef, max_payload: int) -> Any:
    model = step_def.options.output
    try:
        if model is not None:
            value = model.model_validate(
                value.model_dump() if isinstance(value, BaseModel) else value)
    except ValidationError as exc:
        raise _BadResult(f"output does not match {model.__name__}: {exc}") from exc  # type: ignore[union-attr]
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    value = _jsonable(value, "output")
    _check_size(value, max_payload, "output")
    return value


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise _BadResult(f"{what} is not JSON-serializable: {exc}") from exc


def _check_size(value: Any, limit: int, what: str) -> None:
    size = len(json.dumps(value))
    if size > limit:
        raise _BadResult(f"{what} is {size} bytes of JSON, over the {limit}-byte limit")


def _result_models(wf: Workflow, rec: RunRecord) -> dict[str, type[BaseModel] | None]:
    """A step's result as a model: its declared output, or the payload model of the event
    it took."""
    models = {name: sd.options.output for name, sd in wf.steps.items()}
    for step, event in rec.event_steps.items():
        models[step] = wf.event_models.get(event)
    return models
