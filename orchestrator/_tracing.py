"""OpenTelemetry traces: a run is one trace; each step and each parallel branch is a span.

Optional. Without opentelemetry-api installed nothing here imports it and no hook is added
(`middleware()` is empty, `carrier()` is None). With it installed but no TracerProvider
set, every hook returns after one isinstance check: the API's no-op tracer would still
parse the run's context and build a span per step for nothing.

How a run stays one trace although its steps are sent by many processes (the app, any
worker, a coordinator's sweep, an app that approves a gate): the context current where the
run starts is written into the run record (`RunRecord.trace_context`, what the global
propagator injects: W3C `traceparent`), and every step's span is a child of that context,
whoever sent the step. A span of the same trace current in the worker (Celery
instrumentation's task span, from the message's headers) is the parent instead, so such
spans nest. Exporters are the user's: spans go to the global TracerProvider; workers and
coordinators can install one themselves (`install_provider`, ORCHESTRATOR_OTEL_EXPORTER).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._definition import START as START_STEP
from ._middleware import Middleware
from ._records import RunError, RunRecord, Task

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import (
        NonRecordingSpan,
        NoOpTracerProvider,
        ProxyTracerProvider,
        SpanContext,
        Status,
        StatusCode,
        TraceFlags,
    )
    _NO_PROVIDER = (ProxyTracerProvider, NoOpTracerProvider)  # what is set while none is
except ImportError:  # the otel extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("orchestrator.tracing")

__all__ = ["AVAILABLE", "TracingMiddleware", "carrier", "install_provider", "middleware",
           "starting"]

AVAILABLE = trace is not None
EXPORTERS = ("otlp", "console")

# Attribute names, in the semantic conventions' dotted style under our own namespace.
RUN_ID = "orchestrator.run_id"
WORKFLOW = "orchestrator.workflow"
VERSION = "orchestrator.workflow.version"
STEP = "orchestrator.step"
BRANCH = "orchestrator.branch"
ATTEMPT = "orchestrator.attempt"
TOKEN = "orchestrator.token"

_INDEX = re.compile(r"\[\d+\]")
_tracers: tuple[Any, Tracer] | None = None  # (provider, its tracer): one lookup per provider


def _tracer() -> Tracer | None:
    """The tracer of the global provider, or None while no real provider is set (the cheap
    test every hook makes first). Checked on each call, so a provider set after the
    runtime was built (an app configuring OTel late) is still used."""
    global _tracers
    provider = trace.get_tracer_provider()
    if isinstance(provider, _NO_PROVIDER):
        return None
    cached = _tracers
    if cached is not None and cached[0] is provider:
        return cached[1]
    tracer = provider.get_tracer("orchestrator")
    _tracers = (provider, tracer)
    return tracer


def middleware() -> list[Middleware]:
    """The hooks a runtime adds for tracing: none without opentelemetry."""
    return [TracingMiddleware()] if AVAILABLE else []


def carrier() -> dict[str, str] | None:
    """The current trace context as the global propagator writes it (`traceparent`, ...),
    for the record of a run being started; None when there is none."""
    if not AVAILABLE:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


@contextlib.contextmanager
def within(stored: dict[str, str] | None) -> Iterator[None]:
    """Make a stored context (another run's `trace_context`) current: a child run started
    in it joins its parent's trace."""
    if not AVAILABLE or not stored:
        yield
        return
    token = otel_context.attach(propagate.extract(stored))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def starting(workflow: str, version: str, run_id: str) -> Iterator[None]:
    """A span around starting a run (`start <Workflow>`), the run's root: it is current
    while the record is written, so its context is the one stored. No provider: nothing,
    and the record keeps whatever context is current (none, or a remote parent's)."""
    tracer = _tracer() if AVAILABLE else None
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(f"start {workflow}", attributes={
            RUN_ID: run_id, WORKFLOW: workflow, VERSION: version}):
        yield


def run_parent(rec: RunRecord) -> Context:
    """The context a step span of `rec` is a child of.

    The run's stored context; but a current span of the same trace (Celery
    instrumentation's task span, from the message's headers) when there is one. A run
    stored without a context (started where no provider was set, or before tracing was
    installed) still gets one trace: a remote parent whose ids derive from the run id."""
    stored = propagate.extract(rec.trace_context) if rec.trace_context else None
    run_span = trace.get_current_span(stored).get_span_context() if stored else None
    if run_span is None or not run_span.is_valid:
        run_span = _derived(rec.run_id)
        stored = trace.set_span_in_context(NonRecordingSpan(run_span), stored)
    current = trace.get_current_span().get_span_context()
    if current.is_valid and current.trace_id == run_span.trace_id:
        return otel_context.get_current()
    assert stored is not None
    return stored


def _derived(run_id: str) -> SpanContext:
    digest = hashlib.sha256(run_id.encode()).digest()
    return SpanContext(trace_id=int.from_bytes(digest[:16]) or 1,
                       span_id=int.from_bytes(digest[16:24]) or 1,
                       is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def span_name(task: Task) -> str:
    """`step Build`, `branch Build[linux]`, `step START` (as Flower names its task). A
    Parallel.map item's index is left out (`Build[square]`), as span names should not grow
    with the data; the attribute has it."""
    step = "START" if task.step == START_STEP else task.step
    if task.branch is None:
        return f"step {step}"
    return f"branch {step}[{_INDEX.sub('', task.branch)}]"


class TracingMiddleware(Middleware):
    """Opens a span when a worker starts a step or branch and ends it when the code
    returns; the span is current while the step's code runs, so spans it makes (HTTP
    clients, databases) nest under it."""

    def __init__(self) -> None:
        # Per thread: embedded runs execute steps on many threads at once, and the hooks
        # of one step run on the thread that runs it.
        self._open = threading.local()

    def before_step(self, run: RunRecord, task: Task) -> None:
        self._close_leftover()
        tracer = _tracer()
        if tracer is None:
            return
        attributes: dict[str, Any] = {
            RUN_ID: run.run_id, WORKFLOW: run.workflow, VERSION: run.version,
            STEP: task.step, ATTEMPT: task.attempt, TOKEN: task.token}
        if task.branch is not None:
            attributes[BRANCH] = task.branch
        parent = run_parent(run)
        span = tracer.start_span(span_name(task), parent, attributes=attributes)
        # The previous context is put back in after_step (attach, not detach: a step whose
        # after_step never came must not leave a token that breaks the next detach).
        previous = otel_context.get_current()
        otel_context.attach(trace.set_span_in_context(span, parent))
        self._open.entry = (span, previous)

    def step_failed(self, run: RunRecord, task: Task, error: RunError) -> None:
        entry = getattr(self._open, "entry", None)
        if entry is None:
            return
        span: Span = entry[0]
        # What Span.record_exception writes; the exception itself is gone by now (the
        # executor turned it into data), its type, message and traceback are not.
        span.add_event("exception", {"exception.type": error.type,
                                     "exception.message": error.message,
                                     "exception.stacktrace": error.traceback or ""})
        span.set_status(Status(StatusCode.ERROR, f"{error.type}: {error.message}"))

    def after_step(self, run: RunRecord, task: Task, failed: bool, seconds: float) -> None:
        entry = getattr(self._open, "entry", None)
        if entry is None:
            return
        self._open.entry = None
        span, previous = entry
        otel_context.attach(previous)
        span.end()

    def _close_leftover(self) -> None:
        """A step whose after_step never came (its lease or logging raised): end its span
        and put its thread's context back, so the next step does not nest in it."""
        entry = getattr(self._open, "entry", None)
        if entry is not None:
            self._open.entry = None
            otel_context.attach(entry[1])
            entry[0].end()


# ---- a provider for workers and coordinators ---------------------------------------------


def install_provider(exporter: str) -> None:
    """Set the global TracerProvider of a worker or coordinator process, exporting with
    `exporter`: `otlp` (opentelemetry-exporter-otlp, HTTP if installed, else gRPC; the
    endpoint from OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or
    `console` (JSON to stdout). service.name is OTEL_SERVICE_NAME, else `orchestrator`;
    OTEL_RESOURCE_ATTRIBUTES adds to it. Raises ValueError for a setting it cannot honour."""
    if exporter not in EXPORTERS:
        raise ValueError(f"ORCHESTRATOR_OTEL_EXPORTER must be one of {', '.join(EXPORTERS)}, "
                         f"got {exporter!r}")
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ValueError("ORCHESTRATOR_OTEL_EXPORTER needs the otel extra: "
                         "pip install 'orchestrator[otel]'") from None
    span_exporter: Any = ConsoleSpanExporter() if exporter == "console" else _otlp_exporter()
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; where neither
    # names the service it says `unknown_service:python3`, which says nothing.
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "orchestrator"}))
    provider = TracerProvider(resource=resource)
    # Batching thread: restarted in each prefork pool child by the SDK (at fork).
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _flush_on_pool_exit(provider)


def _otlp_exporter() -> Any:
    # HTTP first: unlike gRPC's channels it survives the prefork pool's fork.
    for module in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                   "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"):
        try:
            return importlib.import_module(module).OTLPSpanExporter()
        except ImportError:
            continue
    raise ValueError("ORCHESTRATOR_OTEL_EXPORTER=otlp needs an OTLP exporter: "
                     "pip install opentelemetry-exporter-otlp")


def _flush_on_pool_exit(provider: Any) -> None:
    """A prefork pool child leaves with os._exit (no atexit): flush its batch first."""
    from celery import signals

    def flush(**kwargs: Any) -> None:
        provider.force_flush(5_000)

    signals.worker_process_shutdown.connect(flush, weak=False,
                                            dispatch_uid="orchestrator-otel-flush")
    signals.worker_shutdown.connect(flush, weak=False, dispatch_uid="orchestrator-otel-flush2")
