"""Logging setup: human-readable lines or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call passed with `extra=`."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """One readable line; the `extra` fields follow as ` key=value` (strings with spaces,
    quotes or `=` JSON-quoted, other values as compact JSON), so text logs carry what
    JSON logs carry."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        suffix = "".join(f" {key}={_text_value(value)}" for key, value in extras.items())
        head, newline, rest = line.partition("\n")  # a traceback stays below the fields
        return head + suffix + newline + rest


def _text_value(value: object) -> str:
    if not isinstance(value, str):  # numbers, flags, lists, dicts: compact JSON
        return json.dumps(value, default=str, separators=(",", ":"))
    if not value or any(c.isspace() or c in '"=' for c in value):
        return json.dumps(value)
    return value


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Throttle:
    """Say a recurring refusal once per interval, with how often it happened.

    A flood (fake VINs, a settings storm) must be visible in the log without
    one line per message; the keys are refusal reasons, so they stay few.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def due(self, key: str, now: float) -> int | None:
        """None while quiet; else how many occurrences this line stands for."""
        count = self._suppressed.get(key, 0) + 1
        if now - self._last.get(key, float("-inf")) < self.interval_s:
            self._suppressed[key] = count
            return None
        self._last[key] = now
        self._suppressed[key] = 0
        return count
