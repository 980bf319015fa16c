"""The operator-held pseudonymization key."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("gateway.keys")
KEY_BYTES = 32


class KeyFileError(Exception):
    pass


def load_or_create_key(path: Path) -> bytes:
    """Read the key; create a random one (mode 0600) on first start.

    Never hard-coded: a well-known key would make every pseudonym and the
    sticky location offset reversible.
    """
    if path.exists():
        key = path.read_bytes()
        if len(key) < KEY_BYTES:
            raise KeyFileError(f"{path}: key must be at least {KEY_BYTES} bytes, found {len(key)}")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.warning("generated a new pseudonymization key at %s: back it up", path)
    return key
