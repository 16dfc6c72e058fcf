"""Definitions are checked when they are built, and the public API is pinned."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

import orchestrator
from orchestrator import (
    END,
    START,
    DefinitionError,
    HumanApproval,
    Next,
    Parallel,
    Workflow,
    step,
)
from orchestrator._agents import AgentBox, EchoAgent
from orchestrator._context import StepContext, StepResults


def ok(ctx: Any) -> str:
    return END


def branch_a(ctx: Any) -> int:
    return 1


class State(BaseModel):
    n: int = 0
    tags: list[str] = []


def test_flow_needs_start() -> None:
    with pytest.raises(DefinitionError, match="START"):
        Workflow("W").flow({"A": ok})


def test_flow_and_execute_exclude_each_other() -> None:
    with pytest.raises(DefinitionError, match="either"):
        Workflow("W").flow({START: ok}).execute(ok)
    with pytest.raises(DefinitionError, match="either"):
        Workflow("W").execute(ok).flow({START: ok})


def test_steps_must_be_callable_or_a_known_name() -> None:
    with pytest.raises(DefinitionError, match="callable"):
        Workflow("W").flow({START: 42})
    with pytest.raises(DefinitionError, match="unknown 'B'"):
        Workflow("W").flow({START: "B"})
    with pytest.raises(DefinitionError, match="END is a target"):
        Workflow("W").flow({START: ok, END: ok})


def test_names_models_and_options_are_checked() -> None:
    with pytest.raises(DefinitionError):
        Workflow("not a name")
    with pytest.raises(DefinitionError):
        Workflow("W").input(dict)  # type: ignore[arg-type]

    class NoDefaults(BaseModel):
        x: int

    with pytest.raises(DefinitionError, match="default"):
        Workflow("W").state(NoDefaults)
    with pytest.raises(DefinitionError):
        step(retries=-1)(ok)
    with pytest.raises(DefinitionError):
        step(timeout=0)(ok)
    with pytest.raises(DefinitionError):
        Workflow("W").persistence(store="disk")  # type: ignore[arg-type]
    assert issubclass(DefinitionError, ValueError)


def test_gate_options_are_checked() -> None:
    with pytest.raises(DefinitionError):
        HumanApproval(approvers=[])
    with pytest.raises(DefinitionError):
        HumanApproval(approvers=["a"], min_approvals=2)
    with pytest.raises(DefinitionError):
        HumanApproval(approvers=["a"], timeout=-1)


def test_parallel_branches_must_be_importable_and_unique() -> None:
    with pytest.raises(DefinitionError, match="module-level"):
        Parallel([lambda ctx: 1], "J")
    with pytest.raises(DefinitionError, match="unique"):
        Parallel([branch_a, branch_a], "J")
    with pytest.raises(TypeError, match="JSON"):
        Parallel.map(branch_a, [object()], "J")
    fan = Parallel.map(branch_a, ["x", "y"], "J")
    assert [b.name for b in fan.branches] == ["branch_a[0]", "branch_a[1]"]
    assert [b.item for b in fan.branches] == ["x", "y"]


def test_nested_parallels_are_named_and_gather_into_their_branch() -> None:
    nested = Parallel({"outer": Parallel([branch_a]), "b": branch_a}, "J")
    outer, b = nested.branches
    assert outer.ref == "" and [c.name for c in outer.children] == ["branch_a"]
    assert b.ref.endswith(":branch_a") and b.children == ()
    with pytest.raises(DefinitionError, match="leave out then"):
        Parallel({"outer": Parallel([branch_a], "K")}, "J")
    with pytest.raises(DefinitionError, match="use a dict"):
        Parallel([Parallel([branch_a])], "J")  # type: ignore[list-item]
    with pytest.raises(DefinitionError, match="'/'"):
        Parallel({"a/b": branch_a}, "J")
    with pytest.raises(DefinitionError, match="no items"):
        Parallel.map(branch_a, [], "J")


def test_definitions_are_immutable_and_versioned() -> None:
    base = Workflow("W", "d")
    built = base.state(State).flow({START: ok})
    assert base.steps == {} and built is not base
    other = base.state(State).flow({START: lambda ctx: Next(END, output=1)})
    assert built.content_hash != other.content_hash
    assert built.content_hash == base.state(State).flow({START: ok}).content_hash
    assert built.version is None and built.version_id == built.content_hash


def test_set_state_merges_validates_and_reads_its_own_writes() -> None:
    seen: list[dict[str, Any]] = []
    ctx = StepContext(run_id="r", step="S", attempt=1, token=1, input=State(),
                      state_model=State, state={"n": 1, "tags": []},
                      step_results=StepResults({}, {}), agents=AgentBox({}),
                      on_checkpoint=seen.append)
    ctx.set_state(n=2)
    assert ctx.state.n == 2 and ctx.state.tags == []
    with pytest.raises(ValidationError):
        ctx.set_state(n="many")
    assert ctx.state.n == 2 and ctx.state_patch == {"n": 2}
    with pytest.raises(ValueError, match="no field"):
        ctx.set_state(colour="red")
    assert seen == [{"n": 2}]
    assert ctx.idempotency_key == "r:1"


def test_agents_left_open_are_closed_and_reported() -> None:
    import asyncio

    box = AgentBox({"reviewer": EchoAgent})
    polite = box.reviewer("polite")
    with box.reviewer("scoped") as scoped:
        assert scoped.review("fine")["approved"]

    async def awaited() -> Any:
        async with await box.reviewer("async") as agent:
            return agent

    async_agent = asyncio.run(awaited())
    polite.close()
    sloppy = box.reviewer("sloppy")
    notes = box.close_leftovers()
    assert [n["agent"] for n in notes] == ["reviewer"]
    assert sloppy._agent.closed and scoped._agent.closed and async_agent._agent.closed
    with pytest.raises(AttributeError, match="declared"):
        box.nobody()


PUBLIC = [
    "END", "START", "DefinitionError", "HumanApproval", "Next", "Parallel", "StepOptions",
    "Wait", "Workflow", "reducer", "step", "EchoAgent", "WorkflowRunner", "RunHandle",
    "RunResult", "RunRecord", "RunStatus", "RunError", "RunFailed", "Settings", "create_app",
    "local_runtime", "Steward", "CatalogEntry", "Client", "RunStore", "MemoryStore",
    "RedisStore", "ControlError", "InvalidInput", "RunNotFound", "StoreUnavailable",
    "UnknownWorkflow", "NonRetryable", "StepPolicy", "OrchestratorApp", "Middleware",
    "AmbiguousRunId", "NoLiveWorker", "Sleep", "Until", "Event", "AnyOf", "Call",
    "InvalidEvent", "Schedules", "Schedule", "Overlap", "ScheduleExists", "ScheduleNotFound",
]


def test_public_api_is_pinned() -> None:
    assert sorted(orchestrator.__all__) == sorted(PUBLIC)
    assert all(hasattr(orchestrator, name) for name in PUBLIC)
