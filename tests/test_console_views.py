"""The console's run graph, marked from a run's record and history (pure: no server)."""

from __future__ import annotations

from typing import Any

from orchestrator import RunError, RunRecord, RunStatus, _graph
from orchestrator._console import _views
from tests import flows


def _marks(record: RunRecord, history: list[dict[str, Any]]) -> dict[str, str]:
    shape = {step: dict(node) for step, node in _graph.shape(flows.failing_branch).items()}
    return {n.id: n.mark for n in _views.layout(shape, record, history).nodes}


def test_branches_named_by_their_keys_are_marked_on_the_functions_drawn() -> None:
    """`Parallel({"slow": slow_sibling, "broken": broken_after_sibling})`: the graph draws
    the functions, the run names the branches by their keys."""
    record = RunRecord(run_id="r", workflow="FailingBranch", version="v",
                       status=RunStatus.FAILED, input={}, state={}, created_at=0,
                       updated_at=1, error=RunError(type="ValueError", message="no",
                                                    step="Fork[broken]"))
    history = [{"event": "forked", "step": "Fork", "branches": ["slow", "broken"]},
               {"event": "branch_completed", "step": "Fork", "branch": "slow"}]
    marks = _marks(record, history)
    assert marks["Fork/slow_sibling"] == "done"
    assert marks["Fork/broken_after_sibling"] == "failed"
    assert marks["Fork"] == "failed"
