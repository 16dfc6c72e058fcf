"""What the console's pages show, computed from records, histories and catalog entries:
the step graph laid out for an SVG, the history as a timeline with durations, and the
start form's fields read from a workflow's input JSON schema.

Pure functions of their arguments (no Redis, no requests), so the pages stay thin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .._definition import END, START
from .._records import RunRecord, RunStatus

__all__ = ["FormField", "Graph", "TimelineRow", "by_queue", "form_fields", "layout", "parse_form",
           "pretty", "timeline", "when"]


def pretty(value: Any) -> str:
    """JSON for a <pre>; the template escapes it."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def when(ts: float | None, with_date: bool = True) -> str:
    if not ts:
        return ""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if with_date else "%H:%M:%S.%f")[
        : None if with_date else -3]


def step_name(step: str | None) -> str:
    """START and END as people read them."""
    return {START: "start", END: "end"}.get(step or "", step or "")


def by_queue(queues: dict[str, str]) -> list[tuple[str, list[str]]]:
    """Step -> queue, turned around: each queue with the steps sent to it."""
    grouped: dict[str, list[str]] = {}
    for step, queue in queues.items():
        grouped.setdefault(queue, []).append("start" if step == START else step)
    return sorted(grouped.items())


def took(seconds: float | None) -> str:
    """A duration for people: 12 ms, 3.4 s, 5 min 2 s, 2 h 10 min."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


# ---- the step graph -----------------------------------------------------------------------

NODE_W, NODE_H, TERMINAL_W = 112, 40, 40
GAP_X, GAP_Y, PAD = 36, 18, 16


@dataclass
class Node:
    id: str
    label: str
    kind: str  # start | end | step | gate | branch
    mark: str = "pending"  # done | current | waiting | paused | failed | stopped | pending
    rank: int = 0
    x: float = 0.0
    y: float = 0.0
    w: float = NODE_W
    h: float = NODE_H

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    @property
    def short(self) -> str:
        return self.label if len(self.label) <= 16 else self.label[:15] + "…"

    @property
    def hexagon(self) -> str:
        """A gate's outline: a box with pointed ends."""
        x, y, w, h, d = self.x, self.y, self.w, self.h, 10
        return (f"{x + d},{y} {x + w - d},{y} {x + w},{y + h / 2} {x + w - d},{y + h} "
                f"{x + d},{y + h} {x},{y + h / 2}")


@dataclass
class Edge:
    path: str
    mark: str  # done when both ends ran
    back: bool = False


@dataclass
class Graph:
    nodes: list[Node]
    edges: list[Edge]
    width: float
    height: float


def layout(shape: dict[str, dict[str, Any]], record: RunRecord | None = None,
           history: list[dict[str, Any]] | None = None) -> Graph:
    """Columns by longest path from START (loops drawn as arcs below), fork branches in
    a column of their own between the forking step and where it goes next."""
    nodes, links = _nodes_and_links(shape)
    order = list(nodes)
    back = _back_links(order, links)
    _rank(order, links, back, nodes)
    if record is not None:
        _mark(nodes, record, history or [])
    width, height = _place(nodes)
    edges = [_edge(nodes[a], nodes[b], (a, b) in back, height) for a, b in links]
    if back:
        height += 36  # room for the arcs of loops
    return Graph(list(nodes.values()), edges, width, height)


def _nodes_and_links(shape: dict[str, dict[str, Any]],
                     ) -> tuple[dict[str, Node], list[tuple[str, str]]]:
    nodes: dict[str, Node] = {}
    links: list[tuple[str, str]] = []

    def add(node_id: str, label: str, kind: str) -> None:
        if node_id not in nodes:
            w = TERMINAL_W if kind in ("start", "end") else NODE_W
            nodes[node_id] = Node(node_id, label, kind, w=w)

    add(START, "start", "start")
    for step, node in shape.items():
        if step != START:
            add(step, step, "gate" if node.get("gate") else "step")
    for step, node in shape.items():
        targets = list(node.get("next") or [])
        if END in targets:
            add(END, "end", "end")
        sources = [step]
        if node.get("fork"):
            sources = [f"{step}/{b}" for b in node["fork"]]
            for branch, branch_id in zip(node["fork"], sources, strict=True):
                add(branch_id, branch, "branch")
                links.append((step, branch_id))
        links += [(s, t) for s in sources for t in targets if t in shape or t == END]
    return nodes, links


