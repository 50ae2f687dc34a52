"""Shared broker state: the Redis store and the in-process store behind one interface."""

from service.store.base import (
    QUEUE_POLL_SECONDS,
    QUEUE_STALE_SECONDS,
    Change,
    Saved,
    Spent,
    StoreUnavailableError,
    TokenStore,
)
from service.store.memory import MemoryStore
from service.store.records import FailureRecord, TokenRecord, credentials_fingerprint
from service.store.redis import RedisStore
from service.store.topology import Survey

__all__ = [
    "QUEUE_POLL_SECONDS",
    "QUEUE_STALE_SECONDS",
    "Change",
    "FailureRecord",
    "MemoryStore",
    "RedisStore",
    "Saved",
    "Spent",
    "StoreUnavailableError",
    "Survey",
    "TokenRecord",
    "TokenStore",
    "credentials_fingerprint",
]
