"""Shared broker state: the Redis store and the in-process store behind one interface."""

from service.store.base import Change, StoreUnavailableError, TokenStore
from service.store.memory import MemoryStore
from service.store.records import FailureRecord, TokenRecord
from service.store.redis import RedisStore

__all__ = [
    "Change",
    "FailureRecord",
    "MemoryStore",
    "RedisStore",
    "StoreUnavailableError",
    "TokenRecord",
    "TokenStore",
]
