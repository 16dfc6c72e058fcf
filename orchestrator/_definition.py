"""Workflow definitions: the builder, step options and the values a step may return.

Everything here is pure data. A `Workflow` is immutable: every builder method returns a
new one, and `.flow()` / `.execute()` check the definition when it is built, so a broken
workflow fails at import time instead of in the middle of a run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from ._records import StepPolicy

__all__ = [
    "END",
    "START",
    "AnyOf",
    "Call",
    "Event",
    "HumanApproval",
    "Next",
    "NonRetryable",
    "Sleep",
    "Until",
    "Parallel",
    "StepOptions",
    "Wait",
    "Workflow",
    "step",
]

START = "__start__"
END = "__end__"

VERSION_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")


@dataclass(frozen=True)
class Upgrade:
    """How runs of an older version move to this one (see `Workflow.upgrades`)."""

    steps: Mapping[str, str]
    state: Callable[[dict[str, Any]], Any] | None = None


class DefinitionError(ValueError):
    """A workflow definition is malformed; raised when it is built, never at run time."""


class NonRetryable(Exception):
    """Raise it (or a subclass) from a step to fail it at once, whatever its retries."""

    non_retryable = True


@dataclass(frozen=True)
class StepOptions:
    """A step's policy (how it runs and retries) and the model of its output."""

    policy: StepPolicy = field(default_factory=StepPolicy)
    output: type[BaseModel] | None = None


def policy_of(**fields: Any) -> StepPolicy:
    """A StepPolicy from `@step(...)` keywords, with definition errors that name them."""
    if "queue" in fields and not fields["queue"]:
        raise DefinitionError("queue must be a non-empty string")
    try:
        return StepPolicy(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        raise DefinitionError(f"invalid step policy: {problems}") from None


StepFn = Callable[..., Any]


@dataclass(frozen=True)
class StepDef:
    """A step function with its options; calling it calls the function."""

    fn: StepFn
    options: StepOptions = StepOptions()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @property
    def __name__(self) -> str:  # so Parallel names a wrapped branch by its function
        return str(getattr(self.fn, "__name__", "step"))


def step(
    fn: StepFn | None = None,
    *,
    output: type[BaseModel] | None = None,
    policy: StepPolicy | None = None,
    **policy_fields: Any,
) -> Any:
    """Attach a policy to a step: `@step(queue="builds", retries=3, timeout=60)`, any
    field of StepPolicy (queue, retries, backoff, backoff_factor, max_backoff, jitter,
    timeout, retry_on), or a whole `policy=StepPolicy(...)`; `output=` a model."""
    if policy is not None and policy_fields:
        raise DefinitionError("give either policy= or its fields, not both")
    options = StepOptions(policy or policy_of(**policy_fields), output)

    def wrap(f: StepFn) -> StepDef:
        if isinstance(f, StepDef):
            f = f.fn
        if not callable(f):
            raise DefinitionError(f"step must wrap a callable, got {f!r}")
        return StepDef(f, options)

    return wrap(fn) if fn is not None else wrap


def as_step(value: Any, name: str) -> StepDef:
    if isinstance(value, StepDef):
        return value
    if isinstance(value, str):  # `START: "Clone"` routes without running code
        return StepDef(_route_to(value))
    if not callable(value):
        raise DefinitionError(f"step {name!r} must be callable, got {type(value).__name__}")
    return StepDef(value)


def _route_to(target: str) -> StepFn:
    def route(ctx: Any) -> str:
        return target

    route.__orchestrator_route__ = target  # type: ignore[attr-defined]
    return route


# ---- what a step returns -------------------------------------------------------------


@dataclass(frozen=True)
class Next:
    """Go to `step` (or END) and record `output` as this step's result."""

    step: str
    output: Any = None


@dataclass(frozen=True)
class HumanApproval:
    """A gate that a listed approver must decide."""

    approvers: Sequence[str]
    min_approvals: int = 1
    timeout: float | None = None
    on_timeout: str | None = None
    on_reject: str | None = None
    prompt: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        approvers = tuple(self.approvers)
        if not approvers or not all(isinstance(a, str) and a for a in approvers):
            raise DefinitionError("HumanApproval needs at least one approver name")
        object.__setattr__(self, "approvers", approvers)
        # A `group:<name>` approver admits any number of its members (quorum counts users).
        most = (self.min_approvals if any(a.startswith("group:") for a in approvers)
                else len(set(approvers)))
        if not 1 <= self.min_approvals <= most:
            raise DefinitionError("min_approvals must be between 1 and the number of approvers")
        if self.timeout is not None and self.timeout <= 0:
            raise DefinitionError("gate timeout must be positive")


@dataclass(frozen=True)
class Sleep:
    """A durable timer: wake after `seconds` (a number or a timedelta). It lives in Redis,
    so it fires after a coordinator restart, once."""

    seconds: float | timedelta

    def __post_init__(self) -> None:
        seconds = self.seconds
        if (isinstance(seconds, bool) or not isinstance(seconds, int | float | timedelta)
                or not 0 <= self.duration < math.inf):
            raise ValueError(f"Sleep needs a finite duration >= 0, got {seconds!r}")

    @property
    def duration(self) -> float:
        """The sleep in seconds."""
        if isinstance(self.seconds, timedelta):
            return self.seconds.total_seconds()
        return float(self.seconds)


@dataclass(frozen=True)
class Until:
    """A durable timer: wake at `at`, a timezone-aware datetime."""

    at: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.at, datetime) or self.at.tzinfo is None:
            raise ValueError(f"Until needs a timezone-aware datetime, got {self.at!r} "
                             f"(e.g. datetime.now(timezone.utc) + timedelta(hours=1))")


