"""Run the whole pipeline in memory (fleet + reference gateway + recorder), for tests.

Fast (no sockets, no subprocess) and independent of the real gateway, so the
simulator and the checker can be tested on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

from sim.membroker import MemoryBroker
from sim.policy import DEFAULT_POLICY_PATH, load_policy
from sim.reference_gateway import ReferenceGateway
from sim.run import RunConfig, RunSummary, run_simulation


async def run_in_memory_async(
    out_dir: Path,
    *,
    vehicles: int,
    duration_s: float,
    seed: int = 1,
    speedup: float = 3000.0,
    gateway: bool = True,
    multiplex: int = 0,
) -> tuple[RunSummary, bytes]:
    """Returns the run summary and the reference gateway's pseudonym key (also written to
    out_dir/state/pseudonym.key, where `sim check --state-dir` expects it)."""
    broker = MemoryBroker()
    key = hashlib.sha256(f"test-key:{seed}".encode()).digest()
    state = out_dir / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "pseudonym.key").write_bytes(key)
    task: asyncio.Task[None] | None = None
    reference: ReferenceGateway | None = None
    if gateway:
        reference = ReferenceGateway(
            load_policy(DEFAULT_POLICY_PATH), key, "memory", "memory", client_factory=broker.client
        )
        task = asyncio.create_task(reference.run())
        await reference.ready.wait()
    config = RunConfig(
        vehicles=vehicles,
        duration_s=duration_s,
        speedup=speedup,
        broker="memory",
        out_dir=out_dir,
        seed=seed,
        multiplex=multiplex,
        live=False,
        quiet_s=0.3,
        applied_timeout_s=5.0 if gateway else 0.05,
    )
    try:
        summary = await run_simulation(
            config,
            client_factory=broker.client,
            operator=reference.operate if reference is not None else None,
        )
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return summary, key


def run_in_memory(out_dir: Path, **kwargs: object) -> tuple[RunSummary, bytes]:
    return asyncio.run(run_in_memory_async(out_dir, **kwargs))  # type: ignore[arg-type]
