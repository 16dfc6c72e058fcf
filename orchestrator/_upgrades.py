"""Move runs in flight from one version of a workflow to the one hosted here.

A run is moved only where nothing of it is running: waiting (gate, timer, event, child),
paused, or between steps (its next step queued, not started). Every step it may go on at
must exist in the new version or be mapped to one, and its state must fit the new model
(or be converted by the declared `state=` function); otherwise it is left exactly as it
was and the reason is reported. The move is one engine transition (`Upgrade`), committed
with the same version check as any other, and recorded in the run's history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from . import _engine as engine
from ._committer import Committer
from ._definition import Upgrade, Workflow
from ._records import FlowSpec, RunRecord
from ._stores import RunStore


@dataclasses.dataclass(frozen=True)
class Moved:
    run_id: str
    version: str  # the version it was on
    refused: str | None = None  # why it was left as it was

    @property
    def ok(self) -> bool:
        return self.refused is None


def rule_for(wf: Workflow, version: str) -> Upgrade | None:
    """The upgrade `wf` declares from `version` (a declared prefix of it will do)."""
    return next((rule for v, rule in wf.upgrade_rules.items() if version.startswith(v)), None)


def converted_state(wf: Workflow, rule: Upgrade | None, state: dict[str, Any]) -> dict[str, Any]:
    """The run's state as the new version holds it; ValidationError if it does not fit."""
    value: Any = rule.state(dict(state)) if rule is not None and rule.state else state
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return wf.state_model.model_validate(value).model_dump(mode="json")


def upgrade_runs(committer: Committer, store: RunStore, wf: Workflow, spec: FlowSpec,
                 from_version: str, steps: Mapping[str, str] | None = None,
                 dry_run: bool = False) -> list[Moved]:
    """Move every active run of `wf` whose version starts with `from_version` to `spec`."""
    report = []
    for rec in store.active_runs(wf.name):
        if rec.version == spec.version or not rec.version.startswith(from_version):
            continue
        rule = rule_for(wf, rec.version)
        mapping = {**(rule.steps if rule is not None else {}), **(steps or {})}

        def upgrade(r: RunRecord, now: float, rule: Upgrade | None = rule,
                    mapping: dict[str, str] = mapping) -> engine.Event:
            running = store.live_leases(r.run_id, [t.lease_id for t in engine.live_tasks(r)])
            return engine.Upgrade(now, spec, mapping, converted_state(wf, rule, r.state),
                                  running)

        try:
            if dry_run:
                engine.apply(rec, upgrade(rec, store.now()), spec)
            else:
                committer.apply(store, rec.run_id, upgrade, spec)
        except (engine.ControlError, ValidationError, ValueError) as exc:
            report.append(Moved(rec.run_id, rec.version, _reason(exc)))
            continue
        report.append(Moved(rec.run_id, rec.version))
    return report


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return f"its state does not fit the new state model ({fields}); declare state= in " \
               f".upgrades() to convert it"
    return str(exc)
