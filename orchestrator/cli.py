"""The `orchestrator` command line.

Exit codes: 0 ok; 1 the run failed or was stopped; 2 bad usage or input; 3 not found;
4 not allowed (not an approver); 5 Redis or the broker unreachable; 6 timed out;
7 the run waits at a gate nobody here may decide.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click
import kombu.exceptions
import redis
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from . import _graph
from ._celery import Sweeper, create_app
from ._client import Client
from ._config import COORDINATOR_QUEUE, DEFAULT_QUEUE, Settings
from ._definition import DefinitionError, Workflow
from ._dev import dev
from ._engine import ControlError
from ._records import RunRecord, RunStatus
from ._runner import RunHandle, WorkflowRunner
from ._runtime import RunNotFound, UnknownWorkflow
from ._steward import publish
from ._stores import StoreUnavailable
from ._stores.redis import connect

EXIT_RUN_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_FORBIDDEN = 1, 2, 3, 4
EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_WAITING = 5, 6, 7

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    sys.exit(code)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known errors become one clear line and a meaningful exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            _fail(f"invalid input: {_one_line(exc)}", EXIT_USAGE)
        except ValueError as exc:  # bad definitions, input, JSON, sizes: all the caller's
            _fail(str(exc), EXIT_USAGE)
        except (RunNotFound, UnknownWorkflow) as exc:
            _fail(str(exc.args[0] if exc.args else exc), EXIT_NOT_FOUND)
        except PermissionError as exc:
            _fail(str(exc), EXIT_FORBIDDEN)
        except ControlError as exc:
            _fail(str(exc), EXIT_USAGE)
        except (StoreUnavailable, ConnectionError, OSError, redis.RedisError,
                kombu.exceptions.OperationalError) as exc:
            _fail(f"cannot reach Redis or the broker: {exc}", EXIT_UNREACHABLE)
        except TimeoutError as exc:
            _fail(str(exc), EXIT_TIMEOUT)

    return wrapper


def _one_line(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}"
                     for e in exc.errors())


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


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


@cli.command()
@click.argument("target")
@click.option("--input", "input_json", default="{}", help="The run's input as JSON.")
@click.option("--run-id", default=None, help="Start with this id (starting it twice is one run).")
@click.option("--remote", is_flag=True,
              help="Enqueue on the cluster (TARGET may then be a catalog name).")
@click.option("--wait/--no-wait", default=True, help="Wait for the run to end.")
@click.option("--approve-as", default=None, help="Approve any gate as this user (for scripts).")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many s.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
@_guard
def run(settings: Settings, target: str, input_json: str, run_id: str | None, remote: bool,
        wait: bool, approve_as: str | None, timeout: float | None, as_json: bool) -> None:
    """Run a workflow. Embedded by default: TARGET is module:attribute, run in this process
    with no server. With --remote: enqueue on the cluster."""
    data = json.loads(input_json)
    if not isinstance(data, dict):
        raise DefinitionError("--input must be a JSON object")
    if remote and ":" not in target:
        handle = _client(settings).start(target, data, run_id=run_id)
        name = target
    else:
        wf = load_workflow(target)
        app = create_app(settings, [wf], import_modules=False) if remote else None
        handle = WorkflowRunner(wf, app=app).run(data, run_id=run_id)
        name = wf.name
    if not wait:
        _emit({"run_id": handle.run_id}) if as_json else out.print(handle.run_id)
        return
    if not as_json:
        out.print(f"[bold]{name}[/bold] run [cyan]{handle.run_id}[/cyan]")
    _drive(handle, approve_as, timeout, quiet=as_json, interactive=not remote)
    result = handle.result(timeout=0.001 if timeout else None)
    if as_json:
        _emit(result.model_dump(mode="json"))
    else:
        _print_result(result.model_dump(mode="json"))
    if result.status is not RunStatus.COMPLETED:
        sys.exit(EXIT_RUN_FAILED)


def _drive(handle: RunHandle, approve_as: str | None, timeout: float | None, quiet: bool,
           interactive: bool) -> None:
    """Print progress until the run ends, deciding gates as asked."""
    deadline = None if timeout is None else time.monotonic() + timeout
    decided: set[int] = set()
    for entry, rec in _progress(handle):
        if entry is not None and not quiet:
            out.print(_describe(entry))
        if rec is not None and rec.gate is not None and rec.gate.token not in decided:
            decided.add(rec.gate.token)
            if approve_as is not None:
                handle.approve(by=approve_as, comment="approved from the command line")
            elif interactive and sys.stdin.isatty():
                _ask(handle, rec)
            elif interactive:
                _fail(f"run {handle.run_id} waits at {rec.gate.step!r} for "
                      f"{rec.gate.approvers}; pass --approve-as USER", EXIT_WAITING)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {handle.run_id} did not finish within {timeout}s")


def _progress(handle: RunHandle) -> Iterator[tuple[dict[str, Any] | None, RunRecord | None]]:
    """History entries as they land, and the record whenever nothing new arrived."""
    seen, wait = 0, 0.02
    while True:
        entries = handle.history(seen)
        seen += len(entries)
        for entry in entries:
            yield entry, None
        if entries:
            wait = 0.02
            continue
        rec = handle.record()
        if rec.status.is_terminal:
            for entry in handle.history(seen):
                yield entry, None
            return
        yield None, rec
        time.sleep(wait)
        wait = min(wait * 1.5, 0.5)


def _ask(handle: RunHandle, rec: RunRecord) -> None:
    gate = rec.gate
    assert gate is not None
    out.print(f"[yellow]? {gate.step} waits for approval[/yellow] "
              f"(approvers: {', '.join(gate.approvers)})")
    if gate.prompt:
        out.print(f"  {gate.prompt}")
    if gate.payload:
        out.print_json(json.dumps(gate.payload))
    choice = click.prompt("  approve or reject", type=click.Choice(["approve", "reject"]))
    who = click.prompt("  as", default=gate.approvers[0])
    note = click.prompt("  comment", default="", show_default=False) or None
    if choice == "approve":
        handle.approve(by=who, comment=note)
    else:
        handle.reject(by=who, reason=note)


def _describe(entry: dict[str, Any]) -> str:
    event = entry.get("event", "?")
    step = entry.get("step")
    step = "START" if step == "__start__" else step
    extras = {k: v for k, v in entry.items() if k not in ("at", "event", "step")}
    detail = " ".join(f"{k}={v}" for k, v in extras.items())
    mark = {"step_completed": "[green]✓[/green]", "failed": "[red]✗[/red]",
            "completed": "[green]●[/green]", "gate_opened": "[yellow]?[/yellow]",
            "step_retrying": "[yellow]↻[/yellow]"}.get(event, "•")
    return f"  {mark} {event}" + (f" [bold]{step}[/bold]" if step else "") + (
        f" [dim]{detail}[/dim]" if detail else "")


def _print_result(result: dict[str, Any]) -> None:
    colour = {"completed": "green", "failed": "red"}.get(result["status"], "yellow")
    out.print(f"[{colour}]{result['status']}[/{colour}]")
    if result.get("error"):
        e = result["error"]
        out.print(f"[red]{e['step']}: {e['type']}: {e['message']}[/red]")
    out.print_json(json.dumps({"state": result["state"], "output": result["output"]}))


# ---- processes ------------------------------------------------------------------------


def _publish(settings: Settings, app: Any, node: str) -> None:
    client = connect(settings.redis_url)
    try:
        publish(client, app.runtime.workflows.values(), host=node)
    except Exception as exc:  # the broker connection will say the same, more usefully
        err.print(f"[yellow]warning:[/yellow] catalog not published: {exc}")
    finally:
        client.close()


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-Q", "--queues", default=None, help="Queues to consume (default: every step queue).")
@click.option("-c", "--concurrency", type=int, default=None, help="Pool processes (default: CPUs).")
@click.option("-P", "--pool", default="prefork")
@click.option("-l", "--loglevel", default="INFO")
@click.option("-n", "--hostname", default="worker@%h")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def worker(settings: Settings, queues: str | None, concurrency: int | None, pool: str,
           loglevel: str, hostname: str, celery_args: tuple[str, ...]) -> None:
    """Run a worker: executes the steps of the hosted workflows (a `celery worker`)."""
    app = create_app(settings)
    runtime = app.runtime
    step_queues = sorted({q for wf in runtime.workflows.values() for q in wf.queues().values()}
                         | {DEFAULT_QUEUE})
    _publish(settings, app, hostname)
    argv = ["worker", "-Q", queues or ",".join(step_queues), "-P", pool, "-l", loglevel,
            "-n", hostname]
    if concurrency:
        argv += ["-c", str(concurrency)]
    app.worker_main([*argv, *celery_args])


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-c", "--concurrency", type=int, default=4)
@click.option("-l", "--loglevel", default="INFO")
@click.option("-n", "--hostname", default="coordinator@%h")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def coordinator(settings: Settings, concurrency: int, loglevel: str, hostname: str,
                celery_args: tuple[str, ...]) -> None:
    """Run a coordinator: fires timers, recovers lost work (lost steps, lost chord bodies)."""
    app = create_app(settings)
    app.steps["worker"].add(Sweeper)
    _publish(settings, app, hostname)
    app.worker_main(["worker", "-Q", COORDINATOR_QUEUE, "-P", "threads", "-c", str(concurrency),
                     "-l", loglevel, "-n", hostname, *celery_args])


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", type=int, default=5555)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def flower(settings: Settings, port: int, flower_args: tuple[str, ...]) -> None:
    """Run Flower against the same broker, to watch workers and step tasks."""
    app = create_app(settings, import_modules=False)
    app.start(["flower", f"--port={port}", *flower_args])


@cli.command()
@click.pass_obj
@_guard
def recover(settings: Settings) -> None:
    """One recovery sweep: fire due timers, re-dispatch lost steps, re-drive lost joins."""
    runtime = create_app(settings).runtime
    changed = runtime.sweep_all()
    out.print(f"recovered {changed} run(s)")


# ---- reading ------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def workflows(settings: Settings, as_json: bool) -> None:
    """The catalog: workflows the workers serve."""
    entries = _client(settings).workflows()
    if as_json:
        _emit([e.model_dump(mode="json") for e in entries])
        return
    table = Table("workflow", "version", "steps", "queues", "hosts", "description")
    for e in entries:
        table.add_row(e.name, e.version, str(len(e.graph)), ", ".join(sorted(set(
            e.queues.values()))), ", ".join(e.hosts), e.description)
    out.print(table)


@cli.command()
@click.option("--status", "status_filter", type=click.Choice([s.value for s in RunStatus]))
@click.option("--workflow", default=None)
@click.option("--limit", type=int, default=50)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def runs(settings: Settings, status_filter: str | None, workflow: str | None, limit: int,
         as_json: bool) -> None:
    """List runs, newest first."""
    records = _client(settings).runs(RunStatus(status_filter) if status_filter else None,
                                     workflow, limit)
    if as_json:
        _emit([_summary(r) for r in records])
        return
    table = Table("run", "workflow", "status", "step", "created")
    for r in records:
        table.add_row(r.run_id, r.workflow, r.status.value, _step_name(r.current_step),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)))
    out.print(table)


def _summary(r: RunRecord) -> dict[str, Any]:
    return {"run_id": r.run_id, "workflow": r.workflow, "version": r.version,
            "status": r.status.value, "current_step": r.current_step,
            "created_at": r.created_at, "updated_at": r.updated_at}


def _step_name(step: str | None) -> str:
    return "START" if step == "__start__" else (step or "")


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def status(settings: Settings, run_id: str, as_json: bool) -> None:
    """A run's status, current step, state, results and history."""
    handle = _client(settings).attach(run_id)
    rec, history = handle.record(), handle.history()
    if as_json:
        _emit({**rec.model_dump(mode="json"), "history": history})
        return
    out.print(f"[bold]{rec.workflow}[/bold] {rec.run_id}: [bold]{rec.status.value}[/bold]"
              + (f" at {_step_name(rec.current_step)}" if rec.current_step else ""))
    if rec.error:
        out.print(f"[red]{rec.error}[/red]")
    out.print_json(json.dumps({"state": rec.state, "step_results": rec.step_results}))
    for entry in history:
        out.print(_describe(entry))


