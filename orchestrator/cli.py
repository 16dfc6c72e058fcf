"""The `orchestrator` command line.

Exit codes, one table for every command (EXIT_CODES below, most specific first):
0 ok; 1 the run failed or was stopped; 2 bad usage or input; 3 not found; 4 not allowed
(not an approver); 5 Redis or the broker unreachable; 6 timed out; 7 the run waits at a
gate nobody here may decide.

One rule for `run`, `watch` and `status`: exit 1 when the run failed or was stopped, 0
otherwise (a run still going, parked at a gate or paused is not a failure).

Everything a user or a workflow wrote (ids, reasons, comments, errors, prompts) is printed
as text, never as Rich markup, with control characters made visible, so a comment cannot
restyle or clear the terminal.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, cast

import click
import kombu.exceptions
import redis
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import _graph
from ._celery import Sweeper, create_app
from ._cli_console import console_command
from ._cli_identity import groups_of, identity_commands
from ._cli_schedules import schedules_group
from ._client import Client
from ._committer import MAX_INPUT_DEPTH, nesting_depth
from ._config import COORDINATOR_QUEUE, Settings
from ._definition import DefinitionError, Workflow
from ._dev import dev
from ._dispatch.base import broker_queues
from ._engine import ControlError
from ._middleware import Middleware
from ._records import Gate, RunRecord, RunStatus
from ._runner import RunHandle, WorkflowRunner
from ._runtime import RunNotFound, UnknownWorkflow
from ._schedules import ScheduleNotFound
from ._stores import CorruptRecord, RunStore, StoreUnavailable

EXIT_RUN_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_FORBIDDEN = 1, 2, 3, 4
EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_WAITING = 5, 6, 7

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class RunEnded(Exception):
    """The run failed or was stopped (exit 1); what happened is already on stdout."""


class AtGate(Exception):
    """The run waits at a gate and nobody here may decide it (exit 7)."""


class BadInput(ValueError):
    """An option's value the command cannot use (exit 2)."""


ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]

# Most specific first: TimeoutError and PermissionError are OSErrors, and OSError further
# down means the network; pydantic's ValidationError and InvalidInput are ValueErrors.
EXIT_CODES: Sequence[tuple[ExceptionTypes, int]] = (
    ((RunEnded, CorruptRecord), EXIT_RUN_FAILED),
    (AtGate, EXIT_WAITING),
    (TimeoutError, EXIT_TIMEOUT),
    (PermissionError, EXIT_FORBIDDEN),
    ((RunNotFound, UnknownWorkflow, ScheduleNotFound), EXIT_NOT_FOUND),
    ((ValueError, ControlError), EXIT_USAGE),
    ((StoreUnavailable, ConnectionError, OSError, redis.RedisError,
      kombu.exceptions.OperationalError), EXIT_UNREACHABLE),
)


def exit_code(exc: BaseException) -> int | None:
    """The exit code EXIT_CODES gives `exc`; None for an error nobody expected (a bug)."""
    return next((code for kinds, code in EXIT_CODES if isinstance(exc, kinds)), None)


def _message(exc: BaseException, code: int) -> str:
    if code == EXIT_UNREACHABLE:
        return f"cannot reach Redis or the broker: {exc}"
    if code == EXIT_TIMEOUT:
        return f"timed out: {exc}"
    if isinstance(exc, ValidationError):
        return f"invalid input: {_one_line(exc)}"
    if isinstance(exc, CorruptRecord):  # the run cannot go on; its data stays readable
        return f"{exc}; `orchestrator status {exc.run_id} --raw` shows what is stored"
    if isinstance(exc, LookupError) and exc.args:  # str() of a KeyError adds quotes
        return str(exc.args[0])
    return str(exc)


def _fail(message: str, code: int, *, at_once: bool = False) -> NoReturn:
    if message:
        err.print(f"[red]error:[/red] {_t(message)}")
    if at_once:
        # An embedded run's pool threads are not daemons: a normal exit would wait for
        # the step in flight (and print its "cannot schedule new futures" on the way).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _call(fn: Callable[..., Any], args: Any, kwargs: Any, *, at_once: bool = False) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        _fail("" if isinstance(exc, RunEnded) else _message(exc, code), code, at_once=at_once)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known errors become one clear line and the exit code EXIT_CODES gives them."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _call(fn, args, kwargs)

    return wrapper


