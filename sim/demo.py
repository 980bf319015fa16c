"""`python -m sim demo`: the project's main job, end to end on one machine.

private Mosquitto -> real gateway (subprocess) -> recorder + simulated fleet ->
drain -> SIGTERM the gateway -> checker summary + HTML report.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from rich.console import Console

from gateway.about import DEFAULT_CONFIG, source_root
from gateway.clock import TimeMapping
from sim.broker import MosquittoBroker, free_port
from sim.checker import CHECK_FILE, CheckResult, check_run, print_summary
from sim.policy import DEFAULT_POLICY_PATH
from sim.run import RunConfig, RunSummary, parse_duration, run_simulation
from sim.scenario import DEFAULT_SIM_START_MS

READY_MARKER = "gateway ready"
DEFAULT_GATEWAY_CONFIG = DEFAULT_CONFIG  # the demo always passes its own --state-dir


@dataclass
class DemoConfig:
    out_dir: Path
    vehicles: int = 20
    duration_s: float = 6 * 3600
    speedup: float = 240
    seed: int = 1
    multiplex: int = 0
    policy_path: Path = DEFAULT_POLICY_PATH
    gateway_config: Path = DEFAULT_GATEWAY_CONFIG
    gateway_command: list[str] | None = None  # default: python -m gateway run --config ...
    ready_timeout_s: float = 60.0
    live: bool = True
    report: bool = True


@dataclass
class DemoOutcome:
    result: CheckResult
    run: RunSummary
    report_path: Path | None
    gateway_log: Path
    gateway_exit_code: int | None = None
    notes: list[str] = field(default_factory=list)


class GatewayProcess:
    """The gateway as a child process; its stderr is copied to a log file and scanned
    for the readiness line."""

    def __init__(
        self, command: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.command = command
        self.log_path = log_path
        self.env = env or {}
        self.ready = threading.Event()
        self.tail: deque[str] = deque(maxlen=40)
        self.process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.process = subprocess.Popen(
            self.command,
            cwd=source_root(),  # the checkout, if any (else: where we are)
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # our Ctrl-C is handled by us, not delivered to it twice
        )
        self._reader = threading.Thread(target=self._copy_log, name="gateway-log", daemon=True)
        self._reader.start()

    def _copy_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with self.log_path.open("w", encoding="utf-8") as log:
            for raw in self.process.stdout:
                line = raw.decode("utf-8", "replace")
                log.write(line)
                log.flush()
                self.tail.append(line.rstrip())
                if READY_MARKER in line:
                    self.ready.set()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready.wait(0.1):
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with code {self.process.returncode} before it was ready:\n"
                    + "\n".join(self.tail)
                )
        raise TimeoutError(
            f"no '{READY_MARKER}' line from the gateway within {timeout_s:.0f}s:\n"
            + "\n".join(self.tail)
        )

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def kill(self) -> int | None:
        """kill -9, then reap the process: once this returns its state directory's
        lock is free (the kernel drops it when the process is gone)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def write_dpo_token(out: Path) -> tuple[str, Path]:
    """A dpo token of this run only: (the token, the control tokens file
    holding its hash) for the scenario's DPO (ownership changes, objections)."""
    token = secrets.token_urlsafe(32)
    tokens_file = out / "control-tokens.toml"
    tokens_file.write_text(
        '[[tokens]]\nname = "sim-dpo"\nrole = "dpo"\n'
        f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
    )
    tokens_file.chmod(0o600)
    return token, tokens_file


def gateway_command(
    config: DemoConfig,
    broker_url: str,
    state_dir: Path,
    clock_file: Path | None = None,
    control_port: int = 0,
) -> list[str]:
    base = config.gateway_command or [
        sys.executable,
        "-m",
        "gateway",
        "run",
        "--config",
        str(config.gateway_config),
        # A free port: the demo must not depend on 8080 being unused.
        "--control-listen",
        f"127.0.0.1:{control_port}",
    ]
    return [
        *base,
        "--vehicle-broker",
        broker_url,
        "--backend-broker",
        broker_url,
        "--state-dir",
        str(state_dir),
        *(["--simulated-clock", str(clock_file)] if clock_file is not None else []),
    ]


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoOutcome:
    console = console or Console(stderr=True)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "gateway-state"
    # A state directory from an earlier run would hold higher settings revisions for
    # the same VINs (same seed) and the gateway would rightly ignore ours.
    shutil.rmtree(state_dir, ignore_errors=True)
    log_path = out / "gateway.log"
    # The gateway runs on the fleet's compressed time: the fleet rewrites this mapping
    # when its clock starts; until then the gateway reads the provisional one.
    clock_file = out / "sim-clock.json"
    TimeMapping.frozen(DEFAULT_SIM_START_MS).write(clock_file)
    # The scenario's DPO (ownership changes, objections) uses the control API
    # with a token of this run only.
    control_port = free_port()
    token, tokens_file = write_dpo_token(out)
    own_command = config.gateway_command is None
    with MosquittoBroker() as broker:
        command = gateway_command(config, broker.url, state_dir, clock_file, control_port)
        console.print(f"mosquitto on {broker.url}; starting gateway: {shlex.join(command)}")
        gateway = GatewayProcess(
            command, log_path, {"GATEWAY_CONTROL__TOKENS_FILE": str(tokens_file)}
        )
        with gateway:
            gateway.wait_ready(config.ready_timeout_s)
            console.print("gateway ready; starting recorder and fleet")
            run_config = RunConfig(
                vehicles=config.vehicles,
                duration_s=config.duration_s,
                speedup=config.speedup,
                broker=broker.url,
                out_dir=out,
                seed=config.seed,
                multiplex=config.multiplex,
                policy_path=config.policy_path,
                live=config.live,
                clock_file=clock_file,
                control_url=f"http://127.0.0.1:{control_port}" if own_command else None,
                control_token=token if own_command else None,
            )
            summary = asyncio.run(run_simulation(run_config, console))
            exit_code = gateway.stop()
    console.print(f"gateway stopped (exit code {exit_code}); log: {log_path}")
    result = check_run(out, state_dir=state_dir, policy_path=config.policy_path)
    report_path: Path | None = None
    if config.report:
        from sim.report import write_report

        report_path = write_report(out, result)
    import json

    summary_json = result.summary_json()
    summary_json["issues"] = [issue.to_json() for issue in result.issues[:5000]]
    (out / CHECK_FILE).write_text(json.dumps(summary_json, indent=2))
    return DemoOutcome(result, summary, report_path, log_path, exit_code)


def demo_main(args: argparse.Namespace, console: Console) -> int:
    config = DemoConfig(
        out_dir=args.out,
        vehicles=args.vehicles,
        duration_s=parse_duration(args.duration),
        speedup=args.speedup,
        seed=args.seed,
        multiplex=args.multiplex,
        policy_path=args.policy,
        gateway_config=args.gateway_config or DEFAULT_GATEWAY_CONFIG,
        gateway_command=shlex.split(args.gateway_command) if args.gateway_command else None,
        ready_timeout_s=args.ready_timeout,
        live=not args.no_live,
    )
    try:
        outcome = run_demo(config, console)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 2
    print_summary(outcome.result, console)
    if outcome.report_path is not None:
        console.print(f"HTML report: {outcome.report_path}")
    return outcome.result.exit_code()
