"""Celery settings, read from the environment (ORCHESTRATOR_* variables; see README).

The orchestrator's own app applies exactly these; this module is for plain Celery tooling,
e.g. `celery --config celeryconfig inspect active` or `celery --config celeryconfig flower`.
JSON only, late acks, requeue on a lost worker, prefetch 1, a visibility timeout, result
expiry.
"""

from orchestrator import Settings

globals().update(Settings.from_env().celery_config())