def _one_line(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}"
                     for e in exc.errors())


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _t(value: Any) -> str:
    """User text, safe to put in markup: control characters shown as escapes
    (\\x1b, \\r, \\n), and square brackets escaped so they print as themselves."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))
    return escape(text)


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _end(status: RunStatus) -> None:
    """The one rule for run, watch and status."""
    if status in (RunStatus.FAILED, RunStatus.STOPPED):
        raise RunEnded


def _table(columns: Sequence[str], rows: list[list[str]], whole: Sequence[str] = ()) -> Table:
    """A table that never cuts a value: the `whole` columns (ids, to copy) keep one line,
    the others fold; every cell is user text."""
    table = Table()
    for i, name in enumerate(columns):
        width = max((len(r[i]) for r in rows), default=0) if name in whole else None
        table.add_column(name, min_width=width, no_wrap=name in whole, overflow="fold")
    for row in rows:
        table.add_row(*map(_t, row))
    return table


@click.group()
@click.option("--redis-url", envvar="ORCHESTRATOR_REDIS_URL",
              help="State store (and default broker).  [env: ORCHESTRATOR_REDIS_URL]")
@click.option("--broker-url", envvar="ORCHESTRATOR_BROKER_URL",
              help="Celery broker, if not Redis.  [env: ORCHESTRATOR_BROKER_URL]")
@click.option("--workflows", envvar="ORCHESTRATOR_WORKFLOWS",
              help="Comma-separated modules that define workflows.  [env: ORCHESTRATOR_WORKFLOWS]")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, broker_url: str | None,
        workflows: str | None) -> None:
    """Durable workflows on Celery and Redis."""
    # As `celery -A` does: `orchestrator run mymodule:flow` finds mymodule.py in the
    # current directory, also when started through the console script.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    overrides: dict[str, Any] = {"redis_url": redis_url, "broker_url": broker_url}
    if workflows:
        overrides["workflows"] = tuple(w.strip() for w in workflows.split(",") if w.strip())
    try:
        ctx.obj = Settings.from_env(**overrides)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)


def main() -> None:
    cli(prog_name="orchestrator")


def _client(settings: Settings) -> Client:
    return Client(settings=settings)


# ---- run ----------------------------------------------------------------------------


def load_workflow(target: str) -> Workflow:
    """`package.module:attribute` -> the Workflow it names."""
    module_name, _, attr = target.partition(":")
    if not attr:
        raise DefinitionError(f"expected module:attribute, got {target!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DefinitionError(f"cannot load {target!r}: {exc}") from None
    if not isinstance(obj, Workflow):
        raise DefinitionError(f"{target!r} is a {type(obj).__name__}, not a Workflow")
    return obj


def parse_input(text: str) -> dict[str, Any]:
    """--input's JSON object, or BadInput naming --input. Input nested deeper than the
    Client accepts is refused here too (embedded runs included): the JSON parser, pydantic
    and the store all recurse, and their RecursionError would read as a crash."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"--input is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadInput(f"--input nests deeper than {MAX_INPUT_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise BadInput("--input must be a JSON object")
    if nesting_depth(data) > MAX_INPUT_DEPTH:
        raise BadInput(f"--input nests deeper than {MAX_INPUT_DEPTH} levels")
    return data


@cli.command()
@click.argument("target")
@click.option("--input", "input_json", default="{}", help="The run's input as JSON.")
@click.option("--run-id", default=None, help="Start with this id (starting it twice is one run).")
@click.option("--remote", is_flag=True,
              help="Enqueue on the cluster (TARGET may then be a catalog name).")
@click.option("--queue-anyway", is_flag=True,
              help="With --remote: enqueue even if no live worker hosts the workflow (it "
                   "waits in its queue for one).")
@click.option("--wait/--no-wait", default=True, help="Wait for the run to end.")
@click.option("--approve-as", default=None, help="Approve any gate as this user (for scripts).")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many s.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def run(settings: Settings, target: str, input_json: str, run_id: str | None, remote: bool,
        queue_anyway: bool, wait: bool, approve_as: str | None, timeout: float | None,
        as_json: bool) -> None:
    """Run a workflow. Embedded by default: TARGET is module:attribute, run in this process
    with no server. With --remote: enqueue on the cluster."""
    # An embedded run lives in this process's memory: whatever ends the command ends the
    # run, so it leaves at once rather than waiting for the step in flight.
    _call(_run, (settings, target, input_json, run_id, remote, queue_anyway, wait, approve_as,
                 timeout, as_json), {}, at_once=not remote)


def _run(settings: Settings, target: str, input_json: str, run_id: str | None, remote: bool,
         queue_anyway: bool, wait: bool, approve_as: str | None, timeout: float | None,
         as_json: bool) -> None:
    data = parse_input(input_json)
    if queue_anyway and not remote:
        raise BadInput("--queue-anyway goes with --remote")
    if remote and ":" not in target:
        handle = _client(settings).start(target, data, run_id=run_id,
                                         queue_anyway=queue_anyway)
        name = target
    else:
        wf = load_workflow(target)
        app = create_app(settings, [wf], import_modules=False) if remote else None
        handle = WorkflowRunner(wf, app=app).run(data, run_id=run_id)
        name = wf.name
    if not wait:
        _emit({"run_id": handle.run_id}) if as_json else out.print(_t(handle.run_id))
        return
    if not as_json:
        out.print(f"[bold]{_t(name)}[/bold] run [cyan]{_t(handle.run_id)}[/cyan]")
    _drive(handle, approve_as, timeout, quiet=as_json, interactive=not remote)
    result = handle.result(timeout=0.001 if timeout else None)
    if as_json:
        _emit(result.model_dump(mode="json"))
    else:
        _print_result(result.model_dump(mode="json"))
    _end(result.status)


def _drive(handle: RunHandle, approve_as: str | None, timeout: float | None, quiet: bool,
           interactive: bool) -> None:
    """Print progress until the run ends, deciding gates as asked."""
    deadline = None if timeout is None else time.monotonic() + timeout
    # A gate is asked about again once it has more approvals (min_approvals > 1).
    decided: set[tuple[int, int]] = set()
    for entry, rec in _progress(handle):
        if entry is not None and not quiet:
            out.print(_describe(entry))
        gate = rec.gate if rec is not None else None
        if gate is not None and (gate.token, len(gate.approvals)) not in decided:
            decided.add((gate.token, len(gate.approvals)))
            if approve_as is not None:
                handle.approve(by=approve_as, comment="approved from the command line",
                               source="cli")
            elif interactive and sys.stdin.isatty():
                ask(handle, gate)
            elif interactive:
                raise AtGate(f"run {handle.run_id} waits at {gate.step!r} for "
                             f"{gate.approvers}; pass --approve-as USER")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {handle.run_id} did not finish within {timeout}s")


def _progress(handle: RunHandle) -> Iterator[tuple[dict[str, Any] | None, RunRecord | None]]:
    """History entries as they land, and the record whenever nothing new arrived.

    Followed by sequence number (`n`), not by counting: the store drops the middle of a
    long history, and its `history_trimmed` marker (no `n`) stands for many entries."""
    start, wait = 0, 0.02
    while True:
        entries = handle.history(start)
        start = _after(entries, start)
        for entry in entries:
            yield entry, None
        if any("n" in e for e in entries):
            wait = 0.02
            continue
        rec = handle.record()
        if rec.status.is_terminal:
            for entry in handle.history(start):
                yield entry, None
            return
        yield None, rec
        time.sleep(wait)
        wait = min(wait * 1.5, 0.5)


def _after(entries: list[dict[str, Any]], start: int) -> int:
    """Where to continue: past the last numbered entry."""
    return max((e["n"] + 1 for e in entries if "n" in e), default=start)


def ask(handle: RunHandle, gate: Gate,
        prompt: Callable[..., Any] = click.prompt) -> None:
    """Decide a gate on the terminal. A name that may not decide it is asked again: the
    run lives in this process, and refusing would end it."""
    out.print(f"[yellow]? {_t(gate.step)} waits for approval[/yellow] "
              f"(approvers: {_t(', '.join(gate.approvers))})")
    if gate.prompt:
        out.print(f"  {_t(gate.prompt)}")
    if gate.payload:
        out.print_json(json.dumps(gate.payload))
    choice = prompt("  approve or reject", type=click.Choice(["approve", "reject"]))
    while (who := prompt("  as", default=gate.approvers[0])) not in gate.approvers:
        out.print(f"  [red]{_t(who)} is not an approver[/red] of {_t(gate.step)}; "
                  f"approvers: {_t(', '.join(gate.approvers))}")
    note = prompt("  comment", default="", show_default=False) or None
    if choice == "approve":
        handle.approve(by=who, comment=note, source="cli")
    else:
        handle.reject(by=who, reason=note, source="cli")


def _describe(entry: dict[str, Any]) -> str:
    event = entry.get("event", "?")
    step = entry.get("step")
    step = "START" if step == "__start__" else step
    extras = {k: v for k, v in entry.items() if k not in ("at", "event", "step", "n")}
    detail = " ".join(f"{k}={v}" for k, v in extras.items())
    mark = {"step_completed": "[green]✓[/green]", "failed": "[red]✗[/red]",
            "completed": "[green]●[/green]", "gate_opened": "[yellow]?[/yellow]",
            "step_retrying": "[yellow]↻[/yellow]"}.get(event, "•")
    return f"  {mark} {_t(event)}" + (f" [bold]{_t(step)}[/bold]" if step else "") + (
        f" [dim]{_t(detail)}[/dim]" if detail else "")


def _print_result(result: dict[str, Any]) -> None:
    colour = {"completed": "green", "failed": "red"}.get(result["status"], "yellow")
    out.print(f"[{colour}]{_t(result['status'])}[/{colour}]")
    if result.get("error"):
        e = result["error"]
        out.print(f"[red]{_t(e['step'])}: {_t(e['type'])}: {_t(e['message'])}[/red]")
    out.print_json(json.dumps({"state": result["state"], "output": result["output"]}))


# ---- processes ------------------------------------------------------------------------


def _hosting_app(settings: Settings, middleware: Sequence[Middleware] = ()) -> Any:
    """The app with every workflow module imported; a module that will not import is bad
    configuration, said in one line (not Celery's traceback)."""
    try:
        return create_app(settings, middleware=middleware)
    except ImportError as exc:
        raise BadInput(f"cannot import the workflow modules {','.join(settings.workflows)!r} "
                       f"(ORCHESTRATOR_WORKFLOWS or --workflows; is the folder that holds "
                       f"them on PYTHONPATH?): {exc}") from None


def _metrics_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--metrics-address", default="127.0.0.1", show_default=True,
                      help="Interface the metrics server listens on (0.0.0.0: every one).")(fn)
    return click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                        help="Serve Prometheus metrics on http://ADDRESS:PORT/metrics "
                             "(0 or absent: no server).")(fn)


