"""A workflow for tests/test_tracing.py, and the span exporter its worker processes use.

Imported by worker and coordinator subprocesses (ORCHESTRATOR_WORKFLOWS=tests.traced_flows):
where TEST_SPANS_DIR is set, importing it installs a TracerProvider that writes every
finished span as a JSON line to `TEST_SPANS_DIR/spans-<pid>.jsonl`, so the test can read
what each process (a prefork pool's children too) traced. One file per process, opened per
export: a pool child forked from the main process never shares a file handle with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from pydantic import BaseModel

from orchestrator import END, START, Call, HumanApproval, Parallel, Wait, Workflow, step


class JsonLinesExporter(SpanExporter):
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_dict(s)) + "\n" for s in spans]
        with (self.directory / f"spans-{os.getpid()}.jsonl").open("a") as f:
            f.write("".join(lines))
        return SpanExportResult.SUCCESS


def span_dict(span: ReadableSpan) -> dict[str, object]:
    """The parts of a span the test checks, ids as W3C hex."""
    assert span.context is not None
    return {
        "name": span.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})}
                   for e in span.events],
        "pid": os.getpid(),
    }


if os.environ.get("TEST_SPANS_DIR"):
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(
        os.environ["TEST_SPANS_DIR"])))
    trace.set_tracer_provider(_provider)


class In(BaseModel):
    fail: bool = True


def linux(ctx: object) -> str:
    return "linux.tar"


def mac(ctx: object) -> str:
    return "mac.tar"


def build(ctx: object) -> Parallel:
    return Parallel([linux, mac], "Bundle")


@step(timeout=30)  # embedded, a timeout runs the code on a thread of its own
def bundle(ctx: object) -> Wait:
    # A span of the step's own code: it must nest under the step's span.
    with trace.get_tracer("tests").start_as_current_span("upload bundle"):
        pass
    return Wait(HumanApproval(approvers=["ops"]), "Release")


@step(retries=1, backoff=0.1)  # the retry is sent by a coordinator's sweep
def release(ctx: object) -> str:
    if ctx.input.fail:  # type: ignore[attr-defined]
        raise RuntimeError("release refused")
    return END


traced = (Workflow("Traced", "Tracing across processes").input(In)
          .flow({START: "Build", "Build": build, "Bundle": bundle, "Release": release}))


def kid_work(ctx: object) -> str:
    return END


traced_kid = Workflow("TracedKid", "A child run in its parent's trace").flow({START: kid_work})


def call_kid(ctx: object) -> Call:
    return Call(traced_kid, {}, "Called")


traced_parent = (Workflow("TracedParent", "Calls TracedKid")
                 .flow({START: "CallKid", "CallKid": call_kid, "Called": kid_work}))
