"""Durable per-vehicle state behind the ConsentStore interface."""

from gateway.store.base import (
    Changes,
    ConsentStore,
    CountKey,
    EgressCount,
    HistoryRow,
    IncidentHold,
    ParkedMessage,
    ParkResult,
    StoredPolicy,
    StoredVehicle,
)
from gateway.store.sqlite import SqliteConsentStore, StoreDamaged, StoreError

__all__ = [
    "Changes",
    "ConsentStore",
    "CountKey",
    "EgressCount",
    "HistoryRow",
    "IncidentHold",
    "ParkResult",
    "ParkedMessage",
    "SqliteConsentStore",
    "StoreDamaged",
    "StoreError",
    "StoredPolicy",
    "StoredVehicle",
]