@dataclass(frozen=True)
class Event:
    """Wait for an event sent to the run (`handle.send(name, payload, key=...)`). The
    workflow declares the events it receives (`.events(paid=Payment)`), so a sender is
    checked before anything is stored; `model`, if given, must be the declared one.
    Without `on_timeout`, a `timeout` (seconds) that passes fails the run."""

    name: str
    model: type[BaseModel] | None = None
    timeout: float | None = None
    on_timeout: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not event_name_ok(self.name):
            raise DefinitionError(f"event name must be 1-100 printable characters without "
                                  f"whitespace, got {self.name!r}")
        if self.model is not None:
            _model(self.model, "Event model")
        if self.timeout is not None and not 0 < self.timeout < math.inf:
            raise DefinitionError("event timeout must be positive and finite")


Condition = HumanApproval | Event | Sleep | Until


class AnyOf:
    """Wait for the first of several conditions: `AnyOf(approved=HumanApproval([...]),
    cancelled=Event("cancel"), late=Sleep(3600))`. Whichever happens first wins and the
    others are withdrawn in the same commit. At most one gate and one timer."""

    __slots__ = ("conditions",)
    conditions: dict[str, Condition]

    def __init__(self, **conditions: Condition) -> None:
        if len(conditions) < 2:
            raise DefinitionError("AnyOf needs at least two conditions")
        for arm, c in conditions.items():
            if not isinstance(c, HumanApproval | Event | Sleep | Until):
                raise DefinitionError(f"AnyOf {arm}= must be HumanApproval, Event, Sleep or "
                                      f"Until, got {type(c).__name__}")
        kinds = [type(c) for c in conditions.values()]
        if kinds.count(HumanApproval) > 1:
            raise DefinitionError("AnyOf waits on at most one HumanApproval")
        if kinds.count(Sleep) + kinds.count(Until) > 1:
            raise DefinitionError("AnyOf waits on at most one Sleep or Until")
        names = [c.name for c in conditions.values() if isinstance(c, Event)]
        if len(set(names)) != len(names):
            raise DefinitionError(f"AnyOf waits on each event once, got {names}")
        object.__setattr__(self, "conditions", dict(conditions))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("AnyOf is immutable")

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(f'{k}={v!r}' for k, v in self.conditions.items())})"


