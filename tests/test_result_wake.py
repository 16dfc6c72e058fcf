"""`RunHandle.result()` is told when the run ends (pub/sub on Redis, a condition in memory)
instead of reading the record over and over."""

from __future__ import annotations

import time
from typing import Any

import pytest

from orchestrator import END, START, RunStatus, Workflow, WorkflowRunner
from tests import flows
from tests.conftest import Cluster


def _counting_loads(handle: Any) -> list[float]:
    loads: list[float] = []
    store = handle._store
    real = store.load

    def load(run_id: str) -> Any:
        loads.append(time.monotonic())
        return real(run_id)

    store.load = load
    return loads


def _napper(ctx: Any) -> Any:
    time.sleep(0.6)
    return END


@pytest.fixture
def no_second_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the word of the end can wake a waiter before its timeout."""
    monkeypatch.setattr("orchestrator._runner.LOOK_AGAIN_EVERY", 3600.0)


@pytest.mark.usefixtures("no_second_look")
def test_an_embedded_result_wakes_when_the_run_ends() -> None:
    wf = Workflow("Napper", "").flow({START: _napper})
    with WorkflowRunner(wf) as runner:
        handle = runner.run({})
        loads = _counting_loads(handle)
        started = time.monotonic()
        assert handle.result(timeout=30, poll=0.01).status is RunStatus.COMPLETED
    # Polling every 10 ms (up to 0.25 s) would read the record about 10 times in 0.6 s;
    # with no word of the end, the one look after the first would come at the deadline.
    assert len(loads) == 2 and 0.5 <= loads[-1] - started < 15


@pytest.mark.usefixtures("no_second_look")
def test_a_cluster_result_wakes_on_the_end_published_by_the_worker(cluster: Cluster) -> None:
    handle = WorkflowRunner(flows.slow, app=cluster.app).run({"seconds": 1.0})
    loads = _counting_loads(handle)
    started = time.monotonic()
    result = handle.result(timeout=60, poll=0.01)
    assert result.status is RunStatus.COMPLETED
    # Woken by the word of the end, not by the deadline (when it would look once more).
    assert len(loads) == 2 and loads[-1] - started < 30, loads


def test_without_a_word_of_the_end_result_still_finds_it(cluster: Cluster) -> None:
    """A process that dies between its commit and the announcement: the waiter looks again
    on its own."""
    handle = WorkflowRunner(flows.slow, app=cluster.app).run({"seconds": 0.2})
    store = handle._store
    store.announce_end = lambda run_id: None  # nobody will say it ended
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("orchestrator._runner.LOOK_AGAIN_EVERY", 0.3)
        assert handle.result(timeout=60).status is RunStatus.COMPLETED