def _serving_app(settings: Settings, metrics_port: int | None, metrics_address: str,
                 cluster: bool) -> Any:
    """The hosting app, counting for Prometheus and serving /metrics when a port is given;
    a coordinator (`cluster`) also serves the cluster's numbers read from Redis. With
    ORCHESTRATOR_OTEL_EXPORTER it exports traces too (before the pool forks)."""
    if settings.otel_exporter:
        from ._tracing import install_provider

        try:
            install_provider(settings.otel_exporter)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    if not metrics_port:
        return _hosting_app(settings)
    from . import _metrics_http

    samples = _metrics_http.prepare()  # before prometheus_client is imported and the pool forks
    from ._metrics import MetricsMiddleware
    from ._metrics_cluster import ClusterCollector

    app = _hosting_app(settings, [MetricsMiddleware()])
    try:
        _metrics_http.serve(metrics_port, metrics_address,
                            [ClusterCollector(app.runtime)] if cluster else [])
    except OSError as exc:  # not the network error _guard would say it is
        raise BadInput(f"cannot serve metrics on {metrics_address}:{metrics_port}: "
                       f"{exc}") from None
    click.echo(f"metrics on http://{metrics_address}:{metrics_port}/metrics "
               f"(process samples in {samples})", err=True)
    return app


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-Q", "--queues", default=None, help="Queues to consume (default: every step queue).")
@click.option("-c", "--concurrency", type=int, default=None, help="Pool processes (default: CPUs).")
@click.option("-P", "--pool", default="prefork")
@click.option("-l", "--loglevel", default="INFO")
@click.option("-n", "--hostname", default="worker@%h")
@_metrics_options
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
@_guard
def worker(settings: Settings, queues: str | None, concurrency: int | None, pool: str,
           loglevel: str, hostname: str, metrics_port: int | None, metrics_address: str,
           celery_args: tuple[str, ...]) -> None:
    """Run a worker: executes the steps of the hosted workflows (a `celery worker`)."""
    app = _serving_app(settings, metrics_port, metrics_address, cluster=False)
    runtime = app.runtime
    base = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    # Each hosted version's own queues: a worker never takes a step of a version it lacks.
    consume = sorted(q for wf in runtime.workflows.values() for q in broker_queues(wf, base))
    if not consume:
        raise BadInput("no workflow to host: set ORCHESTRATOR_WORKFLOWS (or --workflows)")
    argv = ["worker", "-Q", ",".join(consume), "-P", pool, "-l", loglevel, "-n", hostname]
    if concurrency:
        argv += ["-c", str(concurrency)]
    _celery_worker(app, [*argv, *celery_args])


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-c", "--concurrency", type=int, default=4)
@click.option("-l", "--loglevel", default="INFO")
@click.option("-n", "--hostname", default="coordinator@%h")
@_metrics_options
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
@_guard
def coordinator(settings: Settings, concurrency: int, loglevel: str, hostname: str,
                metrics_port: int | None, metrics_address: str,
                celery_args: tuple[str, ...]) -> None:
    """Run a coordinator: fires timers, recovers lost work (lost steps, lost joins)."""
    app = _serving_app(settings, metrics_port, metrics_address, cluster=True)
    app.steps["worker"].add(Sweeper)
    _celery_worker(app, ["worker", "-Q", COORDINATOR_QUEUE, "-P", "threads", "-c",
                         str(concurrency), "-l", loglevel, "-n", hostname, *celery_args])