@dataclass(frozen=True)
class Wait:
    """Park the run until `condition` is met (a gate decided, a timer due, an event sent),
    then continue at `then`. A parked run holds no worker slot and no broker message.
    For `AnyOf`, `then` maps each condition's name to the step it continues at."""

    condition: Condition | AnyOf
    then: str | Mapping[str, str]

    def __post_init__(self) -> None:
        if isinstance(self.condition, AnyOf):
            if not isinstance(self.then, Mapping) or set(self.then) != set(
                    self.condition.conditions):
                raise DefinitionError(
                    f"Wait(AnyOf(...), then) needs then as a dict naming the step after each "
                    f"of {sorted(self.condition.conditions)}, got {self.then!r}")
        elif not isinstance(self.then, str):
            raise DefinitionError(f"Wait then must be a step name, got {self.then!r}")


@dataclass(frozen=True)
class Call:
    """Run `workflow` (a Workflow, or a catalog name) as a child run with `input`, then
    continue at `then`; the child's `{"run_id", "status", "state", "output"}` is this
    step's result. A failed or stopped child fails this step unless `on_failure` names
    the step to go to instead."""

    workflow: Any  # Workflow | str; Workflow is defined below
    input: Any = None
    then: str = END
    on_failure: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.workflow, Workflow | str) or not (
                self.workflow if isinstance(self.workflow, str) else True):
            raise DefinitionError(f"Call needs a Workflow or a workflow name, got "
                                  f"{self.workflow!r}")

    @property
    def workflow_name(self) -> str:
        return self.workflow if isinstance(self.workflow, str) else self.workflow.name


def event_name_ok(name: str) -> bool:
    return 0 < len(name) <= 100 and name.isprintable() and not any(c.isspace() for c in name)


@dataclass(frozen=True)
class Branch:
    """One branch of a fan-out: an importable function and, for map, its item; or a nested
    fan-out (`children`), whose outputs become this branch's output."""

    name: str
    ref: str
    options: StepOptions
    item: Any = None
    has_item: bool = False
    children: tuple[Branch, ...] = ()


@dataclass(frozen=True)
class Parallel:
    """Run branches concurrently (Celery tasks, one group), then continue at `then`.

    `Parallel([build_linux, build_mac], "Bundle")` names branches by function name;
    a dict gives explicit names. `Parallel.map(fn, items, "Next")` fans out over data.

    A branch may fan out again: a branch function returns `Parallel([...])`, or a dict
    value is a `Parallel`. Either way the nested fan-out has no `then`: it gathers into
    its branch, whose output is a dict of the nested outputs shaped as `step_results` is.
    """

    branches: Sequence[Branch]
    then: str | None = None

    def __init__(
        self,
        steps: Sequence[StepFn | StepDef] | Mapping[str, StepFn | StepDef | Parallel],
        then: str | None = None,
    ) -> None:
        pairs = (
            list(steps.items())
            if isinstance(steps, Mapping)
            else [(getattr(s, "__name__", ""), s) for s in steps]
        )
        branches = [_branch(name, fn) for name, fn in pairs]
        _check_branches(branches)
        object.__setattr__(self, "branches", tuple(branches))
        object.__setattr__(self, "then", then)

    @classmethod
    def map(cls, fn: StepFn | StepDef, items: Iterable[Any], then: str | None = None) -> Parallel:
        base = _branch(getattr(fn, "__name__", "branch"), fn)
        branches = [
            dataclasses.replace(base, name=f"{base.name}[{i}]", item=item, has_item=True)
            for i, item in enumerate(items)
        ]
        try:
            json.dumps([b.item for b in branches])
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Parallel.map items must be JSON-serializable: {exc}") from None
        if not branches:
            raise DefinitionError(f"Parallel.map over no items: nothing would run {base.name}")
        self = object.__new__(cls)
        object.__setattr__(self, "branches", tuple(branches))
        object.__setattr__(self, "then", then)
        return self


def _branch(name: str, fn: StepFn | StepDef | Parallel) -> Branch:
    if isinstance(fn, Parallel):
        if fn.then is not None:
            raise DefinitionError(
                f"nested Parallel {name!r} gathers into its branch: leave out then "
                f"(got {fn.then!r})")
        return Branch(name=name, ref="", options=StepOptions(), children=tuple(fn.branches))
    sd = fn if isinstance(fn, StepDef) else as_step(fn, name)
    return Branch(name=name, ref=function_ref(sd.fn), options=sd.options)


