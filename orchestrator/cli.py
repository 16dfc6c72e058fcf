"""The `orchestrator` command line.

Exit codes: 0 ok, 1 the run failed or was stopped, 2 bad usage or input, 3 not found,
4 not allowed, 5 Redis or the broker unreachable, 6 timed out.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from pydantic import ValidationError
from rich.console import Console

from ._celery import Sweeper, create_app, runtime_of
from ._config import COORDINATOR_QUEUE, Settings
from ._definition import DefinitionError, Workflow
from ._engine import ControlError
from ._records import RunRecord, RunStatus
from ._runner import RunHandle, WorkflowRunner
from ._runtime import RunNotFound, UnknownWorkflow
from ._stores import StoreUnavailable

EXIT_RUN_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_FORBIDDEN, EXIT_UNREACHABLE, EXIT_TIMEOUT = (
    1, 2, 3, 4, 5, 6)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    sys.exit(code)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known errors into one clear line and a meaningful exit code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            _fail(f"invalid input: {_one_line(exc)}", EXIT_USAGE)
        except (DefinitionError, json.JSONDecodeError) as exc:
            _fail(str(exc), EXIT_USAGE)
        except (RunNotFound, UnknownWorkflow) as exc:
            _fail(str(exc.args[0] if exc.args else exc), EXIT_NOT_FOUND)
        except PermissionError as exc:
            _fail(str(exc), EXIT_FORBIDDEN)
        except ControlError as exc:
            _fail(str(exc), EXIT_USAGE)
        except StoreUnavailable as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
        except TimeoutError as exc:
            _fail(str(exc), EXIT_TIMEOUT)

    return wrapper


def _one_line(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}"
                     for e in exc.errors())


@click.group()
@click.option("--redis-url", envvar="ORCHESTRATOR_REDIS_URL",
              help="State store (and default broker).")
@click.option("--broker-url", envvar="ORCHESTRATOR_BROKER_URL", help="Celery broker, if not Redis.")
@click.option("--workflows", envvar="ORCHESTRATOR_WORKFLOWS",
              help="Comma-separated modules that define workflows.")
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
@click.option("--remote", is_flag=True, help="Enqueue on the cluster instead of running here.")
@click.option("--wait/--no-wait", default=True, help="With --remote: wait for the result.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many s.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
@_guard
def run(settings: Settings, target: str, input_json: str, run_id: str | None, remote: bool,
        wait: bool, timeout: float | None, as_json: bool) -> None:
    """Run a workflow (module:attribute). Embedded by default: one process, no server."""
    wf = load_workflow(target)
    data = json.loads(input_json)
    if remote:
        runner = WorkflowRunner(wf, app=create_app(settings, [wf], import_modules=False))
    else:
        runner = WorkflowRunner(wf)
    handle = runner.run(data, run_id=run_id)
    if remote and not wait:
        _print_json({"run_id": handle.run_id}) if as_json else out.print(handle.run_id)
        return
    if not as_json:
        out.print(f"[bold]{wf.name}[/bold] run [cyan]{handle.run_id}[/cyan]")
        _follow(handle, timeout)
    result = handle.result(timeout=timeout)
    if as_json:
        _print_json(result.model_dump(mode="json"))
    else:
        _print_result(result.model_dump(mode="json"))
    if result.status is not RunStatus.COMPLETED:
        sys.exit(EXIT_RUN_FAILED)


def _follow(handle: RunHandle, timeout: float | None) -> None:
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    for entry in handle.follow():
        out.print(_describe(entry))
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {handle.run_id} did not finish within {timeout}s")


def _describe(entry: dict[str, Any]) -> str:
    event = entry.get("event", "?")
    step = entry.get("step")
    step = "START" if step == "__start__" else step
    extras = {k: v for k, v in entry.items() if k not in ("at", "event", "step")}
    detail = " ".join(f"{k}={v}" for k, v in extras.items())
    label = {"step_completed": "[green]✓[/green]", "failed": "[red]✗[/red]",
             "completed": "[green]●[/green]"}.get(event, "•")
    return f"  {label} {event}" + (f" [bold]{step}[/bold]" if step else "") + (
        f" [dim]{detail}[/dim]" if detail else "")


def _print_result(result: dict[str, Any]) -> None:
    colour = {"completed": "green", "failed": "red"}.get(result["status"], "yellow")
    out.print(f"[{colour}]{result['status']}[/{colour}]")
    if result.get("error"):
        out.print(f"[red]{result['error']['step']}: {result['error']['type']}: "
                  f"{result['error']['message']}[/red]")
    out.print_json(json.dumps({"state": result["state"], "output": result["output"]}))


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# ---- processes ------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-Q", "--queues", default=None, help="Queues to consume (default: every step queue).")
@click.option("-c", "--concurrency", type=int, default=None)
@click.option("-P", "--pool", default="prefork")
@click.option("-l", "--loglevel", default="INFO")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def worker(settings: Settings, queues: str | None, concurrency: int | None, pool: str,
           loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Run a worker: executes steps of the hosted workflows (a `celery worker`)."""
    app = create_app(settings)
    runtime = runtime_of(app)
    step_queues = sorted({q for wf in runtime.workflows.values() for q in wf.queues().values()}
                         | {"orchestrator.steps"})
    argv = ["worker", "-Q", queues or ",".join(step_queues), "-P", pool, "-l", loglevel, "-E"]
    if concurrency:
        argv += ["-c", str(concurrency)]
    app.worker_main([*argv, *celery_args])


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-c", "--concurrency", type=int, default=4)
@click.option("-l", "--loglevel", default="INFO")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def coordinator(settings: Settings, concurrency: int, loglevel: str,
                celery_args: tuple[str, ...]) -> None:
    """Run a coordinator: joins parallel branches, fires timers, recovers lost work."""
    app = create_app(settings)
    app.steps["worker"].add(Sweeper)
    app.worker_main(["worker", "-Q", COORDINATOR_QUEUE, "-P", "threads", "-c", str(concurrency),
                     "-l", loglevel, "-E", "-n", "coordinator@%h", *celery_args])


