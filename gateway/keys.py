"""The operator-held pseudonymization key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

log = logging.getLogger("gateway.keys")
KEY_BYTES = 32
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\r\n")


class KeyFileError(Exception):
    pass


def _how_to_generate(path: Path) -> str:
    return (
        f"key files hold raw bytes ({KEY_BYTES} or more): generate one with "
        f"`head -c {KEY_BYTES} /dev/urandom > {path}` (or let the gateway create it on a "
        "fresh state directory)"
    )


def read_key(path: Path) -> bytes:
    """Read an existing key file, exactly as it is.

    Text is refused rather than decoded or stripped: a key someone typed,
    pasted or converted is exactly the kind that differs by one byte from the
    one in the backup, and a different key silently changes every pseudonym.
    """
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise  # whether a key may be created is the caller's decision
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    # 32 random bytes are all printable with probability ~1e-13: text means a text key.
    if key and all(b in _TEXT_BYTES for b in key):
        body = key.strip()
        if re.fullmatch(rb"[0-9a-fA-F]+", body):
            kind = "hex text (decode it with `xxd -r -p`)"
        elif re.fullmatch(rb"[A-Za-z0-9+/_-]+=*", body):
            kind = "base64 text (decode it with `base64 -d`)"
        else:
            kind = "text"
        raise KeyFileError(f"{path}: the key is {kind}; {_how_to_generate(path)}")
    # Generated keys are whole blocks; 32 bytes and a newline is an editor or `echo`.
    core = key.rstrip(b"\r\n")
    if len(core) != len(key) and len(core) >= KEY_BYTES and len(core) % 16 == 0:
        raise KeyFileError(
            f"{path}: ends with a newline after {len(core)} key bytes; "
            f"remove it (`truncate -s {len(core)} {path}`); {_how_to_generate(path)}"
        )
    if len(key) < KEY_BYTES:
        raise KeyFileError(
            f"{path}: key must be at least {KEY_BYTES} bytes, found {len(key)}; "
            + _how_to_generate(path)
        )
    return key


def create_key(path: Path) -> bytes:
    """Write a new random key (mode 0600), atomically."""
    key = secrets.token_bytes(KEY_BYTES)
    write_key(path, key)
    log.warning("generated a new pseudonymization key at %s: back it up", path)
    return key


def write_key(path: Path, key: bytes) -> None:
    """Write key bytes (mode 0600) atomically and durably (the directory too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a stale .tmp may have had other bits
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create_key(path: Path) -> bytes:
    """Read the key; create a random one (mode 0600) when there is none.

    Never hard-coded: a well-known key would make every pseudonym and the
    sticky location offset reversible. `gateway run` decides whether a
    missing key may be created (see gateway.statedir); this is for tools.
    """
    try:
        return read_key(path)
    except FileNotFoundError:
        return create_key(path)


def key_fingerprint(key: bytes) -> str:
    """Identifies a key without revealing it (stored next to the data it keyed)."""
    return hmac.new(key, b"key-fingerprint", hashlib.sha256).hexdigest()[:16]
