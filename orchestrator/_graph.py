"""The step graph "as far as it is known", read from each step's compiled code.

Steps choose their successor in code, so the graph is a static reading: every string
constant in a step's code object (nested functions and lambdas included) that names a
step is a possible edge, and a reference to END is an edge to the end. Helpers a step
calls are not followed. It is meant for people (the catalog, `orchestrator graph`),
never for deciding what runs.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

from ._definition import END, START, Workflow


def edges(wf: Workflow) -> dict[str, list[str]]:
    if wf.is_imperative:
        return {START: [END]}
    names = set(wf.step_names()) - {START}
    graph: dict[str, list[str]] = {}
    for name in wf.step_names():
        fn = wf.step_def(name).fn
        route = getattr(fn, "__orchestrator_route__", None)
        targets = {route} if route is not None else _targets(fn, names)
        graph[name] = sorted(targets, key=lambda t: (t == END, t))
    return graph


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


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def render_mermaid(graph: dict[str, list[str]]) -> str:
    lines = ["flowchart TD"]
    for step, targets in graph.items():
        lines += [f"    {_node(step)} --> {_node(target)}" for target in targets]
    return "\n".join(lines)


def render_text(graph: dict[str, list[str]]) -> str:
    return "\n".join(f"{_label(s)} -> {', '.join(_label(t) for t in ts) or '?'}"
                     for s, ts in graph.items())


def _label(step: str) -> str:
    return {START: "START", END: "END"}.get(step, step)


def _node(step: str) -> str:
    label = _label(step)
    return f"{label}((({label})))" if step in (START, END) else f'{label}["{label}"]'
