"""Durable per-vehicle state behind the ConsentStore interface."""

from gateway.store.base import ConsentStore, EgressCount, StoredPolicy, StoredVehicle
from gateway.store.sqlite import SqliteConsentStore

__all__ = ["ConsentStore", "EgressCount", "SqliteConsentStore", "StoredPolicy", "StoredVehicle"]