@cli.command()
@click.pass_obj
@_guard
def recover(settings: Settings) -> None:
    """One recovery sweep: fire due timers and re-dispatch lost steps."""
    runtime = runtime_of(create_app(settings))
    changed = runtime.sweep_all()
    out.print(f"recovered {changed} run(s)")


@cli.command()
@click.argument("run_id")
@click.option("--workflow", "workflow_name", default=None, help="Which workflow's store to read.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def status(settings: Settings, run_id: str, workflow_name: str | None, as_json: bool) -> None:
    """Show a run: status, current step, state, history."""
    rec, history = _find_run(settings, run_id, workflow_name)
    if as_json:
        _print_json({**rec.model_dump(mode="json"), "history": history})
        return
    out.print(f"[bold]{rec.workflow}[/bold] {rec.run_id}: {rec.status.value}"
              + (f" at {rec.current_step}" if rec.current_step else ""))
    out.print_json(json.dumps({"state": rec.state, "step_results": rec.step_results}))
    for entry in history:
        out.print(_describe(entry))


def _find_run(settings: Settings, run_id: str,
              workflow_name: str | None) -> tuple[RunRecord, list[dict[str, Any]]]:
    runtime = runtime_of(create_app(settings))
    names = [workflow_name] if workflow_name else list(runtime.workflows)
    for name in names:
        store = runtime.store_for(runtime.workflow(name).persistence_options.key_prefix)
        rec = store.load(run_id).record
        if rec is not None:
            return rec, store.history(run_id)
    raise RunNotFound(f"no run {run_id!r} in the stores of {sorted(names)}")


if __name__ == "__main__":
    main()