def _celery_worker(app: Any, argv: list[str]) -> None:
    """`celery worker`, exiting with its code: a worker that could not start (a version
    label another host serves with other code) must not look like a clean stop."""
    app.start(argv=argv)
    refused = getattr(app, "refused", None)
    if refused is not None:
        _fail(str(refused), EXIT_USAGE)


def flower_argv(port: int, address: str, flower_args: Sequence[str]) -> list[str]:
    return ["flower", f"--port={port}", f"--address={address}", *flower_args]


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", type=int, default=5555)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Interface to listen on; Flower can stop runs' tasks, so only this host "
                   "by default (0.0.0.0 for every interface, e.g. in a container).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def flower(settings: Settings, port: int, address: str, flower_args: tuple[str, ...]) -> None:
    """Run Flower against the same broker, to watch workers and step tasks."""
    app = create_app(settings, import_modules=False)
    app.start(flower_argv(port, address, flower_args))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def recover(settings: Settings, as_json: bool) -> None:
    """One recovery sweep: fire due timers, re-dispatch lost steps, re-drive lost joins."""
    runtime = _hosting_app(settings).runtime
    changed = runtime.sweep_all()
    if as_json:
        _emit({"recovered": changed})
    else:
        out.print(f"recovered {changed} run(s)")


# ---- reading ------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def workflows(settings: Settings, as_json: bool) -> None:
    """The catalog: workflows, each version the workers serve (new runs start on the
    newest), and the runs in flight on each version."""
    client = _client(settings)
    entries = client.workflows()
    in_flight = {e.name: client.in_flight(e.name) for e in entries}
    if as_json:
        _emit([{**e.model_dump(mode="json"), "in_flight": in_flight[e.name]} for e in entries])
        return
    rows = []
    for e in entries:
        versions = sorted({*e.versions, *in_flight[e.name], e.version},
                          key=lambda v: (v != e.version, v))
        for v in versions:
            rows.append([e.name, v + (" (new runs)" if v == e.version else ""),
                         str(in_flight[e.name].get(v, 0)), ", ".join(e.versions.get(v, [])),
                         ", ".join(sorted(set(e.queues.values()))), e.description])
    out.print(_table(["workflow", "version", "in flight", "hosts", "queues", "description"],
                     rows, whole=["workflow"]))


