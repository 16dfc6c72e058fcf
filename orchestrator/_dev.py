"""`orchestrator dev`: the docker-compose topology as local processes (being written)."""

from __future__ import annotations

import click


@click.command()
def dev() -> None:
    """Start Redis, a coordinator, workers and Flower as local processes."""
    raise click.ClickException("not written yet")
