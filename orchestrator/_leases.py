"""Leases a worker holds while it runs a task, kept alive by one heartbeat thread.

A lease says "this task is alive on a worker"; the sweep re-sends work whose lease lapsed.
One thread per store renews every held lease: a thread per step would cost more than a
short step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from ._stores import RunStore


class LeaseKeeper:
    """Renews each held lease every third of its TTL, from one thread."""

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self._held: dict[int, tuple[str, str, float, float]] = {}  # key -> ..., renew at
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._next = 0
        self._sleeps_until = float("inf")  # when the thread next wakes on its own
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def hold(self, run_id: str, task_id: str, ttl: float) -> Iterator[None]:
        key = self._hold(run_id, task_id, ttl)
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(key, None)

    def _hold(self, run_id: str, task_id: str, ttl: float) -> int:
        with self._lock:
            self._next += 1
            renew_at = time.monotonic() + ttl / 3
            self._held[self._next] = (run_id, task_id, ttl, renew_at)
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._sleeps_until = float("inf")
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="orchestrator-leases")
                self._thread.start()
            # Wake the thread only if it would sleep past this lease's first renewal: a
            # step that holds a lease must not cost a thread switch (it wakes by then
            # anyway when it already sleeps toward an earlier renewal).
            wake = renew_at < self._sleeps_until
            if wake:
                self._sleeps_until = renew_at
        if wake:
            self._wake.set()
        return self._next

    def close(self) -> None:
        """End the heartbeat thread (it holds the store; a runtime that closed must not
        keep either alive)."""
        with self._lock:
            self._closed = True
        self._wake.set()

    def _beat(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                soonest = min((at for *_, at in self._held.values()), default=None)
                self._sleeps_until = float("inf") if soonest is None else soonest
            self._wake.wait(None if soonest is None else max(0.0, soonest - time.monotonic()))
            with self._lock:
                self._wake.clear()
            now = time.monotonic()
            with self._lock:
                due = [(k, h) for k, h in self._held.items() if h[3] <= now]
                for k, (run_id, task_id, ttl, _) in due:
                    self._held[k] = (run_id, task_id, ttl, now + ttl / 3)
            for _, (run_id, task_id, ttl, _) in due:
                # A missed beat only risks a harmless redispatch.
                with contextlib.suppress(Exception):
                    self._store.renew_lease(run_id, task_id, ttl)
