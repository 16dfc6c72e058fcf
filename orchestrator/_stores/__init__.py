"""Run stores: one interface, one module per backend."""

from .base import Loaded, RunStore, StoreUnavailable
from .memory import MemoryStore
from .redis import RedisStore

__all__ = ["Loaded", "MemoryStore", "RedisStore", "RunStore", "StoreUnavailable"]
