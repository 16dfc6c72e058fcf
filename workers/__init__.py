"""Workflow modules our workers host. `orchestrator worker` imports the modules listed in
ORCHESTRATOR_WORKFLOWS (default: this package, which lists its modules below)."""

__workflow_modules__ = ["deploy"]
