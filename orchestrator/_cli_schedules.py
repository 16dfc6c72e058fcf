"""`orchestrator schedules ...`: the command line of `Client().schedules`.

cli.py builds the group with its own error guard (the exit-code table), text escaping and
--input parser. They are handed in rather than imported: cli.py also runs as `__main__`
(`python -m orchestrator.cli`), and importing it back from here would load it twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ._client import Client
from ._config import Settings
from ._schedule_rules import Overlap
from ._schedules import Schedule

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

out = Console(highlight=False, soft_wrap=True)


def summary(s: Schedule, count: int = 3) -> dict[str, Any]:
    """A schedule as JSON, with its next fire times in its time zone."""
    return {**s.model_dump(mode="json"),
            "next": [t.isoformat() for t in s.next_fire_times(count)]}


def schedules_group(guard: Decorator, text: Callable[[Any], str],
                    parse_input: Callable[[str], dict[str, Any]]) -> click.Group:
    def emit(data: Any) -> None:
        click.echo(json.dumps(data, indent=2))

    def report(s: Schedule, as_json: bool) -> None:
        if as_json:
            emit(summary(s))
        else:
            out.print(f"{text(s.name)}: {'paused' if s.paused else 'active'}")

    @click.group()
    def schedules() -> None:
        """Start runs on a timetable (cron or interval); coordinators fire them."""

    @schedules.command()
    @click.argument("name")
    @click.argument("workflow")
    @click.option("--cron", default=None, help='A cron expression, e.g. "0 3 * * *".')
    @click.option("--timezone", default="UTC", show_default=True,
                  help="The time zone --cron is read in (IANA name, e.g. Europe/Berlin).")
    @click.option("--every", type=int, default=None, help="Or: every this many seconds.")
    @click.option("--input", "input_json", default="{}", help="Each run's input as JSON.")
    @click.option("--overlap", type=click.Choice([o.value for o in Overlap]),
                  default=Overlap.SKIP.value, show_default=True,
                  help="What a tick does while the previous run is still going.")
    @click.option("--catchup", type=float, default=60.0, show_default=True,
                  help="Seconds a tick missed while no coordinator ran may be late and "
                       "still start; older ones are skipped and noted.")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @guard
    def create(settings: Settings, name: str, workflow: str, cron: str | None, timezone: str,
               every: int | None, input_json: str, overlap: str, catchup: float,
               as_json: bool) -> None:
        """Create schedule NAME: start WORKFLOW (a catalog name) at every tick."""
        s = Client(settings=settings).schedules.create(
            name, workflow, cron=cron, timezone=timezone, every=every,
            input=parse_input(input_json), overlap=overlap, catchup=catchup)
        if as_json:
            emit(summary(s))
        else:
            out.print(f"{text(s.name)}: next at "
                      f"{', '.join(t.isoformat() for t in s.next_fire_times())}")

    @schedules.command(name="list")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @guard
    def list_(settings: Settings, as_json: bool) -> None:
        """Every schedule, with its next fire times."""
        found = Client(settings=settings).schedules.list()
        if as_json:
            emit([summary(s) for s in found])
            return
        table = Table()
        for column in ("schedule", "workflow", "when", "overlap", "state", "next", "last run"):
            table.add_column(column, no_wrap=column in ("schedule", "last run"),
                             overflow="fold")
        for s in found:
            when = f"{s.cron} ({s.timezone})" if s.cron else f"every {s.every}s"
            upcoming = s.next_fire_times(1)
            table.add_row(*map(text, (s.name, s.workflow, when, s.overlap.value,
                                      "paused" if s.paused else "active",
                                      upcoming[0].isoformat() if upcoming else "",
                                      s.last_run_id or "")))
        out.print(table)

    def control(verb: str, doc: str) -> None:
        @schedules.command(name=verb, help=doc)
        @click.argument("name")
        @click.option("--json", "as_json", is_flag=True)
        @click.pass_obj
        @guard
        def command(settings: Settings, name: str, as_json: bool) -> None:
            report(getattr(Client(settings=settings).schedules, verb)(name), as_json)

    control("pause", "Stop firing a schedule until resume.")
    control("resume", "Fire a paused schedule again, from now on.")

    @schedules.command()
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @guard
    def trigger(settings: Settings, name: str, as_json: bool) -> None:
        """Start one run now, whatever the overlap policy; prints its id."""
        handle = Client(settings=settings).schedules.trigger(name)
        emit({"run_id": handle.run_id}) if as_json else out.print(text(handle.run_id))

    @schedules.command()
    @click.argument("name")
    @click.pass_obj
    @guard
    def delete(settings: Settings, name: str) -> None:
        """Delete a schedule (the runs it started go on)."""
        Client(settings=settings).schedules.delete(name)
        out.print(f"{text(name)}: deleted")

    return schedules
