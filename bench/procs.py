"""Subprocesses under test: the gateway, the no-op relay and the naive relay.

Each runs in its own process (the load generator gets the other core), its
stderr drained continuously by a thread (a full pipe would stall it) and
watched for its ready line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "config" / "policy.yaml"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Proc:
    def __init__(self, name: str, argv: list[str], ready_marker: str, cwd: Path = REPO) -> None:
        self.name = name
        self.argv = argv
        self.started = time.perf_counter()
        self.ready_at: float | None = None
        self._marker = ready_marker
        self._ready = threading.Event()
        self.lines: deque[str] = deque(maxlen=200)
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            if not self._ready.is_set() and self._marker in line:
                self.ready_at = time.perf_counter()
                self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from spawn to the ready line."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines)
                self.stop()
                raise RuntimeError(f"{self.name} did not become ready:\n{tail}")
        assert self.ready_at is not None
        return self.ready_at - self.started

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._drain.join(timeout=2)
        if self.process.stderr is not None and not self._drain.is_alive():
            self.process.stderr.close()


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process' main thread: the event loop of the
    gateway and the relays (the rest is threads: the gateway's store writer)."""
    return cpu_seconds(pid, f"/proc/{pid}/task/{pid}/stat")


def cpu_seconds(pid: int, stat: str | None = None) -> float:
    """User + system CPU time of a process (from /proc; no psutil needed)."""
    try:
        fields = Path(stat or f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_gateway_config(
    directory: Path,
    name: str,
    vehicle_prefix: str,
    backend_prefix: str,
    inflight: int = 512,
    *,
    limits: dict[str, float | int] | None = None,
    control: tuple[int, str] | None = None,
) -> Path:
    """A runtime config like config/gateway.toml, with its own client ids and prefixes
    so several gateways can share one broker without taking each other's sessions.
    `limits` fills [limits]; `control` = (port, token SHA-256) gives the control
    plane that port and a dpo token (to read /metrics and the store's views)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    limit_lines = "".join(f"{key} = {value!r}\n" for key, value in (limits or {}).items())
    limits_section = f"\n[limits]\n{limit_lines}" if limits else ""
    control_text = (
        control_section()
        if control is None
        else (
            f'\n[control]\nlisten = "127.0.0.1:{control[0]}"\n\n'
            f'[[control.tokens]]\nname = "bench"\nrole = "dpo"\nsha256 = "{control[1]}"\n'
        )
    )
    path.write_text(
        f"""policy = "{POLICY}"
state_dir = "{directory / name}"

[vehicle_broker]
client_id = "bench-{name}-{os.getpid()}-vehicle"
topic_prefix = "{vehicle_prefix}"
session_expiry_s = 600

[backend_broker]
client_id = "bench-{name}-{os.getpid()}-backend"
topic_prefix = "{backend_prefix}"

[pipeline]
inflight = {inflight}
{limits_section}
[logging]
level = "INFO"
{control_text}"""
    )
    return path


def control_section() -> str:
    """The operator HTTP API (when this gateway version has one) on its own free
    port: kept running as in production, without clashing between gateways."""
    from gateway.config import GatewayConfig
    from sim.broker import free_port

    if "control" not in GatewayConfig.model_fields:
        return ""
    return f'\n[control]\nlisten = "127.0.0.1:{free_port()}"\n'


def start_gateway(
    name: str,
    config: Path,
    broker_url: str,
    state_dir: Path,
    *,
    noop: bool = False,
    cwd: Path = REPO,
) -> Proc:
    """`python -m gateway run ...`, or the same CLI with a pass-through decision core.
    `cwd`: the tree whose gateway runs (another one: the baseline, bench/baseline.py)."""
    module = ["-m", "bench.relays", "noop"] if noop else ["-m", "gateway"]
    argv = [
        sys.executable,
        *module,
        "run",
        "--config",
        str(config),
        "--vehicle-broker",
        broker_url,
        "--backend-broker",
        broker_url,
        "--state-dir",
        str(state_dir),
    ]
    return Proc(name, argv, "gateway ready", cwd)


def start_relay(kind: str, name: str, broker_url: str, in_prefix: str, out_prefix: str) -> Proc:
    """`kind`: "naive" (aiomqtt, one publish at a time) or "edge" (the gateway's
    MQTT edge and nothing else); see bench/relays.py."""
    argv = [sys.executable, "-m", "bench.relays", kind, broker_url, in_prefix, out_prefix]
    return Proc(name, argv, "relay ready")
