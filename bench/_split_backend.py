"""Put Celery's result backend (the chord counters) on BENCH_CHORD_URL, for bench/redis_cost.py.

Imported, it patches `celery_config` where the runtime reads it, so every app made after
uses that backend; run as a module, it is `orchestrator` with that patch
(`python -m bench._split_backend worker ...`). A bench device only: the runtime keeps the
chord counters on ORCHESTRATOR_REDIS_URL.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator import _celery, _client, _config

_original = _config.celery_config


def _celery_config(settings: Any) -> dict[str, Any]:
    conf = _original(settings)
    conf["result_backend"] = os.environ["BENCH_CHORD_URL"]
    return conf


for _module in (_config, _celery, _client):
    _module.celery_config = _celery_config  # type: ignore[attr-defined]

if __name__ == "__main__":
    from orchestrator.cli import main

    main()
