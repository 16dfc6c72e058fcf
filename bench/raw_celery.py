"""Raw Celery, configured as ../shared/bench/celery_baseline.py does: the floor."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")

app = Celery("raw", broker=URL, backend=URL)
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "4")),
                task_acks_late=True, broker_connection_retry_on_startup=True)


@app.task(name="noop")
def noop(x: Any = None, *args: Any) -> int:
    return 1


@app.task(name="join")
def join(xs: list[int]) -> int:
    return sum(xs)
