"""Logs that carry the run id and step on every line.

Inside a step the runtime sets the run context; elsewhere the filter reads it from the
Celery task being run, or from the task id and name Celery passes to its own lines
(our task ids start with the run id, our task names are `<Workflow>.<Step>`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_current: ContextVar[tuple[str, str] | None] = ContextVar("orchestrator_run", default=None)

TEXT_FORMAT = ("[%(asctime)s: %(levelname)s/%(processName)s] run=%(run_id)s step=%(step)s "
               "%(message)s")


@contextmanager
def run_context(run_id: str, step: str) -> Iterator[None]:
    token = _current.set((run_id, step))
    try:
        yield
    finally:
        _current.reset(token)


def _from_task(task_id: str | None, name: str | None) -> tuple[str, str] | None:
    if not task_id or not name or ":" not in task_id:
        return None
    step = name.split(".", 1)[1] if "." in name else name
    return task_id.split(":", 1)[0], step


def _derive(record: logging.LogRecord) -> tuple[str, str]:
    found = _current.get()
    if found is None and isinstance(record.args, dict):
        found = _from_task(record.args.get("id"), record.args.get("name"))
    if found is None:
        from celery import current_task

        task = current_task
        if task is not None and getattr(task, "request", None) is not None:
            found = _from_task(task.request.id, task.name)
    return found or ("-", "-")


class RunContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id, record.step = _derive(record)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "at": self.formatTime(record), "level": record.levelname,
            "logger": record.name, "process": record.processName,
            "run_id": getattr(record, "run_id", "-"), "step": getattr(record, "step", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def install(logger: logging.Logger, fmt: str) -> None:
    """Give every handler of `logger` the run context, as text or JSON lines."""
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else logging.Formatter(
        TEXT_FORMAT)
    for handler in logger.handlers:
        if not any(isinstance(f, RunContextFilter) for f in handler.filters):
            handler.addFilter(RunContextFilter())
        handler.setFormatter(formatter)