@cli.command()
@click.argument("run_id")
@click.option("--timeout", type=float, default=None)
@click.pass_obj
@_guard
def watch(settings: Settings, run_id: str, timeout: float | None) -> None:
    """Follow a run live until it ends."""
    from rich.live import Live

    handle = _client(settings).attach(run_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    steps_done = 0
    with Live(console=out, refresh_per_second=8, transient=True) as live:
        for entry, rec in _progress(handle):
            if entry is not None:
                live.console.print(_describe(entry))
                steps_done += entry.get("event") in ("step_completed", "branch_completed")
            current = rec or handle.record()
            live.update(f"[bold]{current.status.value}[/bold] at "
                        f"{_step_name(current.current_step)} · {steps_done} step(s) done")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish within {timeout}s")
    final = handle.record()
    out.print(f"{final.run_id}: [bold]{final.status.value}[/bold]")
    if final.status is not RunStatus.COMPLETED:
        sys.exit(EXIT_RUN_FAILED)


@cli.command()
@click.option("--approver", default=None, help="Only gates this user may decide.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def gates(settings: Settings, approver: str | None, as_json: bool) -> None:
    """Pending approvals."""
    records = _client(settings).gates(approver)
    rows: list[dict[str, Any]] = [{"run_id": r.run_id, "workflow": r.workflow, "step": r.gate.step,
             "approvers": r.gate.approvers, "min_approvals": r.gate.min_approvals,
             "approvals": [a.by for a in r.gate.approvals], "prompt": r.gate.prompt,
             "payload": r.gate.payload, "opened_at": r.gate.opened_at,
             "timeout_at": r.gate.timeout_at} for r in records if r.gate is not None]
    if as_json:
        _emit(rows)
        return
    table = Table("run", "workflow", "step", "approvers", "approvals", "prompt")
    for row in rows:
        table.add_row(row["run_id"], row["workflow"], row["step"], ", ".join(row["approvers"]),
                      f"{len(row['approvals'])}/{row['min_approvals']}", row["prompt"] or "")
    out.print(table)


@cli.command()
@click.argument("target")
@click.option("--mermaid", is_flag=True, help="Mermaid flowchart instead of text.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def graph(settings: Settings, target: str, mermaid: bool, as_json: bool) -> None:
    """The step graph of a workflow (module:attribute, or a name from the catalog)."""
    if ":" in target:
        edges = _graph.edges(load_workflow(target))
    else:
        edges = _client(settings).workflow(target).graph
    if as_json:
        _emit(edges)
    elif mermaid:
        click.echo(_graph.render_mermaid(edges))
    else:
        click.echo(_graph.render_text(edges))


# ---- control ------------------------------------------------------------------------


def _control(verb: str, doc: str) -> None:
    @cli.command(name=verb, help=doc)
    @click.argument("run_id")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @_guard
    def command(settings: Settings, run_id: str, as_json: bool) -> None:
        handle = _client(settings).attach(run_id)
        getattr(handle, verb)()
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
        getattr(handle, verb)(by, text)
        _report(handle, as_json)


_decision("approve", "comment", "Approve the gate a run waits at.")
_decision("reject", "reason", "Reject the gate a run waits at.")


def _report(handle: RunHandle, as_json: bool) -> None:
    rec = handle.record()
    if as_json:
        _emit(_summary(rec))
    else:
        out.print(f"{rec.run_id}: {rec.status.value}")


cli.add_command(dev)

if __name__ == "__main__":
    main()
