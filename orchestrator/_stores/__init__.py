"""Run stores: one interface, one module per backend."""

from .base import CorruptRecord, Loaded, Outbox, RunPage, RunStore, StoreUnavailable, Waits
from .memory import MemoryStore
from .redis import RedisStore

__all__ = ["CorruptRecord", "Loaded", "MemoryStore", "Outbox", "RedisStore", "RunPage", "RunStore",
           "StoreUnavailable", "Waits"]
