"""Durable per-vehicle state behind the ConsentStore interface."""

from gateway.store.base import ConsentStore, StoredVehicle
from gateway.store.sqlite import SqliteConsentStore

__all__ = ["ConsentStore", "SqliteConsentStore", "StoredVehicle"]