def _back_links(order: list[str], links: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Links that close a loop (to a node on the DFS path): left out of the ranking."""
    out: dict[str, list[str]] = {n: [] for n in order}
    for a, b in links:
        out[a].append(b)
    state: dict[str, int] = {}  # 1 on the path, 2 finished
    back: set[tuple[str, str]] = set()

    def visit(node: str) -> None:
        state[node] = 1
        for nxt in out[node]:
            if state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                visit(nxt)
        state[node] = 2

    for node in order:
        if node not in state:
            visit(node)
    return back


def _rank(order: list[str], links: list[tuple[str, str]], back: set[tuple[str, str]],
          nodes: dict[str, Node]) -> None:
    forward = [(a, b) for a, b in links if (a, b) not in back]
    for _ in range(len(order)):  # longest path: relax until nothing moves (a DAG now)
        moved = False
        for a, b in forward:
            if nodes[b].rank < nodes[a].rank + 1:
                nodes[b].rank = nodes[a].rank + 1
                moved = True
        if not moved:
            break
    end = nodes.get(END)
    if end is not None:  # END sits alone in the last column
        end.rank = max(n.rank for n in nodes.values() if n.id != END) + 1


def _place(nodes: dict[str, Node]) -> tuple[float, float]:
    columns: dict[int, list[Node]] = {}
    for node in nodes.values():
        columns.setdefault(node.rank, []).append(node)
    tallest = max(len(c) for c in columns.values())
    height = PAD * 2 + tallest * NODE_H + (tallest - 1) * GAP_Y
    x = float(PAD)
    for rank in sorted(columns):
        column = columns[rank]
        col_w = max(n.w for n in column)
        col_h = len(column) * NODE_H + (len(column) - 1) * GAP_Y
        y = (height - col_h) / 2
        for node in column:
            node.x, node.y = x + (col_w - node.w) / 2, y
            y += NODE_H + GAP_Y
        x += col_w + GAP_X
    return x - GAP_X + PAD, height


def _edge(a: Node, b: Node, back: bool, height: float) -> Edge:
    mark = "done" if a.mark == "done" and b.mark != "pending" else "pending"
    if a is b:  # a step that may go to itself: a loop under its box
        left, right, low = a.x + a.w * 0.3, a.x + a.w * 0.7, a.y + a.h + 28
        return Edge(f"M{right:.0f},{a.y + a.h:.0f} C{right + 12:.0f},{low:.0f} "
                    f"{left - 12:.0f},{low:.0f} {left:.0f},{a.y + a.h + 4:.0f}", mark, back=True)
    if back or b.rank <= a.rank:
        low = height + 20
        path = (f"M{a.cx:.0f},{a.y + a.h:.0f} C{a.cx:.0f},{low:.0f} {b.cx:.0f},{low:.0f} "
                f"{b.cx:.0f},{b.y + b.h + 4:.0f}")
        return Edge(path, mark, back=True)
    x1, y1, x2, y2 = a.x + a.w, a.cy, b.x - 4, b.cy
    mid = (x1 + x2) / 2
    return Edge(f"M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} {x2:.0f},{y2:.0f}",
                mark)


def _branch_aliases(nodes: dict[str, Node], history: list[dict[str, Any]]) -> dict[str, str]:
    """`Step/<branch as the run names it>` -> the node drawn for it. The graph names a
    fork's branches after the functions the code hands to `Parallel`; a run names them by
    its keys (`Parallel({"slow": wait_a_bit})`), in the same order: where no run name is
    a node, they are matched by position."""
    aliases: dict[str, str] = {}
    for e in history:
        if e.get("event") != "forked" or not isinstance(e.get("branches"), list):
            continue
        step = e.get("step")
        drawn = [n.id for n in nodes.values() if n.kind == "branch"
                 and n.id.startswith(f"{step}/")]
        named = [f"{step}/{str(b).split('/')[0].split('[')[0]}" for b in e["branches"]]
        if named and not set(named) & set(drawn) and len(set(named)) == len(drawn):
            aliases.update(zip(dict.fromkeys(named), drawn, strict=True))
    return aliases


def _mark(nodes: dict[str, Node], record: RunRecord, history: list[dict[str, Any]]) -> None:
    """done: it completed at least once; current/waiting/paused: where the run is now."""
    done = {e.get("step") for e in history if e.get("event") in ("step_completed", "routed")}
    aliases = _branch_aliases(nodes, history)
    branches = {aliases.get(b, b) for b in (f"{e.get('step')}/{e.get('branch')}" for e in history
                                            if e.get("event") == "branch_completed")}
    for node in nodes.values():
        if node.id in done or node.id in branches:
            node.mark = "done"
    if record.status == RunStatus.COMPLETED and END in nodes:
        nodes[END].mark = "done"
    here = _current_mark(record)
    step = record.current_step
    if step in nodes and here:
        nodes[step].mark = here
    if record.fork is not None and not record.status.is_terminal:
        for name in record.fork.leaves():
            key = f"{record.fork.step}/{name.split('/')[0]}"
            branch = nodes.get(aliases.get(key, key))
            if branch is not None and branch.id not in branches:
                branch.mark = "current"
    if record.status == RunStatus.FAILED and record.error and record.error.step:
        _mark_failed(nodes, record.error.step, aliases)


def _current_mark(record: RunRecord) -> str:
    if record.status == RunStatus.STOPPED:
        return "stopped"
    if record.status.is_terminal:
        return ""
    if record.paused or record.status == RunStatus.PAUSED:
        return "paused"
    return "waiting" if record.status == RunStatus.WAITING else "current"


def _mark_failed(nodes: dict[str, Node], where: str, aliases: dict[str, str]) -> None:
    """`Step` or `Step[branch]` (how a task names itself)."""
    step, _, branch = where.partition("[")
    if step in nodes:
        nodes[step].mark = "failed"
    key = f"{step}/{branch.rstrip(']').split('/')[0]}"
    if branch and aliases.get(key, key) in nodes:
        nodes[aliases.get(key, key)].mark = "failed"


# ---- the timeline -------------------------------------------------------------------------

# Events after which the next step starts: a step's duration runs from the last of them.
HANDOVER = frozenset({"started", "step_completed", "joined", "gate_approved", "gate_rejected",
                      "gate_timed_out", "timer_fired", "event_received", "event_timed_out",
                      "child_ended", "step_retrying", "step_redispatched", "resumed",
                      "routed", "upgraded"})
# Events that end a wait: their duration runs from when the wait began.
WAIT_ENDS = {"gate_approved": "gate_opened", "gate_rejected": "gate_opened",
             "gate_timed_out": "gate_opened", "timer_fired": "timer_set",
             "event_received": "event_awaited", "event_timed_out": "event_awaited",
             "child_ended": "child_called"}
TONES = {"completed": "good", "gate_approved": "good", "failed": "bad", "gate_rejected": "bad",
         "stopped": "bad", "step_retrying": "warn", "step_redispatched": "warn",
         "gate_opened": "wait", "timer_set": "wait", "event_awaited": "wait",
         "paused": "warn", "gate_timed_out": "warn", "event_timed_out": "warn"}
SHOWN_APART = frozenset({"n", "at", "event", "step", "by", "source", "comment", "reason",
                         "attempt", "mac", "prev"})


@dataclass
class TimelineRow:
    n: int
    at: str
    event: str
    step: str
    duration: str
    attempt: int | None
    by: str
    source: str
    said: str  # a decision's comment or a stop's reason
    details: list[tuple[str, str]] = field(default_factory=list)
    tone: str = ""

    @property
    def label(self) -> str:
        return self.event.replace("_", " ")


def timeline(history: list[dict[str, Any]]) -> list[TimelineRow]:
    rows: list[TimelineRow] = []
    since: float | None = None
    opened: dict[tuple[str, str], float] = {}  # (event, step) -> when the wait began
    for i, entry in enumerate(history):
        at, event, step = float(entry.get("at", 0)), str(entry.get("event", "?")), entry.get(
            "step") or ""
        duration = _duration(entry, event, step, at, since, opened)
        if event in WAIT_ENDS.values() or event == "forked":
            opened[(event, step)] = at
        if event in HANDOVER:
            since = at
        rows.append(_row(i, entry, event, step, at, duration))
    return rows


def _duration(entry: dict[str, Any], event: str, step: str, at: float, since: float | None,
              opened: dict[tuple[str, str], float]) -> float | None:
    if event in WAIT_ENDS:
        began = opened.get((WAIT_ENDS[event], step))
        return None if began is None else at - began
    if event == "branch_completed":
        began = opened.get(("forked", step), since)
        return None if began is None else at - began
    if event in ("step_completed", "failed", "step_retrying") and since is not None:
        return at - since
    return None


def _row(i: int, entry: dict[str, Any], event: str, step: str, at: float,
         duration: float | None) -> TimelineRow:
    where = step if not entry.get("branch") else f"{step}[{entry['branch']}]"
    details = [(k, v if isinstance(v, str) else json.dumps(v, default=str))
               for k, v in entry.items() if k not in SHOWN_APART and k != "branch"]
    attempt = entry.get("attempt")
    return TimelineRow(
        n=int(entry.get("n", i)), at=when(at, with_date=False), event=event,
        step="start" if where == START else where, duration=took(duration),
        attempt=attempt if isinstance(attempt, int) else None,
        by=str(entry.get("by") or ""), source=str(entry.get("source") or ""),
        said=str(entry.get("comment") or entry.get("reason") or ""), details=details,
        tone=TONES.get(event, ""))


# ---- the start form -----------------------------------------------------------------------


@dataclass
class FormField:
    name: str
    label: str
    kind: str  # text | integer | number | boolean | enum | json
    required: bool
    description: str = ""
    default: Any = None
    options: list[str] = field(default_factory=list)
    value: str = ""  # what the form shows (the posted text after an error)
    checked: bool = False
    error: str = ""


def form_fields(schema: dict[str, Any]) -> list[FormField]:
    """One field per top-level property; anything nested is a JSON textarea."""
    required = set(schema.get("required", []))
    fields = []
    for name, prop in (schema.get("properties") or {}).items():
        resolved, nullable = _resolve(prop, schema)
        kind = _kind(resolved)
        default = prop.get("default", resolved.get("default"))
        f = FormField(name=name, label=str(prop.get("title") or name), kind=kind,
                      required=name in required and not nullable,
                      description=str(prop.get("description") or ""), default=default,
                      options=[str(o) for o in resolved.get("enum", [])])
        _show(f, default)
        fields.append(f)
    return fields


def _resolve(prop: dict[str, Any], root: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The property's own schema ($ref and Optional[...] seen through), and whether null
    is allowed."""
    nullable = False
    options = prop.get("anyOf") or prop.get("oneOf")
    if options:
        real = [o for o in options if o.get("type") != "null"]
        nullable = len(real) < len(options)
        prop = real[0] if len(real) == 1 else {"type": "object"}
    if "allOf" in prop and len(prop["allOf"]) == 1:
        prop = prop["allOf"][0]
    ref = prop.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        prop = (root.get("$defs") or {}).get(ref.split("/")[-1], {})
    return prop, nullable


def _kind(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "enum"
    return {"string": "text", "integer": "integer", "number": "number",
            "boolean": "boolean"}.get(str(prop.get("type")), "json")


def _show(f: FormField, value: Any) -> None:
    if f.kind == "boolean":
        f.checked = bool(value)
    elif f.kind == "json":
        f.value = "" if value is None else json.dumps(value, indent=2)
    else:
        f.value = "" if value is None else str(value)


def parse_form(fields: list[FormField], form: dict[str, str]) -> tuple[dict[str, Any],
                                                                      dict[str, str]]:
    """(input, errors by field) from the posted form; an empty optional field is left out,
    so the workflow's default applies. The service checks the schema afterwards."""
    data: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for f in fields:
        raw = form.get(f.name, "")
        if f.kind == "boolean":
            f.checked = raw in ("on", "true", "1")
            data[f.name] = f.checked
            continue
        f.value = raw
        if raw.strip() == "":
            if f.required:
                errors[f.name] = "This field is required."
            continue
        try:
            data[f.name] = _convert(f.kind, raw)
        except ValueError as exc:
            errors[f.name] = str(exc)
    return data, errors


def _convert(kind: str, raw: str) -> Any:
    if kind == "integer":
        try:
            return int(raw.strip())
        except ValueError:
            raise ValueError("Enter a whole number.") from None
    if kind == "number":
        try:
            return float(raw.strip())
        except ValueError:
            raise ValueError("Enter a number.") from None
    if kind == "json":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Not valid JSON: {exc.msg} (line {exc.lineno}).") from None
    return raw
