"""Settings from the environment (ORCHESTRATOR_*), and the Celery configuration they imply.

Secrets (passwords in URLs) come only from the environment; URLs may use rediss:// for TLS.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from . import _redis_url
from ._records import DEFAULT_QUEUE

COORDINATOR_QUEUE = "orchestrator.coordinator"


@dataclass(frozen=True)
class Settings:
    """Every knob, its environment variable and default (see the README's table)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None  # defaults to redis_url
    workflows: tuple[str, ...] = ("workers",)
    key_prefix: str = "orchestrator:"  # cluster-wide keys (the catalog); runs use their own
    lease_ttl: float = 30.0
    redispatch_after: float = 60.0
    join_after: float = 5.0
    sweep_interval: float = 1.0
    sweep_batch: int = 500
    visibility_timeout: int = 3600
    result_expires: int = 3600
    retain_seconds: int = 7 * 24 * 3600
    max_payload: int = 1024 * 1024
    history_limit: int = 1000  # a run keeps its first and last this many history entries
    catalog_ttl: float = 30.0  # a host leaves the catalog this long after its last heartbeat
    log_format: str = "text"  # or "json": one JSON object a line
    task_events: bool = False  # send task events from the start, not only while Flower runs
    # HMAC key of the runs' history chain (orchestrator/_audit.py); unset: no macs.
    audit_key: str | None = field(default=None, repr=False)
    min_replicas_ack: int = 0  # replicas that must acknowledge a commit (WAIT) before a send
    replicas_ack_timeout: float = 1.0  # seconds a commit waits for them
    # Workers and coordinators install a TracerProvider exporting this way ("otlp",
    # "console"); unset: they leave the global provider as it is (see _tracing).
    otel_exporter: str | None = None

    def __post_init__(self) -> None:
        positive = ("lease_ttl", "redispatch_after", "join_after", "sweep_interval",
                    "sweep_batch", "visibility_timeout", "result_expires", "retain_seconds",
                    "max_payload", "history_limit", "catalog_ttl", "replicas_ack_timeout")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ORCHESTRATOR_{name.upper()} must be positive, "
                                 f"got {getattr(self, name)!r}")
        if self.min_replicas_ack < 0:
            raise ValueError(f"ORCHESTRATOR_MIN_REPLICAS_ACK must be 0 or more, "
                             f"got {self.min_replicas_ack!r}")
        for name in ("redis_url", "broker_url"):
            url = getattr(self, name)
            if url is not None:
                try:
                    _redis_url.check(url)
                except ValueError as exc:
                    raise ValueError(f"ORCHESTRATOR_{name.upper()}: {exc}") from None
        if self.otel_exporter not in (None, "otlp", "console"):
            raise ValueError(f"ORCHESTRATOR_OTEL_EXPORTER must be 'otlp' or 'console', "
                             f"got {self.otel_exporter!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"ORCHESTRATOR_LOG_FORMAT must be 'text' or 'json', "
                             f"got {self.log_format!r}")

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    def celery_config(self) -> dict[str, Any]:
        """The Celery settings these imply (what `celeryconfig.py` exposes)."""
        return celery_config(self)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"ORCHESTRATOR_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _parse(f.type, raw)
            except ValueError:
                raise ValueError(
                    f"ORCHESTRATOR_{f.name.upper()}={raw!r} is not a valid {f.type}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(kind: Any, raw: str) -> Any:
    kind = str(kind)
    if kind.startswith("tuple"):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if kind.startswith("bool"):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return raw.lower() in ("1", "true", "yes", "on")
    if kind.startswith("float"):
        return float(raw)
    if kind.startswith("int"):
        return int(raw)
    return raw


def celery_config(settings: Settings) -> dict[str, Any]:
    """JSON only, late acks, requeue on a lost worker, one message prefetched per process."""
    # A Sentinel URL becomes kombu's and Celery's own form (sentinel://...;sentinel://...
    # with master_name and sentinel_kwargs): the broker and the chord counters follow the
    # primary as the state store does.
    broker, broker_options = _redis_url.celery_url(settings.broker)
    backend, backend_options = _redis_url.celery_url(settings.redis_url)
    conf: dict[str, Any] = {
        "broker_url": broker,
        # Our store holds results and counts a fork's branches; Celery's backend counts
        # only the chords that runs forked by an older version sent.
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_expires": settings.result_expires,
        "task_default_queue": DEFAULT_QUEUE,
        "broker_connection_retry_on_startup": True,
        # Workers that lose the broker link cancel what they prefetched instead of
        # acking it later into a new connection (celery #8030 / #4354 family).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout,
                                     **broker_options},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout,
                                             **backend_options},
        "redis_backend_health_check_interval": 15,
        # Events cost a publish per task state; Flower switches them on while it watches.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
    }
    for key, url in (("broker_use_ssl", settings.broker), ("redis_backend_use_ssl",
                                                            settings.redis_url)):
        if url.startswith("rediss://"):
            conf[key] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return conf
