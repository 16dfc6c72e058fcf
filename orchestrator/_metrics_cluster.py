"""The cluster's numbers, read from Redis when a coordinator is scraped.

Runs are started, approved and stopped by apps, which serve no metrics, so counting runs
in the processes that expose metrics would miss most of them. The stores keep those
numbers instead (see `RunStore.run_totals`, `waiting`, `count_runs`, `count_overdue`), and
every coordinator reports them as they are: the same values from each coordinator, to be
aggregated with `max`, not `sum`. A scrape costs a few Redis round trips per workflow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ._records import RunStatus
from ._runtime import Runtime
from ._stores import RunStore, StoreUnavailable

log = logging.getLogger("orchestrator.metrics")

Family = CounterMetricFamily | GaugeMetricFamily

# A timer is overdue once the sweep that should have fired it is this late: one sweep
# interval plus this much for the pass itself (a saturated pass, a slow Redis).
OVERDUE_GRACE = 5.0


class ClusterCollector:
    """Run counts, waiting runs and overdue timers of the workflows `runtime` hosts (a
    prometheus_client collector: `describe` and `collect`)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def describe(self) -> Iterable[Metric]:
        return list(_families().values())

    def collect(self) -> Iterator[Metric]:
        families = _families()
        try:
            self._read(families)
        except StoreUnavailable as exc:  # say so, and still serve the process's metrics
            log.warning("metrics scrape: %s", exc)
            families = _families()
            families["up"].add_metric([], 0)
        else:
            families["up"].add_metric([], 1)
        yield from families.values()

    def _read(self, f: dict[str, Family]) -> None:
        clocks: dict[str, float] = {}  # one store clock per key prefix, read once a scrape

        def now(store: RunStore) -> float:
            if store.key_prefix not in clocks:
                clocks[store.key_prefix] = store.now()
            return clocks[store.key_prefix]

        for name, wf in sorted(self.runtime.workflows.items()):
            store = self.runtime.store_for(wf.persistence_options.key_prefix)
            for total, count in store.run_totals(name).items():
                f[total].add_metric([name], count)
            for status, count in store.count_runs(name).items():
                f["runs"].add_metric([name, status.value], count)
            for kind, waits in store.waiting(name).items():
                f["waiting"].add_metric([name, kind], waits.count)
                age = 0.0 if waits.oldest is None else max(0.0, now(store) - waits.oldest)
                f["oldest"].add_metric([name, kind], age)
        late = self.runtime.settings.sweep_interval + OVERDUE_GRACE
        f["overdue"].add_metric(
            [], sum(store.count_overdue(now(store) - late) for store in self.runtime.stores()))


def _families() -> dict[str, Family]:
    """Empty families, filled by a scrape (and listed as they are by `describe`)."""
    ran = {total: CounterMetricFamily(
        f"orchestrator_runs_{total}", f"Runs {total}, by workflow (cluster-wide, from Redis).",
        labels=["workflow"]) for total in ("started", "completed", "failed", "stopped")}
    return {
        **ran,
        "runs": GaugeMetricFamily(
            "orchestrator_runs",
            "Runs kept in Redis, by workflow and status (finished ones until their retention "
            f"ends); statuses: {', '.join(s.value for s in RunStatus)}.",
            labels=["workflow", "status"]),
        "waiting": GaugeMetricFamily(
            "orchestrator_runs_waiting",
            "Runs waiting at an approval gate (wait=gate) or for an event (wait=event).",
            labels=["workflow", "wait"]),
        "oldest": GaugeMetricFamily(
            "orchestrator_runs_waiting_oldest_seconds",
            "How long the longest current wait of its kind has lasted (0: nothing waits).",
            labels=["workflow", "wait"]),
        "overdue": GaugeMetricFamily(
            "orchestrator_timers_overdue",
            "Runs whose timer (a sleep, a retry backoff, a gate or event timeout, a recovery "
            "check) is due and no sweep has taken it for more than a sweep interval + "
            f"{OVERDUE_GRACE:g} s: are coordinators running and keeping up?"),
        "up": GaugeMetricFamily(
            "orchestrator_store_up", "1 if this scrape could read Redis, else 0."),
    }