def _check_branches(branches: list[Branch]) -> None:
    names = [b.name for b in branches]
    if not names:
        raise DefinitionError("Parallel needs at least one branch")
    if any(not n for n in names):
        raise DefinitionError("every Parallel branch needs a name (a nested Parallel: use a "
                              "dict, name -> Parallel)")
    if any("/" in n for n in names):
        raise DefinitionError(f"Parallel branch names may not contain '/', got {names}")
    if len(set(names)) != len(names):
        raise DefinitionError(f"Parallel branch names must be unique, got {names}")


def function_ref(fn: StepFn) -> str:
    """'module:qualname' for a module-level function, so any worker can import it."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise DefinitionError(
            f"parallel branch {fn!r} must be a module-level function (workers import it by name)"
        )
    return f"{module}:{qualname}"


def resolve_ref(ref: str) -> StepDef:
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, StepDef) else StepDef(obj)


# ---- the workflow builder -----------------------------------------------------------


class _Empty(BaseModel):
    pass


@dataclass(frozen=True)
class Persistence:
    """Where runs keep their state. `store=None` is the mode's own: memory embedded,
    Redis on a cluster. `store="redis"` keeps even an embedded run in Redis (it survives
    the process); `store="memory"` or `enabled=False` can only run embedded."""

    enabled: bool = True
    store: Literal["redis", "memory"] | None = None
    key_prefix: str = "orchestrator:"

    @property
    def in_memory(self) -> bool:
        return not self.enabled or self.store == "memory"


@dataclass(frozen=True)
class Workflow:
    """A named workflow: `Workflow("Deploy", "...").input(In).state(S).flow({...})`."""

    name: str
    description: str = ""
    input_model: type[BaseModel] = _Empty
    state_model: type[BaseModel] = _Empty
    steps: Mapping[str, StepDef] = field(default_factory=dict)
    executor: StepDef | None = None
    persistence_options: Persistence = Persistence()
    agent_factories: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    event_models: Mapping[str, type[BaseModel] | None] = field(default_factory=dict)
    version: str | None = None
    """A label for this definition (`"2"`); None: the content hash names it."""
    upgrade_rules: Mapping[str, Upgrade] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise DefinitionError(f"workflow name must be an identifier, got {self.name!r}")
        if self.version is not None and not VERSION_LABEL.fullmatch(str(self.version)):
            raise DefinitionError(f"{self.name}: version label must be 1-40 letters, digits, "
                                  f"'.', '_' or '-', got {self.version!r}")

    def input(self, model: type[BaseModel]) -> Workflow:
        return dataclasses.replace(self, input_model=_model(model, "input"))

    def state(self, model: type[BaseModel]) -> Workflow:
        model = _model(model, "state")
        try:
            model()
        except Exception as exc:
            raise DefinitionError(
                f"state model {model.__name__} needs a default for every field: {exc}"
            ) from None
        return dataclasses.replace(self, state_model=model)

    def flow(self, steps: Mapping[str, Any]) -> Workflow:
        if self.executor is not None:
            raise DefinitionError(f"{self.name}: a workflow has either .flow() or .execute()")
        if START not in steps:
            raise DefinitionError(f"{self.name}: .flow() needs a START step")
        built: dict[str, StepDef] = {}
        for name, fn in steps.items():
            if not isinstance(name, str) or not name:
                raise DefinitionError(f"{self.name}: step names must be strings, got {name!r}")
            if name == END:
                raise DefinitionError(f"{self.name}: END is a target, not a step")
            built[name] = as_step(fn, name)
        for name, sd in built.items():
            target = getattr(sd.fn, "__orchestrator_route__", None)
            if target is not None and target != END and target not in built:
                raise DefinitionError(f"{self.name}: step {name!r} routes to unknown {target!r}")
        _check_route_cycles(self.name, built)
        return dataclasses.replace(self, steps=built)

    def execute(self, fn: Any) -> Workflow:
        if self.steps:
            raise DefinitionError(f"{self.name}: a workflow has either .flow() or .execute()")
        return dataclasses.replace(self, executor=as_step(fn, "execute"))

    def persistence(
        self, enabled: bool = True, store: Literal["redis", "memory"] | None = None,
        key_prefix: str = "orchestrator:",
    ) -> Workflow:
        if store not in ("redis", "memory", None):
            raise DefinitionError(f"unknown store {store!r}: use 'redis' or 'memory'")
        options = Persistence(enabled, store, key_prefix)
        return dataclasses.replace(self, persistence_options=options)

    def agents(self, factories: Mapping[str, Callable[..., Any]]) -> Workflow:
        for name, factory in factories.items():
            if not name.isidentifier() or not callable(factory):
                raise DefinitionError(f"agent {name!r} needs an identifier name and a factory")
        return dataclasses.replace(self, agent_factories=dict(factories))

    def events(self, models: Mapping[str, type[BaseModel] | None] | None = None,
               **more: type[BaseModel] | None) -> Workflow:
        """Declare the events runs receive and their payload models (None: any JSON):
        `.events(paid=Payment, cancel=None)` or `.events({"payment.succeeded": Payment})`."""
        declared = {**(models or {}), **more}
        for name, model in declared.items():
            if not isinstance(name, str) or not event_name_ok(name):
                raise DefinitionError(f"{self.name}: bad event name {name!r}")
            if model is not None:
                _model(model, f"events({name}=...)")
        return dataclasses.replace(self, event_models={**self.event_models, **declared})

    def upgrades(self, from_version: str, steps: Mapping[str, str] | None = None,
                 state: Callable[[dict[str, Any]], Any] | None = None) -> Workflow:
        """How runs of `from_version` move to this definition: `steps` renames the steps
        they may be at (old -> new), `state` converts their state (a dict in, a dict or
        this workflow's state model out). `orchestrator runs upgrade` applies it."""
        rule = Upgrade(dict(steps or {}), state)
        return dataclasses.replace(self, upgrade_rules={**self.upgrade_rules,
                                                        from_version: rule})

    # ---- derived views ---------------------------------------------------------------

    @property
    def is_imperative(self) -> bool:
        return self.executor is not None

    def check_complete(self) -> None:
        if not self.steps and self.executor is None:
            raise DefinitionError(f"{self.name}: define .flow({{...}}) or .execute(fn)")

    def step_def(self, name: str) -> StepDef:
        if self.executor is not None and name == START:
            return self.executor
        return self.steps[name]

    def step_names(self) -> list[str]:
        return [START] if self.executor is not None else list(self.steps)

    def queues(self) -> dict[str, str]:
        return {name: self.step_def(name).options.policy.queue for name in self.step_names()}

    @property
    def version_id(self) -> str:
        """The version runs of this definition are pinned to: its label, or its hash."""
        return self.version if self.version is not None else self.content_hash

    @functools.cached_property
    def content_hash(self) -> str:
        """A hash of the definition's shape: changes when steps or schemas change."""
        shape = {
            "steps": {n: _fn_source_id(self.step_def(n).fn) for n in self.step_names()},
            "input": self.input_model.model_json_schema(),
            "state": self.state_model.model_json_schema(),
        }
        if self.event_models:  # only then, so adding events support changed no version
            shape["events"] = {n: m.model_json_schema() if m else None
                               for n, m in sorted(self.event_models.items())}
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


def _check_route_cycles(workflow: str, steps: Mapping[str, StepDef]) -> None:
    for start in steps:
        seen, step = [start], getattr(steps[start].fn, "__orchestrator_route__", None)
        while step is not None and step in steps:
            if step in seen:
                raise DefinitionError(f"{workflow}: steps {seen} only route to each other")
            seen.append(step)
            step = getattr(steps[step].fn, "__orchestrator_route__", None)


def _fn_source_id(fn: StepFn) -> str:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:12]
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


def _model(model: Any, what: str) -> type[BaseModel]:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise DefinitionError(f".{what}() takes a pydantic BaseModel class, got {model!r}")
    return model
