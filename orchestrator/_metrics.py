"""What a worker or coordinator process counts for Prometheus, and the middleware counting it.

These are per process: each counts what it did itself (a worker the steps it ran, a
coordinator the timers it fired and the work it re-drove), and Prometheus adds instances
up. Counts of runs, and of runs waiting, are the cluster's, read from Redis at scrape time
(`_metrics_cluster`), because runs are started and stopped by apps that serve no metrics.

Import this module only after `_metrics_http.prepare()`: prometheus_client chooses
multiprocess mode, which a prefork pool needs, when it is first imported.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import Counter, Histogram

from ._middleware import Middleware
from ._records import RunRecord, Task

__all__ = ["MetricsMiddleware"]

# Steps run from milliseconds (routing, API calls) to an hour (builds).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0, 600.0, 1800.0, 3600.0)
# A timer fires on the first sweep after it is due: within a sweep interval when healthy.
LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

STEP_LABELS = ("workflow", "step", "branch")

STEP_SECONDS = Histogram(
    "orchestrator_step_duration_seconds",
    "Seconds a step's (or a parallel branch's) code ran, every attempt, failed or not.",
    STEP_LABELS, buckets=STEP_BUCKETS)
STEP_FAILURES = Counter(
    "orchestrator_step_failures",
    "Attempts of a step (or branch) whose code raised, whether it will be retried or not.",
    STEP_LABELS)
STEP_RETRIES = Counter(
    "orchestrator_step_retries",
    "Failed attempts that were scheduled to run again (the step's retries).",
    STEP_LABELS)
SWEEP_REDISPATCHES = Counter(
    "orchestrator_sweep_redispatches",
    "Steps (or branches) the recovery sweep sent again because their work was lost.",
    ["workflow"])
SWEEP_REPAIRS = Counter(
    "orchestrator_sweep_repairs",
    "Other lost work the recovery sweep re-drove: a fork's lost join (join), a child run "
    "whose start was lost (child_start).",
    ["workflow", "repair"])
TIMER_LATENESS = Histogram(
    "orchestrator_timer_lateness_seconds",
    "How long after its wake-up time a durable timer fired.",
    ["workflow"], buckets=LATENESS_BUCKETS)
IGNORED_COMPLETIONS = Counter(
    "orchestrator_ignored_completions",
    "Late, duplicate or stale completions that were ignored, by what was ignored.",
    ["what"])

REPAIRS = {"join_redriven": "join", "child_start_redriven": "child_start"}

_INDEX = re.compile(r"\[\d+\]")
_WHERE = re.compile(r"(?P<step>[^\[]*)\[(?P<branch>.*)\]")


def branch_label(branch: str | None) -> str:
    """A branch as a label: its name without `Parallel.map`'s item index (`square[3]` is
    `square`), so a fan-out over a thousand items is one series, not a thousand."""
    return "" if branch is None else _INDEX.sub("", branch)


def step_labels(workflow: str, where: str) -> tuple[str, str, str]:
    """Labels for a history entry's `step`, which names a branch as `Step[branch]`."""
    m = _WHERE.fullmatch(where)
    if m is None:
        return workflow, where, ""
    return workflow, m["step"], branch_label(m["branch"])


class MetricsMiddleware(Middleware):
    """Counts steps from the worker's hooks and recovery from committed history entries."""

    def after_step(self, run: RunRecord, task: Task, failed: bool, seconds: float) -> None:
        labels = (run.workflow, task.step, branch_label(task.branch))
        STEP_SECONDS.labels(*labels).observe(seconds)
        if failed:
            STEP_FAILURES.labels(*labels).inc()

    def after_commit(self, previous: RunRecord | None, record: RunRecord,
                     history: list[dict[str, Any]]) -> None:
        workflow = record.workflow
        for entry in history:
            event = entry.get("event")
            if event == "step_retrying":
                STEP_RETRIES.labels(*step_labels(workflow, str(entry.get("step", "")))).inc()
            elif event == "step_redispatched":
                SWEEP_REDISPATCHES.labels(workflow).inc()
            elif event in REPAIRS:
                SWEEP_REPAIRS.labels(workflow, REPAIRS[event]).inc()
            elif event == "timer_fired":
                TIMER_LATENESS.labels(workflow).observe(max(0.0, float(entry.get("late", 0))))

    def on_ignored(self, run_id: str, what: str, reason: str) -> None:
        IGNORED_COMPLETIONS.labels(what).inc()


PROCESS_METRICS = (STEP_SECONDS, STEP_FAILURES, STEP_RETRIES, SWEEP_REDISPATCHES,
                   SWEEP_REPAIRS, TIMER_LATENESS, IGNORED_COMPLETIONS)
