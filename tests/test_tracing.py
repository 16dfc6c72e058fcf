"""OpenTelemetry: a run is one trace, from the app's span through every step on real
worker processes, whoever sent the step (a worker, the chord's body, a coordinator's
retry, an approval from another process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Cluster, wait_for

CODE_WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
from orchestrator import END, START, WorkflowRunner, Workflow
from orchestrator._stores.base import record_json
from orchestrator import _tracing
wf = Workflow("Plain").flow({START: "A", "A": lambda ctx: END})
runner = WorkflowRunner(wf)
handle = runner.run({})
assert handle.result(timeout=10).status == "completed"
assert not _tracing.AVAILABLE and _tracing.middleware() == [] and _tracing.carrier() is None
assert not runner.runtime.committer.hooks  # no hook at all on the hot path
record = handle.record()
assert record.trace_context is None and "trace_context" not in record_json(record)
print("ok")
"""


def test_without_opentelemetry_the_core_runs_and_stores_no_context() -> None:
    out = subprocess.run([sys.executable, "-c", CODE_WITHOUT_OTEL], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "ok", out.stderr


# ---- with opentelemetry ------------------------------------------------------------------

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from orchestrator import RunStatus, WorkflowRunner  # noqa: E402
from tests.traced_flows import span_dict, traced, traced_kid, traced_parent  # noqa: E402

APPROVE_ELSEWHERE = """
import sys
from opentelemetry import trace
import tests.traced_flows as flows  # installs the span-file provider (TEST_SPANS_DIR)
from orchestrator import WorkflowRunner, create_app
handle = WorkflowRunner(flows.traced, app=create_app()).attach(sys.argv[1])
# The approver's own request is a trace of its own: the step it lets go must not join it.
with trace.get_tracer("approver").start_as_current_span("approver view"):
    handle.approve("ops", "go")
"""


@pytest.fixture(scope="module")
def app_spans() -> Iterator[InMemorySpanExporter]:
    """The test process is the app: its spans (the view, the run's start) in memory. The
    global provider can be set once per process, so a provider set before is reused."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def _read_spans(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(directory.glob("spans-*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def test_a_run_is_one_trace_across_worker_processes(
        cluster_factory: Callable[..., Cluster], tmp_path: Path, redis_url: str,
        app_spans: InMemorySpanExporter) -> None:
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    env = {"ORCHESTRATOR_WORKFLOWS": "tests.traced_flows", "TEST_SPANS_DIR": str(spans_dir)}
    cluster = cluster_factory(**env)
    cluster.coordinator("coord")  # sends the retry of Release when its backoff is over
    worker = cluster.worker("w1", 2)  # a prefork pool: spans come from its children

    with trace.get_tracer("app").start_as_current_span("POST /deploy") as view:
        handle = WorkflowRunner(traced, app=cluster.app).run({"fail": True})
    wait_for(lambda: handle.status() is RunStatus.WAITING, 60, what="the gate at Bundle")
    subprocess.run([sys.executable, "-c", APPROVE_ELSEWHERE, handle.run_id], cwd=ROOT,
                   env={**cluster.env, **env}, check=True, timeout=60)
    result = handle.result(timeout=60)
    assert result.status is RunStatus.FAILED, result
    assert result.error is not None and result.error.step == "Release"

    run_id = handle.run_id
    app = {s["name"]: s for s in map(span_dict, app_spans.get_finished_spans())
           if s["name"] in ("POST /deploy", f"start {traced.name}")}
    trace_id = f"{view.get_span_context().trace_id:032x}"
    start = app["start Traced"]
    assert start["trace_id"] == trace_id and start["parent_id"] == app["POST /deploy"]["span_id"]
    assert start["attributes"]["orchestrator.run_id"] == run_id
    assert handle.record().trace_context["traceparent"].split("-")[1:3] == [
        trace_id, start["span_id"]]

    expected = ["branch Build[linux]", "branch Build[mac]", "step Build", "step Bundle",
                "step Release", "step Release", "upload bundle"]

    def worker_spans() -> list[dict[str, Any]] | None:
        spans = sorted((s for s in _read_spans(spans_dir) if s["name"] in expected),
                       key=lambda s: (s["name"], s["attributes"].get("orchestrator.attempt", 0)))
        return spans if [s["name"] for s in spans] == expected else None

    spans = wait_for(worker_spans, 30, what=f"spans {expected} in {spans_dir}")
    linux, mac, build, bundle, release1, release2, upload = spans
    ours = [linux, mac, build, bundle, release1, release2]

    # One trace: every step and branch is a child of the run's start span.
    assert {s["trace_id"] for s in spans} == {trace_id}
    assert all(s["parent_id"] == start["span_id"] for s in ours)
    assert upload["parent_id"] == bundle["span_id"]  # a step's own spans nest under it
    for s in ours:
        a = s["attributes"]
        assert a["orchestrator.run_id"] == run_id
        assert a["orchestrator.workflow"] == "Traced"
        assert a["orchestrator.workflow.version"] == traced.version_id
        assert a["orchestrator.step"] == s["name"].split()[1].split("[")[0]
    assert linux["attributes"]["orchestrator.branch"] == "linux"
    assert mac["attributes"]["orchestrator.branch"] == "mac"
    assert "orchestrator.branch" not in build["attributes"]
    assert [s["attributes"]["orchestrator.attempt"] for s in (build, release1, release2)] == [
        1, 1, 2]
    # Made in the pool's children (forked after the worker's provider was set up).
    assert worker.pid not in {s["pid"] for s in ours}

    # The failing step: error status and the exception, on each attempt.
    assert [s["status"] for s in ours] == ["UNSET"] * 4 + ["ERROR"] * 2
    for s in (release1, release2):
        (event,) = s["events"]
        assert event["name"] == "exception"
        assert event["attributes"]["exception.type"] == "RuntimeError"
        assert event["attributes"]["exception.message"] == "release refused"
        assert "release refused" in event["attributes"]["exception.stacktrace"]

    # The approval's own trace stayed its own.
    approver = [s for s in _read_spans(spans_dir) if s["name"] == "approver view"]
    assert len(approver) == 1 and approver[0]["trace_id"] != trace_id


def test_a_run_started_without_a_span_is_still_one_trace(
        app_spans: InMemorySpanExporter) -> None:
    """Embedded, no span in the app: the run's start span is the root."""
    app_spans.clear()
    handle = WorkflowRunner(traced).run({"fail": False})
    wait_for(lambda: handle.status() is RunStatus.WAITING, 30, what="the gate")
    handle.approve("ops")
    assert handle.result(timeout=30).status is RunStatus.COMPLETED
    spans = [span_dict(s) for s in app_spans.get_finished_spans()]
    (start,) = [s for s in spans if s["name"] == "start Traced"]
    assert start["parent_id"] is None
    steps = [s for s in spans if s["name"].startswith(("step ", "branch "))]
    assert sorted(s["name"] for s in steps) == [
        "branch Build[linux]", "branch Build[mac]", "step Build", "step Bundle", "step Release"]
    assert {s["trace_id"] for s in spans} == {start["trace_id"]}
    assert {s["parent_id"] for s in steps} == {start["span_id"]}
    # Bundle's code ran on a timeout's helper thread, its span still nests under the step.
    (bundle,) = [s for s in steps if s["name"] == "step Bundle"]
    (upload,) = [s for s in spans if s["name"] == "upload bundle"]
    assert upload["parent_id"] == bundle["span_id"]


def test_a_child_run_joins_its_parents_trace(app_spans: InMemorySpanExporter) -> None:
    app_spans.clear()
    runner = WorkflowRunner(traced_parent)
    runner.runtime.register(traced_kid)
    with trace.get_tracer("app").start_as_current_span("POST /parent") as view:
        handle = runner.run({})
    assert handle.result(timeout=30).status is RunStatus.COMPLETED
    trace_id = f"{view.get_span_context().trace_id:032x}"
    kid_id = handle.record().step_results["CallKid"]["run_id"]
    kid = runner.runtime.store_for("orchestrator:").load(kid_id).record
    assert kid is not None and kid.trace_context is not None
    assert kid.trace_context["traceparent"].split("-")[1] == trace_id
    kid_steps = [span_dict(s) for s in app_spans.get_finished_spans()
                 if (s.attributes or {}).get("orchestrator.run_id") == kid_id
                 and s.name.startswith("step ")]
    assert kid_steps and {s["trace_id"] for s in kid_steps} == {trace_id}


def test_a_run_stored_without_a_context_gets_a_trace_of_its_own() -> None:
    """A run started where no provider was set has no context in its record: its steps
    still share one trace, derived from the run id."""
    from orchestrator._records import RunRecord, RunStatus
    from orchestrator._tracing import run_parent

    def rec(run_id: str) -> RunRecord:
        return RunRecord(run_id=run_id, workflow="W", version="v", status=RunStatus.RUNNING,
                         input={}, state={}, created_at=0.0, updated_at=0.0)

    def parent_of(run_id: str) -> trace.SpanContext:
        return trace.get_current_span(run_parent(rec(run_id))).get_span_context()

    a, again, b = parent_of("run-a"), parent_of("run-a"), parent_of("run-b")
    assert a.is_valid and a.trace_id == again.trace_id and a.span_id == again.span_id
    assert a.trace_id != b.trace_id


CONSOLE = """
from orchestrator import END, START, Workflow, WorkflowRunner
from orchestrator._tracing import install_provider
install_provider("console")
wf = Workflow("Console").flow({START: "A", "A": lambda ctx: END})
assert WorkflowRunner(wf).run({}).result(timeout=10).status == "completed"
"""


def test_the_console_exporter_setting_installs_a_provider() -> None:
    """ORCHESTRATOR_OTEL_EXPORTER=console (what a worker does at start): spans as JSON on
    stdout, flushed when the process exits; service.name from OTEL_SERVICE_NAME."""
    out = subprocess.run([sys.executable, "-c", CONSOLE], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT),
                              "OTEL_SERVICE_NAME": "deploy-workers"})
    assert '"name": "step A"' in out.stdout, out.stderr
    assert '"service.name": "deploy-workers"' in out.stdout


def test_an_unknown_exporter_is_refused() -> None:
    from orchestrator import Settings
    from orchestrator._tracing import install_provider

    with pytest.raises(ValueError, match="ORCHESTRATOR_OTEL_EXPORTER"):
        Settings.from_env({"ORCHESTRATOR_OTEL_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="ORCHESTRATOR_OTEL_EXPORTER"):
        install_provider("zipkin")


def test_span_names_stay_few_whatever_the_data() -> None:
    from orchestrator._records import Task
    from orchestrator._tracing import span_name

    assert span_name(Task(step="Build", token=1)) == "step Build"
    assert span_name(Task(step="__start__", token=1)) == "step START"
    assert span_name(Task(step="Build", token=2, branch="linux")) == "branch Build[linux]"
    assert span_name(Task(step="Fan", token=2, branch="square[31]")) == "branch Fan[square]"
