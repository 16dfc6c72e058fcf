"""Decide, commit, then send: the one write path of every run.

Load the record, let the engine decide, compare-and-set the new record with its history
and timer, and only then hand the decided commands to the dispatcher: state and the
outbox of messages are written together, so a crash after the commit loses no message
(the sweep re-sends what the record says was dispatched and never arrived). Where the
store is the broker's own Redis, the commit writes the messages too (`Outbox`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _engine as engine
from . import _tracing
from ._config import Settings
from ._dispatch.base import Dispatcher
from ._middleware import Hooks
from ._records import FlowSpec, ParentLink, RunRecord
from ._registry import Registry
from ._stores import Loaded, Outbox, RunStore

if TYPE_CHECKING:
    from ._children import ChildRuns

log = logging.getLogger("orchestrator")

MAX_CAS_ATTEMPTS = 50
MAX_INPUT_DEPTH = 200

EventMaker = Callable[[RunRecord, float], engine.Event]


class RunNotFound(LookupError):
    pass


class CommitConflict(RuntimeError):
    """Too many concurrent writers on one run; nothing was committed."""


class Committer:
    def __init__(self, registry: Registry, dispatcher: Dispatcher, settings: Settings,
                 hooks: Hooks) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.settings = settings
        self.hooks = hooks
        self.children: ChildRuns | None = None  # the runtime plugs it in

    def due(self, rec: RunRecord) -> float | None:
        return engine.next_due(rec, self.settings.redispatch_after, self.settings.join_after)

    def apply(
        self,
        store: RunStore,
        run_id: str,
        make_event: EventMaker,
        spec: FlowSpec | None = None,
        *,
        release: str | None = None,
        loaded: Loaded | None = None,
        run_here: Callable[[engine.Command], bool] | None = None,
    ) -> engine.Decision:
        """Decide and commit one event; retried on a concurrent write. Raises what the
        engine raises for a request that does not apply (nothing is written then).
        Commands `run_here` picks are not sent: the caller carries them out itself."""
        for _ in range(MAX_CAS_ATTEMPTS):
            current = loaded or store.load(run_id)
            loaded = None
            if current.record is None:
                raise RunNotFound(f"no run {run_id!r} in {store.key_prefix!r}")
            event = make_event(current.record, current.now)
            # Only the definition the run is pinned to decides for it (a join, a route).
            spec = spec or self.registry.spec_for(current.record.workflow,
                                                  current.record.version)
            decision = engine.apply(current.record, event, spec)
            if not decision.changed:
                if release is not None:  # a worker's late or duplicate result: keep a trace
                    self.note_ignored(store, run_id, current.now, type(event).__name__,
                                      release, decision.ignored or "")
                return decision
            assert decision.record is not None
            ends = decision.record.status.is_terminal and not current.record.status.is_terminal
            outbox, rest = self._outbox(store, [c for c in decision.commands
                                                if run_here is None or not run_here(c)], ends)
            if store.commit(current.record, current.version, decision.record, decision.history,
                            self.due(decision.record), release, outbox):
                if self.hooks:  # the messages the commit wrote may be running elsewhere
                    self.hooks.call("after_commit", current.record, decision.record,
                                    decision.history)
                self.send(store, rest)
                if ends and not (outbox is not None and outbox.announce_end):
                    # After its commands (a failed run's revokes): who hears of the end hears
                    # of it once what it decided is on its way.
                    store.announce_end(run_id)
                return decision
        raise CommitConflict(f"run {run_id}: gave up after {MAX_CAS_ATTEMPTS} conflicting writes")

    def keep_branch(self, store: RunStore, run_id: str, token: int, branch: str,
                    kept: engine.KeepBranch, release: str, now: float) -> int | None:
        """Keep a finished branch's result beside the record: how many branches of fork
        `token` have results now (None: not kept, the fork closed or it was kept before).
        The last one brings the run's timer forward, so a lost join is re-driven."""
        return store.record_branch(run_id, token, branch, kept.result, kept.entry, release,
                                   kept.width, now + self.settings.join_after)

    def join(self, store: RunStore, run_id: str, token: int, spec: FlowSpec | None,
             run_here: Callable[[engine.Command], bool] | None = None) -> engine.Decision:
        loaded, results = store.load_joining(run_id, token)
        return self.apply(store, run_id, lambda r, now: engine.Join(token, now, results), spec,
                          run_here=run_here, loaded=loaded)

    def note_ignored(self, store: RunStore, run_id: str, now: float, what: str, token: str,
                     reason: str) -> None:
        log.info("run %s: ignored %s (%s)", run_id, what, reason)
        store.note(run_id, {"at": now, "event": "ignored", "what": what, "token": token,
                            "reason": reason}, token)
        if self.hooks:
            self.hooks.call("on_ignored", run_id, what, reason)

    def _outbox(self, store: RunStore, commands: list[engine.Command], ends: bool
                ) -> tuple[Outbox | None, list[engine.Command]]:
        """What a create or commit writes itself, where the store is the broker's Redis
        (its messages; the run's end if it `ends` and nothing is left to do after it), and
        the commands to carry out after it (all of them elsewhere)."""
        if not store.sends_for(self.settings.broker):
            return None, commands
        built = self.dispatcher.outbox(commands) if commands else None
        outbox, rest = built if built is not None else (Outbox(), commands)
        if ends and not rest:
            outbox = dataclasses.replace(outbox, announce_end=True)
        return (outbox if outbox.writes or outbox.announce_end else None), rest

    def send(self, store: RunStore, commands: list[engine.Command]) -> None:
        """Send to queues; then act on other runs (children, parents) through `children`."""
        self.dispatcher.send([c for c in commands if not isinstance(c, engine.RUN_COMMANDS)])
        for c in commands:
            if isinstance(c, engine.RUN_COMMANDS) and self.children is not None:
                self.children.carry_out(store, c)

    def start(self, store: RunStore, spec: FlowSpec, input: dict[str, Any],
              state: dict[str, Any], run_id: str | None = None,
              parent: ParentLink | None = None, *, by: str | None = None,
              source: str = "client") -> tuple[str, bool]:
        """Create and dispatch a run from validated data. Returns (run id, created); a run
        id that exists already is not started again. `by` (from `source`) is recorded as
        who started it. Once the run is committed it is
        started: if its first message cannot be sent now, the sweep sends it."""
        run_id = uuid.uuid4().hex if run_id is None else run_id
        check_run_id(run_id)
        size = len(json.dumps(input))  # depth was checked where the input came in
        if size > self.settings.max_payload:
            raise ValueError(f"input is {size} bytes of JSON, over the "
                             f"{self.settings.max_payload}-byte limit (ORCHESTRATOR_MAX_PAYLOAD)")
        now = store.now()  # fails fast (StoreUnavailable) before anything is written
        d = engine.start(spec, run_id, input, state, now, parent, by, source)
        assert d.record is not None
        d.record.trace_context = _tracing.carrier()  # the trace every step's span joins
        outbox, rest = self._outbox(store, d.commands, ends=False)
        if not store.create(d.record, d.history, self.due(d.record), outbox):
            return run_id, False
        if self.hooks:
            self.hooks.call("after_commit", None, d.record, d.history)
        try:
            self.send(store, rest)
        except Exception as exc:  # the broker is down: the record is the outbox
            log.warning("run %s: started, but its first step could not be sent (%s: %s); "
                        "the recovery sweep will send it", run_id, type(exc).__name__, exc)
        return run_id, True


def check_run_id(run_id: str) -> None:
    """Run ids go into keys, task ids and log lines: no braces, ':' or whitespace, and
    nothing unprintable (a `\\r` or U+2028 would forge log lines)."""
    if (not isinstance(run_id, str) or not run_id or len(run_id) > 200
            or not run_id.isprintable() or any(c in run_id for c in "{}: ")):
        raise ValueError(f"run id {run_id!r} must be 1-200 printable characters without "
                         f"braces, ':' or whitespace")


def nesting_depth(value: Any, stop_after: int = MAX_INPUT_DEPTH) -> int:
    """How deep lists and objects nest, counted without recursion (the point is to refuse
    input that would blow the stack of json or pydantic); counting stops past `stop_after`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > stop_after:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_input_depth(value: Any) -> None:
    if nesting_depth(value) > MAX_INPUT_DEPTH:
        raise ValueError(f"input is nested more than {MAX_INPUT_DEPTH} levels deep")

