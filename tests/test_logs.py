"""Text logs carry the structured `extra` fields too (as ` key=value`), like JSON logs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from gateway import __version__
from gateway.logs import JsonLinesFormatter, TextFormatter

from .conftest import GatewayProcess


def _record(caplog: pytest.LogCaptureFixture, extra: dict[str, object]) -> logging.LogRecord:
    with caplog.at_level(logging.INFO, logger="gateway.test"):
        logging.getLogger("gateway.test").info("policy %s active", "2026.11.2", extra=extra)
    (record,) = caplog.records
    return record


def test_text_line_ends_with_the_extra_fields(caplog: pytest.LogCaptureFixture) -> None:
    record = _record(caplog, {"policy_version": "2026.11.2", "edge": "vehicle", "count": 3})
    line = TextFormatter().format(record)
    assert line.endswith(
        "INFO    gateway.test: policy 2026.11.2 active"
        " policy_version=2026.11.2 edge=vehicle count=3"
    )


def test_text_values_that_would_be_ambiguous_are_quoted(caplog: pytest.LogCaptureFixture) -> None:
    record = _record(
        caplog,
        {"reason": "connection lost", "empty": "", "eq": "a=b", "flag": True, "summary": {"n": 1}},
    )
    line = TextFormatter().format(record)
    assert line.endswith(
        ' reason="connection lost" empty="" eq="a=b" flag=true summary={"n":1}'
    )


def test_text_and_json_show_the_same_fields(caplog: pytest.LogCaptureFixture) -> None:
    record = _record(caplog, {"policy_version": "2026.11.2", "vehicles": 12})
    entry = json.loads(JsonLinesFormatter().format(record))
    text = TextFormatter().format(record)
    for key in ("policy_version", "vehicles"):
        assert f" {key}={entry[key]}" in text


def test_no_suffix_without_extra_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.test"):
        logging.getLogger("gateway.test").info("plain")
    assert TextFormatter().format(caplog.records[0]).endswith("gateway.test: plain")


def test_a_traceback_stays_below_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.test"):
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("gateway.test").exception("failed", extra={"edge": "backend"})
    first, *rest = TextFormatter().format(caplog.records[0]).splitlines()
    assert first.endswith("failed edge=backend")
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: boom"


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)
def test_the_running_gateway_logs_fields_in_text_mode(tmp_path: Path) -> None:
    from sim.broker import MosquittoBroker

    with MosquittoBroker() as broker:
        proc = GatewayProcess(broker.url, broker.url, tmp_path / "state")
        assert proc.terminate() == 0
    lines = proc.lines
    assert not any(line.startswith("{") for line in lines)  # text, not JSON
    starting = next(line for line in lines if "starting: vehicle broker" in line)
    assert starting.rstrip().endswith(f" version={__version__}")
    ready = next(line for line in lines if "gateway ready" in line)
    assert " policy_version=2026.12.1" in ready
    stopped = next(line for line in lines if "gateway stopped" in line)
    assert " received=" in stopped and " internal_errors=0" in stopped
