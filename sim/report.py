"""HTML report (placeholder, replaced below)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(out_dir: Path, result: Any) -> Path:
    path = out_dir / "report.html"
    path.write_text("<html><body>report</body></html>")
    return path
