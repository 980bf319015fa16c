"""Append-only JSON-lines logs: the ground truth (what the fleet did) and the recording
(what the backend received). Both are plain files so a run can be inspected with jq."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

GROUND_TRUTH_FILE = "ground_truth.jsonl"
RECORDING_FILE = "recording.jsonl"
RUN_FILE = "run.json"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class JsonLinesWriter:
    """Writes one JSON object per line; flushes every `flush_every` records and on close."""

    def __init__(self, path: Path, flush_every: int = 200) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("w", encoding="utf-8")
        self._flush_every = flush_every
        self._unflushed = 0
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n")
        self.count += 1
        self._unflushed += 1
        if self._unflushed >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._unflushed = 0

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if line:
                yield json.loads(line)
