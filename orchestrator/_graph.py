"""The step graph "as far as it is known", read from each step's compiled code.

Steps choose their successor in code, so the graph is a static reading: every string
constant in a step's code object (nested functions and lambdas included) that names a
step is a possible edge, and a reference to END is an edge to the end. A step whose code
builds a `Parallel(...)` forks: its branches are the module-level functions it names after
`Parallel`. A step whose code builds a `Wait(...)` or `HumanApproval(...)` may park at a
gate. Helpers a step calls are not followed. It is meant for people (the catalog,
`orchestrator graph`), never for deciding what runs.
"""

from __future__ import annotations

import dis
import re
import types
from collections.abc import Iterator
from typing import Any, TypedDict

from ._definition import END, START, StepDef, Workflow

GATE_NAMES = frozenset({"HumanApproval"})  # a Wait on Sleep or Until is a timer


class Node(TypedDict):
    next: list[str]  # steps (or END) it may go to
    fork: list[str]  # branch functions, when it fans out
    gate: bool  # it may wait for a human decision


def edges(wf: Workflow) -> dict[str, list[str]]:
    """Step -> the steps it may go to (what the catalog publishes)."""
    return {name: node["next"] for name, node in shape(wf).items()}


def shape(wf: Workflow) -> dict[str, Node]:
    if wf.is_imperative:
        return {START: Node(next=[END], fork=[], gate=False)}
    names = set(wf.step_names()) - {START}
    graph: dict[str, Node] = {}
    for name in wf.step_names():
        fn = wf.step_def(name).fn
        route = getattr(fn, "__orchestrator_route__", None)
        targets = {route} if route is not None else _targets(fn, names)
        codes = list(_codes(fn.__code__)) if hasattr(fn, "__code__") else []
        graph[name] = Node(next=sorted(targets, key=lambda t: (t == END, t)),
                           fork=_branches(codes, getattr(fn, "__globals__", {})),
                           gate=any(GATE_NAMES & set(c.co_names) for c in codes))
    return graph


def from_edges(graph: dict[str, list[str]]) -> dict[str, Node]:
    """A published graph (edges only: no forks or gates known)."""
    return {step: Node(next=targets, fork=[], gate=False) for step, targets in graph.items()}


def _targets(fn: object, names: set[str]) -> set[str]:
    code = getattr(fn, "__code__", None)
    if code is None:
        return set()
    found: set[str] = set()
    for c in _codes(code):
        found |= {k for k in c.co_consts if isinstance(k, str) and k in names}
        if "END" in c.co_names:
            found.add(END)
    return found


def _branches(codes: list[types.CodeType], module: dict[str, Any]) -> list[str]:
    """Functions of the step's module loaded after `Parallel` is, up to the return."""
    found: list[str] = []
    for code in codes:
        after_parallel = False
        for ins in dis.get_instructions(code):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.argval == "Parallel":
                after_parallel = True
            elif ins.opname == "RETURN_VALUE":
                after_parallel = False
            elif (after_parallel and ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")
                  and _is_function(module.get(ins.argval)) and ins.argval not in found):
                found.append(ins.argval)
    return found


def _is_function(obj: Any) -> bool:
    return isinstance(obj, types.FunctionType | StepDef)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def render_text(graph: dict[str, Node]) -> str:
    """`A -> B, C`; `Build =fork=> [linux, mac] -> Bundle`; `Deploy ?gate? -> Release`."""

    def line(step: str, node: Node) -> str:
        head = _label(step)
        if node["fork"]:
            head += f" =fork=> [{', '.join(node['fork'])}]"
        if node["gate"]:
            head += " ?gate?"
        return f"{head} -> {', '.join(_label(t) for t in node['next']) or '?'}"

    return "\n".join(line(step, node) for step, node in graph.items())


def render_mermaid(graph: dict[str, Node]) -> str:
    """A flowchart: gates as hexagons, each fork's branches as subroutines between the
    forking step and where it goes next."""
    lines = ["flowchart TD"]
    for step, node in graph.items():
        source = _node(step, gate=node["gate"])
        if node["fork"]:
            for branch in node["fork"]:
                box = f'{_id(step)}__{_id(branch)}[["{_quote(branch)}"]]'
                lines.append(f"    {source} -->|fork| {box}")
                lines += [f"    {box} --> {_node(t, graph)}" for t in node["next"]]
        else:
            lines += [f"    {source} --> {_node(t, graph)}" for t in node["next"]]
    return "\n".join(lines)


def _label(step: str) -> str:
    return {START: "START", END: "END"}.get(step, step)


def _node(step: str, graph: dict[str, Node] | None = None, *, gate: bool = False) -> str:
    """A node with its shape; a target takes its shape from its own entry in `graph`."""
    if graph is not None and step in graph:
        gate = graph[step]["gate"]
    label, node_id = _quote(_label(step)), _id(_label(step))
    if step in (START, END):
        return f"{node_id}((({label})))"
    return f'{node_id}{{{{"{label} ?gate?"}}}}' if gate else f'{node_id}["{label}"]'


def _id(name: str) -> str:
    """Mermaid ids are words; a step name may be anything."""
    return re.sub(r"\W", "_", name)


def _quote(text: str) -> str:
    return text.replace('"', "#quot;")