@cli.group(invoke_without_command=True)
@click.option("--status", "status_filter", type=click.Choice([s.value for s in RunStatus]))
@click.option("--workflow", default=None)
@click.option("--limit", type=int, default=50)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def runs(ctx: click.Context, status_filter: str | None, workflow: str | None, limit: int,
         as_json: bool) -> None:
    """List runs, newest first; `runs upgrade` moves runs to another version."""
    if ctx.invoked_subcommand is None:
        _call(_list_runs, (ctx.obj, status_filter, workflow, limit, as_json), {})


@runs.command("upgrade")
@click.option("--workflow", required=True)
@click.option("--from", "from_version", required=True, help="The version (or its start).")
@click.option("--to", "to_version", default=None,
              help="The version this process hosts (checked; default: whatever it hosts).")
@click.option("--map", "maps", multiple=True, metavar="OLD=NEW", help="Rename a step.")
@click.option("--dry-run", is_flag=True, help="Say what would move; change nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def upgrade(settings: Settings, workflow: str, from_version: str, to_version: str | None,
            maps: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Move runs in flight of WORKFLOW from version --from to the version of the code in
    ORCHESTRATOR_WORKFLOWS: waiting, paused or between steps; the others stay as they are
    (exit 2, each with its reason)."""
    runtime = _hosting_app(settings).runtime
    wf = runtime.workflow(workflow)
    if to_version is not None and not wf.version_id.startswith(to_version):
        raise BadInput(f"this code is {workflow}@{wf.version_id}, not {to_version}")
    steps = {}
    for m in maps:
        old, sep, new = m.partition("=")
        if not sep or not old or not new:
            raise BadInput(f"--map takes OLD=NEW, got {m!r}")
        steps[old] = new
    report = runtime.upgrade(workflow, from_version, steps, dry_run)
    if as_json:
        _emit([{"run_id": m.run_id, "from": m.version, "to": wf.version_id,
                "moved": m.ok and not dry_run, "refused": m.refused} for m in report])
    else:
        verb = "would move" if dry_run else "moved"
        for m in report:
            out.print(f"{_t(m.run_id)}: " + (f"{verb} {_t(m.version)} -> {_t(wf.version_id)}"
                      if m.ok else f"left on {_t(m.version)}: {_t(m.refused)}"))
        out.print(f"{sum(m.ok for m in report)} of {len(report)} run(s) {verb}")
    if any(not m.ok for m in report):
        _fail("", EXIT_USAGE)


def _list_runs(settings: Settings, status_filter: str | None, workflow: str | None,
               limit: int, as_json: bool) -> None:
    client = _client(settings)
    records = client.runs(RunStatus(status_filter) if status_filter else None, workflow, limit)
    # Quarantined runs have no readable record, so no status: listed unless one is asked for.
    corrupt = [] if status_filter else sorted(
        run_id for store in _stores(client) for run_id in store.corrupt_runs())
    if as_json:
        gaps = client.unhosted(records)
        _emit([_summary(r, gaps.get(r.run_id)) for r in records]
              + [{"run_id": run_id, "status": "corrupt"} for run_id in corrupt])
        return
    gaps = client.unhosted(records)
    rows = [[r.run_id, r.workflow, r.status.value + (f" ({gaps[r.run_id]})"
                                                     if r.run_id in gaps else ""),
             _step_name(r.current_step),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))]
            for r in records] + [[run_id, "?", "corrupt", "", ""] for run_id in corrupt]
    out.print(_table(["run", "workflow", "status", "step", "created"], rows, whole=["run"]))


def _stores(client: Client) -> list[RunStore]:
    """The store of every workflow in the catalog (runs of one prefix share one)."""
    return [client.runtime.store_for(prefix)
            for prefix in sorted({e.key_prefix for e in client.workflows()})]


def _summary(r: RunRecord, unhosted: str | None = None) -> dict[str, Any]:
    return {"run_id": r.run_id, "workflow": r.workflow, "version": r.version,
            "status": r.status.value, "current_step": r.current_step,
            "waiting_for": r.waiting_for() + ([unhosted] if unhosted else []),
            "created_at": r.created_at, "updated_at": r.updated_at}


def _step_name(step: str | None) -> str:
    return "START" if step == "__start__" else (step or "")


def _shown_status(client: Client, rec: RunRecord) -> str:
    """`queued` for a running run whose step was sent but no worker holds yet (display
    only: to the engine the run is running)."""
    task = rec.task
    gap = client.unhosted([rec]).get(rec.run_id)
    if rec.status is not RunStatus.RUNNING or task is None or task.dispatched_at is None:
        return rec.status.value + (f" ({gap})" if gap else "")
    store = client.runtime.store_for(client.workflow(rec.workflow).key_prefix)
    shown = "running" if store.live_leases(rec.run_id, [task.lease_id]) else "queued"
    return shown + (f" ({gap})" if gap else "")


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
@click.option("--raw", is_flag=True,
              help="The run's stored fields as they are (JSON), also when they are corrupt.")
@click.pass_obj
@_guard
def status(settings: Settings, run_id: str, as_json: bool, raw: bool) -> None:
    """A run's status, current step, state, results and history. Exits 1 if the run
    failed or was stopped (or its record is corrupt)."""
    client = _client(settings)
    if raw:
        _emit(_raw(client, run_id))
        return
    handle = client.attach(run_id)
    rec, history = handle.record(), handle.history()
    if as_json:
        _emit({**rec.model_dump(mode="json"), "history": history})
    else:
        out.print(f"[bold]{_t(rec.workflow)}[/bold] {_t(rec.run_id)}: "
                  f"[bold]{_shown_status(client, rec)}[/bold]"
                  + (f" at {_t(_step_name(rec.current_step))}" if rec.current_step else ""))
        if rec.error:
            out.print(f"[red]{_t(rec.error)}[/red]")
        if rec.waiting_for():
            out.print(f"waiting for {_t(' or '.join(rec.waiting_for()))}")
        if rec.mailbox:
            out.print(f"mailbox: {_t(', '.join(m.name for m in rec.mailbox))}")
        out.print_json(json.dumps({"state": rec.state, "step_results": rec.step_results}))
        for entry in history:
            out.print(_describe(entry))
    _end(rec.status)


def _raw(client: Client, run_id: str) -> dict[str, Any]:
    try:
        full = client.attach(run_id).run_id  # a unique prefix will do
    except CorruptRecord as exc:  # an exact id whose record does not parse
        full = exc.run_id
    fields = next((f for store in _stores(client) if (f := store.raw(full)) is not None), None)
    if fields is None:
        raise RunNotFound(f"no run {run_id!r}")
    return {"run_id": full, "fields": fields}


@cli.command()
@click.argument("run_id")
@click.option("--timeout", type=float, default=None)
@click.option("--json", "as_json", is_flag=True,
              help="No live display; print the final record (as `status --json`).")
@click.pass_obj
@_guard
def watch(settings: Settings, run_id: str, timeout: float | None, as_json: bool) -> None:
    """Follow a run live until it ends. Exits 1 if it failed or was stopped."""
    from rich.live import Live

    handle = _client(settings).attach(run_id)
    deadline = None if timeout is None else time.monotonic() + timeout

    def check_deadline() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {handle.run_id} did not finish within {timeout}s")

    if as_json:
        for _ in _progress(handle):
            check_deadline()
        final = handle.record()
        _emit({**final.model_dump(mode="json"), "history": handle.history()})
        _end(final.status)
        return
    steps_done = 0
    with Live(console=out, refresh_per_second=8, transient=True) as live:
        for entry, rec in _progress(handle):
            if entry is not None:
                live.console.print(_describe(entry))
                steps_done += entry.get("event") in ("step_completed", "branch_completed")
            current = rec or handle.record()
            live.update(f"[bold]{current.status.value}[/bold] at "
                        f"{_t(_step_name(current.current_step))} · {steps_done} step(s) done")
            check_deadline()
    final = handle.record()
    out.print(f"{_t(final.run_id)}: [bold]{final.status.value}[/bold]")
    _end(final.status)


@cli.command()
@click.option("--approver", default=None,
              help="Only gates this user may decide (by name, or by a group of theirs).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def gates(settings: Settings, approver: str | None, as_json: bool) -> None:
    """Pending approvals."""
    groups = groups_of(settings, approver) if approver else ()
    records = _client(settings).gates(approver, groups)
    rows: list[dict[str, Any]] = [{"run_id": r.run_id, "workflow": r.workflow, "step": r.gate.step,
             "approvers": r.gate.approvers, "min_approvals": r.gate.min_approvals,
             "approvals": [a.by for a in r.gate.approvals], "prompt": r.gate.prompt,
             "payload": r.gate.payload, "opened_at": r.gate.opened_at,
             "timeout_at": r.gate.timeout_at} for r in records if r.gate is not None]
    if as_json:
        _emit(rows)
        return
    cells = [[row["run_id"], row["workflow"], row["step"], ", ".join(row["approvers"]),
              f"{len(row['approvals'])}/{row['min_approvals']}", row["prompt"] or ""]
             for row in rows]
    out.print(_table(["run", "workflow", "step", "approvers", "approvals", "prompt"], cells,
                     whole=["run"]))


@cli.command()
@click.argument("target")
@click.option("--mermaid", is_flag=True, help="Mermaid flowchart instead of text.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def graph(settings: Settings, target: str, mermaid: bool, as_json: bool) -> None:
    """The step graph of a workflow (module:attribute, or a name from the catalog), with
    its forks (`=fork=>`) and gates (`?gate?`), read from the code."""
    if ":" in target:
        shape = _graph.shape(load_workflow(target))
    else:
        entry = _client(settings).workflow(target)
        shape = (cast(dict[str, _graph.Node], entry.shape) if entry.shape
                 else _graph.from_edges(entry.graph))
    if as_json:
        _emit(shape)
    elif mermaid:
        click.echo(_graph.render_mermaid(shape))
    else:
        click.echo(_graph.render_text(shape))


# ---- control ------------------------------------------------------------------------


def _control(verb: str, doc: str) -> None:
    @cli.command(name=verb, help=doc)
    @click.argument("run_id")
    @click.option("--as", "by", default=None, help="Who asks (recorded in the history).")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @_guard
    def command(settings: Settings, run_id: str, by: str | None, as_json: bool) -> None:
        handle = _client(settings).attach(run_id)
        getattr(handle, verb)(by=by, source="cli")
        _report(handle, as_json)


_control("pause", "Pause a run: the step in flight finishes, nothing new starts.")
_control("resume", "Resume a paused run.")
_control("stop", "Stop a run: revoke what is in flight, start nothing more.")


def _decision(verb: str, note: str, doc: str) -> None:
    @cli.command(name=verb, help=doc)
    @click.argument("run_id")
    @click.option("--as", "by", required=True, help=f"Who {verb}s (must be a listed approver).")
    @click.option(f"--{note}", "text", default=None)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @_guard
    def command(settings: Settings, run_id: str, by: str, text: str | None,
                as_json: bool) -> None:
        handle = _client(settings).attach(run_id)
        getattr(handle, verb)(by, text, groups=groups_of(settings, by), source="cli")
        _report(handle, as_json)


_decision("approve", "comment", "Approve the gate a run waits at.")
_decision("reject", "reason", "Reject the gate a run waits at.")


@cli.command()
@click.argument("run_id")
@click.argument("name")
@click.option("--data", "data", default="null", help="The payload, as JSON.")
@click.option("--key", default=None, help="Dedupe key: the same key is stored once.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def send(settings: Settings, run_id: str, name: str, data: str, key: str | None,
         as_json: bool) -> None:
    """Send event NAME to a run: taken by its wait, or kept until it waits for NAME."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise BadInput(f"--data is not JSON: {exc}") from None
    client = _client(settings)
    handle = client.attach(run_id)
    outcome = handle.send(name, payload, key=key)
    if as_json:
        _emit({**_summary(handle.record()), "event": name, "outcome": outcome})
    else:
        out.print(f"{_t(handle.run_id)}: event {_t(name)} {outcome}")


def _report(handle: RunHandle, as_json: bool) -> None:
    rec = handle.record()
    if as_json:
        _emit(_summary(rec))
    else:
        out.print(f"{_t(rec.run_id)}: {rec.status.value}")


cli.add_command(dev)
cli.add_command(console_command(_guard, BadInput))
cli.add_command(schedules_group(_guard, _t, parse_input))
for _command in identity_commands(_guard, _t):
    cli.add_command(_command)

if __name__ == "__main__":
    main()
