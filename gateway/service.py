"""The running gateway: edges -> decision core -> edges, with durable state.

Delivery guarantee (at least once): a message received from a broker is
acknowledged only when its outcome is final — forwarded and PUBACKed by the
destination broker, or deliberately dropped — and acknowledgements go out
in arrival order. A crash at any point leaves the message unacknowledged,
and the broker redelivers it to the restarted gateway.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import random
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway import compiled
from gateway.accounting import EgressAccounting
from gateway.budget import IngressBudget, RecentDigests, TokenBucket, WindowCounter
from gateway.config import BrokerAccess, GatewayConfig
from gateway.control.audit import AuditRecord
from gateway.core import (
    ApplySettings,
    DecisionContext,
    Drop,
    DropReason,
    Forward,
    Hold,
    LocationAnchor,
    VehicleState,
    decide,
    decide_command,
    decide_message,
    expire_find_my_car,
    refused_result,
    state_from_snapshot,
    with_find_my_car,
)
from gateway.core.capture import CaptureHistory, Interval, append
from gateway.core.decide import (
    CommandDecision,
    Egress,
    applied_message,
    split_command_topic,
    split_vehicle_topic,
)
from gateway.core.identity import (
    IdentityRow,
    app_scope,
    erasure_events,
    ownership_event,
    restriction_event,
)
from gateway.core.identity import subject as identity_subject
from gateway.core.state import is_valid_vin
from gateway.core.transforms import forget_addresses
from gateway.delivery import (
    RETRY_DELAYS_S,
    DeadLetter,
    DeadLetterKind,
    DeadLetterSeal,
    Outcome,
    is_transient,
    refusal_reason,
)
from gateway.edges.mqtt import InboundMessage, MqttEdge, PublishRefused
from gateway.logs import Throttle
from gateway.metrics import GatewayMetrics
from gateway.policy import (
    CompiledPolicy,
    PolicyError,
    VersionConflict,
    check_egress,
    parse_policy,
    version_key,
    vin_prefixes,
    widened_streams,
)
from gateway.store import ConsentStore, ParkedMessage, StoredPolicy
from gateway.store.sqlite import RESTRICTION_SOURCES

log = logging.getLogger("gateway.service")

T = TypeVar("T")
SETTINGS_STREAM = "avn/privacy"
COMMAND_REDRIVE_TTL_S = 300.0  # older dead-lettered commands are answered `expired`
ERASED_MEMORY_S = 3600.0  # far longer than anything stays in flight
CHECKED_VINS_MAX = 100_000  # VINs remembered as having nothing stored (then forgotten)
SUBJECTS_CACHED = 16_384  # VIN -> subject hashes remembered (then forgotten)
# Shared store: decisions of one message retried when another instance
# changed the car's anchor or find-my-car state first; then it is refused.
SHARED_STATE_ATTEMPTS = 3
_NO_OBJECTIONS: frozenset[str] = frozenset()
SUBJECTS_PER_READ = 500  # cars reloaded per store read (bounded statements)
# Shared: a parked message whose revision was applied longer ago than the
# longest release delay plus this is held by no instance (checked this often).
ORPHAN_GRACE_S = 60.0
ORPHAN_CHECK_S = 30.0
VEHICLE = "vehicle"
BACKEND = "backend"
ECALL = "ecall"  # the legal-obligation lane's vehicle-side connection
ECALL_BACKEND = "ecall-backend"


@dataclass(frozen=True, slots=True)
class Undeliverable:
    """What to keep if a publish ends up refused: the message to re-drive
    (the original for vehicle messages and commands, so a re-drive decides it
    again under the consent in force then) and how to file it."""

    kind: DeadLetterKind
    vin: str
    stream: str
    feature: str
    retention_days: float
    topic: str
    payload: bytes
    # A re-driven letter keeps its original expiry: re-driving never extends
    # how long personal data is kept.
    expires_at: float | None = None
    recipient: str = ""  # the one recipient refused, when the stream has several


class Settleable(Protocol):
    """Where a message's final outcome is reported (an ack-window slot, or a
    re-driven dead letter)."""

    @property
    def expires_at(self) -> float | None:
        """The expiry to keep if the message becomes a dead letter again."""

    def settle(self) -> None: ...

    def settle_with(self, outcome: Outcome) -> None: ...

    def release_budget(self) -> None: ...


class _Slot:
    """One received message awaiting its final outcome."""

    __slots__ = ("budgeted", "done", "generation", "mid", "qos", "size", "window")
    expires_at = None  # a new message: a dead letter gets the full retention

    def __init__(self, window: AckWindow, msg: InboundMessage) -> None:
        self.window = window
        self.mid = msg.mid
        self.qos = msg.qos
        self.generation = msg.generation
        self.size = len(msg.payload)
        self.budgeted = window.budget is not None
        self.done = False

    def settle(self) -> None:
        if self.done:
            return
        self.done = True
        self.window.release()
        self.release_budget()

    def release_budget(self) -> None:
        """Give the message's share of the ingress budget back before it is
        final: for a message whose last step is a publish on the vehicle
        connection itself (PrivacyApplied), whose PUBACK can only be read once
        that connection is read again. Holding the budget for it would pause
        reading for good."""
        if self.budgeted and self.window.budget is not None:
            self.budgeted = False
            self.window.budget.give(self.size)

    def settle_with(self, outcome: Outcome) -> None:
        """Delivered or dead-lettered: either way the message's fate is final."""
        self.settle()


class AckWindow:
    """Acknowledges received messages in arrival order once each is final.

    MQTT asks for PUBACKs in receive order; it also means an ack never
    overtakes an earlier message still in flight.
    """

    def __init__(self, edge: MqttEdge, budget: IngressBudget | None = None) -> None:
        self._edge = edge
        self.budget = budget  # given back as each message settles
        self._pending: deque[_Slot] = deque()
        self.drained = asyncio.Event()
        self.drained.set()

    def open(self, msg: InboundMessage) -> _Slot:
        slot = _Slot(self, msg)
        if not self._pending:  # `drained` is set exactly while nothing is pending
            self.drained.clear()
        self._pending.append(slot)
        return slot

    def release(self) -> None:
        pending = self._pending
        while pending and pending[0].done:
            slot = pending.popleft()
            self._edge.ack(slot.mid, slot.qos, slot.generation)
        if not pending:
            self.drained.set()

    def __len__(self) -> int:
        return len(self._pending)


class DecisionQueue:
    """What the decision loop takes in turn: messages from the edges'
    callbacks, operators' actions, and None to stop.

    A deque and one waiter. asyncio.Queue's bookkeeping (unfinished-task
    counts, an Event cleared on every put, putters woken on every get) cost
    ten calls per message; nothing here waits for room (the edges pause
    reading instead, see IngressBudget).
    """

    __slots__ = ("_waiter", "items")

    def __init__(self) -> None:
        self.items: deque[InboundMessage | ControlOp | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: InboundMessage | ControlOp | None) -> None:
        self.items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # done: its getter was cancelled
                waiter.set_result(None)

    async def wait(self) -> None:
        """Until something is queued (at once if something is). One waiter:
        the decision loop."""
        assert self._waiter is None or self._waiter.done(), "a second waiter"
        while not self.items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    def qsize(self) -> int:
        return len(self.items)

    def empty(self) -> bool:
        return not self.items


@dataclass(slots=True)
class ControlOp:
    """Work done by the decision loop between two messages (policy swap,
    restriction, erasure): no message is decided while it runs."""

    run: Callable[[], Awaitable[Any]]
    done: asyncio.Future[Any]


class GatewayService:
    def __init__(
        self,
        config: GatewayConfig,
        policy: CompiledPolicy,
        key: bytes,
        store: ConsentStore,
        *,
        clock: Callable[[], float] = time.time,
        internal_key: bytes | None = None,
        retired_keys: tuple[bytes, ...] = (),
    ) -> None:
        """`key` makes the pseudonyms that leave; `internal_key` (when the key
        was rotated: the first one) names cars in the store, seals what it
        holds and places the grid; `retired_keys` made pseudonyms the backend
        may still hold (erasure events name those refs too)."""
        self.config = config
        self.store = store
        self.metrics = GatewayMetrics(config.limits.metric_series)
        self.ctx = DecisionContext(
            policy=policy,
            key=key,
            vehicle_prefix=config.vehicle_broker.topic_prefix,
            backend_prefix=config.backend_broker.topic_prefix,
            capture_skew_s=config.pipeline.capture_skew_s,
            internal_key=internal_key,
        )
        self.retired_keys = retired_keys
        key = self.ctx.stable_key  # everything below is internal
        self.states: dict[str, VehicleState] = {}
        # Per vehicle, across units and streams (contract rule 13); durable.
        self.anchors: dict[str, LocationAnchor] = {}
        # Per car, the settings intervals applied (consent at capture time).
        self.histories: dict[str, CaptureHistory] = {}
        self._clock = clock
        self._queue = DecisionQueue()
        self.restricted: set[str] = set()
        # Features objected to per car (Art. 21), by subject: part of each state.
        self._objections: dict[str, frozenset[str]] = {}
        self.policy_record: StoredPolicy | None = None
        self._subjects: dict[str, str] = {}  # VIN -> subject, see audit_subject
        self._subjects_key: bytes | None = None
        self.accounting = EgressAccounting(
            lambda rows: self._persist(self.store.add_egress_counts, rows),
            lambda anchors: self._persist(
                self.store.save_anchors, {self.audit_subject(v): a for v, a in anchors.items()}
            ),
            subject=self.audit_subject,
        )
        # The store keys cars by subject (a keyed hash of the VIN, never the
        # VIN). What a start loads waits under the subject until the car's VIN
        # shows up (its first message or an operator request), then moves under
        # the VIN: one keyed hash per car per start, none per message after.
        self._unclaimed: set[str] = set()  # subjects loaded and not seen since
        self._claimed: dict[str, str] = {}  # VIN -> subject, seen since the load
        self._checked: set[str] = set()  # VINs looked for: nothing stored (bounded)
        self._seal = DeadLetterSeal(key)
        # Parked messages (held for a settings revision not applied yet).
        self._park_seal = DeadLetterSeal(key, b"parked-seal")
        self._parked_subjects: set[str] = set()  # cars that may have parked messages
        self._releasing: set[int] = set()  # parked ids released and not final yet
        self._parked_count = 0
        self._parked_bytes = 0
        self.metrics.parked_messages.set_function(lambda: float(self._parked_count))
        self.metrics.parked_bytes.set_function(lambda: float(self._parked_bytes))
        # The eCall lane subscribes to the streams of the policy it starts with.
        self._legal_streams = policy.legal_obligation_streams
        self._ecall_lane = config.pipeline.ecall_lane and bool(self._legal_streams)
        self._ecall_taken = RecentDigests(65536)  # eCalls the eCall lane has forwarded
        self._background: set[asyncio.Task[Any]] = set()
        self._redriving: set[int] = set()  # dead-letter ids whose re-drive is not final
        # Erased VINs (recently): messages decided before the erasure that
        # complete afterwards leave no count and no dead letter behind.
        self._erased: dict[str, float] = {}
        self._erasing: set[str] = set()  # VINs whose erasure is being written
        self._erasure_events_changed = asyncio.Event()
        limits = config.limits
        self._new_vehicles = TokenBucket(limits.new_vehicles_per_s, limits.new_vehicles_burst)
        self._settings_rate = WindowCounter(limits.settings_window_s)
        self._refusals = Throttle()
        self.ecall_vehicle_edge: MqttEdge | None = None
        self.ecall_backend_edge: MqttEdge | None = None
        self._store_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consent-store")
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self.ready = asyncio.Event()
        # The first retention purge of this start has run (ready waits for it:
        # what is past retention is gone before anything is served).
        self._purged_once = asyncio.Event()
        self.vehicle_edge: MqttEdge
        self.backend_edge: MqttEdge
        self._windows: dict[str, AckWindow] = {}
        # Read here so that an unreadable CA, key or password file refuses the
        # start (ConfigError); reload() replaces them for the next connection.
        access = config.broker_access()
        self._access = {VEHICLE: access["vehicle_broker"], BACKEND: access["backend_broker"]}
        self.metrics.set_policy(policy.version, policy.digest)
        # The configured policy file, when it is newer than the active policy:
        # offered to the operator (sign and push), never applied by itself.
        self._policy_file: tuple[str, str, str] | None = None  # version, digest, path
        self.store_writable = True  # false while a durable write keeps failing
        # One of several instances sharing the vehicle traffic and the store:
        # before a message is decided, what the others committed since the
        # last look is read (contract rule 21 across instances).
        group = config.vehicle_broker.shared_group
        self._shared = group is not None
        self._share = f"$share/{group}/" if group is not None else ""
        self._change_seq = 0  # position in the store's change log read up to
        self._caught_up_at = float("-inf")  # monotonic time the last look began
        # Shared: subject -> VIN of every car kept under its VIN, so a change
        # another instance made to a subject lands on the right entry.
        self._vins: dict[str, str] = {}
        self._halted = False  # shared: a policy another instance pushed cannot run here
        self.metrics.store_writable.set(1)
        self.metrics.ready.set_function(lambda: 1.0 if all(self.readiness().values()) else 0.0)

    # -------------------------------------------------------------- lifecycle

    def load_state(self) -> int:
        """Enforce the last applied settings before any message is decided."""
        if self._shared:
            # Taken before the load: a change committed meanwhile is read again.
            self._change_seq = self.store.change_position()
        policy = self.ctx.policy
        # Everything loaded is keyed by subject (the store never holds a VIN);
        # cars whose VIN was seen since the last load move back under it below.
        self.restricted = self.store.restricted_vins()
        self._objections = self.store.objections()
        book = self.ctx.identity
        book.rows = self.store.identities()
        states: dict[str, VehicleState] = {}
        # Contract rule 17: the commands-per-hour cap and spent fixes survive a restart.
        find_my_car = self.store.find_my_car_commands()
        now = self._clock()
        # Each car's history as its settings row gives it, for the cars whose
        # one history row mirrors it (see _load_histories).
        mirrored: dict[str, CaptureHistory] = {}
        for stored in self.store.load_all():
            snapshot = stored.snapshot
            subject = snapshot.vin
            plain = state_from_snapshot(policy, snapshot)
            mirrored[subject] = (
                Interval(snapshot.revision, snapshot.revision, snapshot.applied_at, plain),
            )
            state = (
                plain  # no window: the same state (window_until 0.0 is the default)
                if stored.window_until == 0.0
                else state_from_snapshot(policy, snapshot, stored.window_until)
            )
            erased = book.rows.get(subject)  # its epoch is set when its VIN is seen
            if erased is not None and erased.restricted:
                self.restricted.add(subject)
            if subject in self.restricted:
                state = dataclasses.replace(state, restricted=True)
            commands = find_my_car.get(subject)
            if commands:
                state = expire_find_my_car(with_find_my_car(state, commands), now, policy.window_s)
            states[subject] = self._with_objections(subject, state)
        self.states = states
        # Anchors do not depend on the policy: on a policy switch the ones set
        # since the last commit (still only in memory) must not fall back to
        # older stored ones, or the next message would refresh early (rule 13).
        # The same car's subject keys its state, its history and its anchor,
        # each read from its own row: one string, not three. Deduplicated by a
        # map dropped after the load, not sys.intern, whose table keeps an
        # entry per car for good (39 B a car).
        canonical = {subject: subject for subject in states}
        anchors = {canonical.get(s, s): a for s, a in self.store.load_anchors()}
        for key, anchor in self.anchors.items():
            subject = self._claimed.get(key, key)
            kept = anchors.get(subject)
            if kept is None or kept.refreshed_at < anchor.refreshed_at:
                anchors[subject] = anchor
        self.anchors = anchors
        self.histories = self._load_histories(self.states, canonical=canonical, mirrored=mirrored)
        del canonical, mirrored
        claimed, self._claimed = self._claimed, {}
        self._vins.clear()
        # Built key by key: a union (or update) with a sized collection
        # presizes the table as if every key were new, which for the same
        # subjects twice over doubles its memory per car.
        self._unclaimed = set(
            itertools.chain(self.states, self.anchors, self.histories, self.restricted)
        )
        self._checked.clear()
        for vin in claimed:
            self.claim(vin)
        self.metrics.vehicles.set(len(self.states))
        count, size, subjects = self.store.parked_stats()
        self._parked_count, self._parked_bytes, self._parked_subjects = count, size, subjects
        return len(self.states)

    def _load_histories(
        self,
        states: dict[str, VehicleState],
        subjects: Collection[str] | None = None,
        *,
        canonical: dict[str, str] | None = None,
        mirrored: dict[str, CaptureHistory] | None = None,
    ) -> dict[str, CaptureHistory]:
        """The capture-time intervals of every car (or of `subjects`), from the
        settings history (restriction periods included), compacted to the
        in-memory bound; `states`: the cars' states by subject; `canonical`:
        each of their keys by itself (the string the histories are keyed by).

        `mirrored` (a full load): every car's history as its settings row gives
        it when its one history row mirrors that row (filled in and returned):
        only the cars whose history is more than that are read, and those
        without any history row are taken out again."""
        if canonical is None:
            canonical = {subject: subject for subject in states}
        policy, limit = self.ctx.policy, self.config.limits.capture_intervals_per_vehicle
        histories: dict[str, CaptureHistory] = {} if mirrored is None else mirrored
        # (vin, revision) of the row before; None matches no car's key, not even "".
        previous: tuple[str | None, int] = (None, 0)
        latest_merged: set[str] = set()  # cars whose newest row folded settings in
        for row in self.store.capture_history(subjects, mirrors=mirrored is None):
            snapshot = row.snapshot
            vin = canonical.get(snapshot.vin, snapshot.vin)  # the states' key
            if mirrored is not None and vin != previous[0]:
                histories.pop(vin, None)  # its rows make its history, not its settings
            state = state_from_snapshot(policy, snapshot)
            if row.merged == 0 and snapshot.source == RESTRICTION_SOURCES[0]:
                state = dataclasses.replace(state, restricted=True)
            first = snapshot.revision
            if row.merged:
                # The revisions folded into it are not stored: every one after
                # the row before (inclusive: that one may be split by a restriction).
                # A car's oldest row covers only its own revision: what was folded
                # into it is unknown, so older revisions count as captured before
                # the known settings (fail closed), never as allowed by it.
                first = previous[1] if previous[0] == vin else snapshot.revision
            previous = (vin, snapshot.revision)
            if row.merged:
                latest_merged.add(vin)
            else:
                latest_merged.discard(vin)
            interval = Interval(first, snapshot.revision, snapshot.applied_at, state)
            histories[vin] = append(histories.get(vin), interval, limit)
        if mirrored is not None:
            for subject in self.store.settings_without_history(subjects):
                histories.pop(subject, None)
        # A latest row that folded in settings over the rate limit holds the
        # strictest of them under the current revision; the current revision's
        # own settings are known exactly (applied now): an interval of their own
        # from when they were applied, the merged one keeps the revisions before.
        merged_latest = {  # from the few merged cars, not every car's history
            vin
            for vin in latest_merged
            if (history := histories.get(vin)) is not None
            and (current := states.get(vin)) is not None
            and history[-1].revision == current.revision
        }
        if merged_latest or len(histories) < len(states):
            for stored in self.store.load_all(subjects):
                vin = canonical.get(stored.snapshot.vin, stored.snapshot.vin)
                current = states.get(vin)
                if current is None or (vin in histories and vin not in merged_latest):
                    continue
                # Settings without history rows (a store filled by other means)
                # are known from the time they were applied too.
                exact = Interval(
                    current.revision, current.revision, stored.snapshot.applied_at, current
                )
                older: CaptureHistory = ()
                if vin in merged_latest:
                    *before, last = histories[vin]
                    # The revisions folded in end just below the current one.
                    older = (
                        *before,
                        dataclasses.replace(
                            last,
                            first_revision=min(last.first_revision, current.revision - 1),
                            revision=current.revision - 1,
                        ),
                    )
                histories[vin] = (*older, exact)
        return histories

    def _record_policy(self) -> None:
        """Run the last accepted policy; on a first start, store the configured one.

        After a push or a rollback the store, not the configuration file, says
        which policy runs. Raises PolicyError when the stored one no longer
        validates (the gateway must not start on a policy it cannot check).
        """
        configured = self.ctx.policy
        active = self.store.active_policy()
        if active is not None:
            if active.digest != configured.digest:
                stored = parse_policy(active.yaml, source=f"stored policy {active.version}")
                self.check_egress(stored)
                self._set_policy(stored)
                log.info(
                    "running the last accepted policy %s (signed by %s)",
                    active.version,
                    active.signer,
                    extra={"policy_version": active.version},
                )
            else:
                self._set_policy(configured)  # what it widened since older versions
            self.policy_record = active
            return
        now = self._clock()
        record = StoredPolicy(
            configured.version, configured.digest, configured.text, "config", now, now, True
        )
        audit = AuditRecord(
            actor="gateway",
            action="policy_loaded",
            subject=configured.version,
            content={
                "version": configured.version,
                "digest": configured.digest,
                "source": "config file",
            },
            at=now,
        )
        try:
            self.store.save_policy(record, audit)
        except VersionConflict:
            # Instances of a group started together on an empty store: another
            # one recorded it first. Run what is stored, as on a later start.
            if self.store.active_policy() is None:
                raise
            self._record_policy()
            return
        self.policy_record = record

    def check_egress(self, policy: CompiledPolicy) -> None:
        """Raise PolicyError when a recipient's prefix is one of the gateway's own."""
        problems = check_egress(policy, self.ctx.vehicle_prefix, self.ctx.backend_prefix)
        if problems:
            raise PolicyError(f"policy {policy.version}", problems)

    def _set_policy(self, policy: CompiledPolicy) -> None:
        self.ctx = dataclasses.replace(
            self.ctx, policy=policy, consent_scopes=self._consent_scopes(policy)
        )
        self.metrics.set_policy(policy.version, policy.digest)

    def _consent_scopes(self, policy: CompiledPolicy) -> dict[str, frozenset[str]]:
        """Per stored version: what `policy` widened relative to it (a consent
        given under that version does not cover it)."""
        scopes: dict[str, frozenset[str]] = {}
        for stored in self.store.policies():
            if stored.version == policy.version:
                continue
            try:
                older = parse_policy(stored.yaml, source=f"stored policy {stored.version}")
            except PolicyError:
                # No longer readable: nothing it defined is known to be covered.
                older = None
            scopes[stored.version] = (
                widened_streams(policy, older)
                if older is not None
                else frozenset(s.key for s in policy.streams if s.legal_basis == "consent")
            )
        return scopes

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Keyed audit hashes; a store of schema < 8 is re-keyed (VINs -> subjects).
        key = self.ctx.stable_key
        await loop.run_in_executor(
            self._store_executor,
            self.store.attach_key,
            key,
            functools.partial(identity_subject, key),
        )
        await loop.run_in_executor(self._store_executor, self._record_policy)
        count = await loop.run_in_executor(self._store_executor, self.load_state)
        log.info("loaded applied settings of %d vehicles", count, extra={"vehicles": count})
        vcfg, bcfg, inflight = (
            self.config.vehicle_broker,
            self.config.backend_broker,
            self.config.pipeline.inflight,
        )
        self.vehicle_edge = MqttEdge(
            name=VEHICLE,
            endpoint=self._access[VEHICLE].endpoint,
            client_id=self.config.client_id(vcfg),
            subscriptions=[f"{self._share}{vcfg.topic_prefix}/#"],
            on_message=self._enqueue_vehicle_message,
            clean_start=False,  # persistent session: the broker queues while we are away
            session_expiry_s=vcfg.session_expiry_s or 86400,
            receive_maximum=inflight,
            max_inflight_publishes=inflight,
            keepalive_s=vcfg.keepalive_s,
            tls_context=self._access[VEHICLE].tls,
            tls_server_name=self._access[VEHICLE].server_name,
            tls_client_cert=self._access[VEHICLE].client_cert,
            on_state_change=self._edge_state,
        )
        self.backend_edge = MqttEdge(
            name=BACKEND,
            endpoint=self._access[BACKEND].endpoint,
            client_id=self.config.client_id(bcfg),
            subscriptions=[
                f"{self._share}{bcfg.topic_prefix}/+/cmd/+",
                f"{self._share}{bcfg.topic_prefix}/+/msg/+",
            ],
            on_message=self._queue.put_nowait,
            clean_start=bcfg.session_expiry_s == 0,
            session_expiry_s=bcfg.session_expiry_s,
            receive_maximum=inflight,
            max_inflight_publishes=inflight,
            keepalive_s=bcfg.keepalive_s,
            tls_context=self._access[BACKEND].tls,
            tls_server_name=self._access[BACKEND].server_name,
            tls_client_cert=self._access[BACKEND].client_cert,
            on_state_change=self._edge_state,
        )
        if self._ecall_lane:
            self._start_ecall_lane()
        self.budget = IngressBudget(
            inflight,
            self.config.pipeline.max_bytes,
            self.vehicle_edge.pause_reading,
            self.vehicle_edge.resume_reading,
        )
        budget = self.budget
        self.metrics.inflight_bytes.set_function(lambda: float(budget.bytes))
        self.metrics.ingress_paused.set_function(lambda: 1.0 if budget.paused else 0.0)
        for edge in self.edges:
            window = self._windows[edge.name] = AckWindow(
                edge, self.budget if edge is self.vehicle_edge else None
            )
            # Read when scraped: a gauge set on every acknowledgement takes a lock each time.
            self.metrics.inflight.labels(edge.name).set_function(window.__len__)
        self._tasks = [
            *(asyncio.create_task(e.run(), name=f"{e.name}-edge") for e in self.edges),
            asyncio.create_task(self._decide_loop(), name="decide-loop"),
            asyncio.create_task(self._announce_ready(), name="ready"),
            asyncio.create_task(self.accounting.run(), name="egress-counts"),
            asyncio.create_task(self._purge_dead_letters_periodically(), name="dead-letters"),
            asyncio.create_task(self._expire_parked_periodically(), name="parked-expiry"),
            asyncio.create_task(self._publish_erasure_events(), name="erasure-events"),
        ]
        if self._shared:
            self._tasks.append(
                asyncio.create_task(self._prune_changes_periodically(), name="change-log")
            )
        if self._shared:
            # Another live instance may be holding applied rows for their
            # release delay: only rows no instance holds are released.
            self._tasks.append(
                asyncio.create_task(self._release_orphans_periodically(), name="parked-orphans")
            )
        elif self._parked_count:
            self.spawn(self.run_control(self._release_applied_parked))

    @property
    def edges(self) -> list[MqttEdge]:
        edges = [self.backend_edge, self.vehicle_edge]
        if self.ecall_vehicle_edge is not None and self.ecall_backend_edge is not None:
            edges += [self.ecall_backend_edge, self.ecall_vehicle_edge]
        return edges

    def _start_ecall_lane(self) -> None:
        """Legal-obligation streams (eCall) get their own connections, ack window
        and retries: no backlog of ordinary traffic, no outage queue, no control
        operation and no store write stands in their way. The ordinary lane
        receives its own copy too: it drops it (counted as `ecall_lane`) when the
        eCall lane has taken the same message, and forwards it otherwise (an eCall
        published before the eCall lane's session existed, e.g. during the
        upgrade to this version, reaches only the ordinary lane). So eCall is
        delivered at least once, sometimes twice; never lost."""
        vcfg, bcfg = self.config.vehicle_broker, self.config.backend_broker
        topics = sorted(f"{vcfg.topic_prefix}/+/{key}" for key in self._legal_streams)
        self.ecall_backend_edge = MqttEdge(
            name=ECALL_BACKEND,
            endpoint=self._access[BACKEND].endpoint,
            client_id=f"{self.config.client_id(bcfg)}-ecall",
            subscriptions=[],
            on_message=lambda msg: None,
            clean_start=True,
            tls_context=self._access[BACKEND].tls,
            tls_server_name=self._access[BACKEND].server_name,
            tls_client_cert=self._access[BACKEND].client_cert,
            max_inflight_publishes=self.config.pipeline.inflight,
            keepalive_s=bcfg.keepalive_s,
            on_state_change=self._edge_state,
        )
        self.ecall_vehicle_edge = MqttEdge(
            name=ECALL,
            endpoint=self._access[VEHICLE].endpoint,
            client_id=f"{self.config.client_id(vcfg)}-ecall",
            subscriptions=topics,
            on_message=self._handle_ecall,
            clean_start=False,
            tls_context=self._access[VEHICLE].tls,
            tls_server_name=self._access[VEHICLE].server_name,
            tls_client_cert=self._access[VEHICLE].client_cert,
            session_expiry_s=vcfg.session_expiry_s or 86400,
            receive_maximum=self.config.pipeline.inflight,
            keepalive_s=vcfg.keepalive_s,
            on_state_change=self._edge_state,
        )

    def reload_brokers(self, access: dict[str, BrokerAccess]) -> None:
        """New TLS material and passwords (`GatewayConfig.broker_access`),
        used from each edge's next connection on: connections in place are
        kept, and nothing in flight is touched."""
        sides = {
            "vehicle_broker": (self.vehicle_edge, self.ecall_vehicle_edge),
            "backend_broker": (self.backend_edge, self.ecall_backend_edge),
        }
        for name, edges in sides.items():
            new = access[name]
            for edge in edges:
                if edge is None:
                    continue
                if new.tls is not None and edge.endpoint.tls:
                    edge.set_tls(new.tls, new.server_name, new.client_cert)
                edge.set_password(new.endpoint.password)

    def offer_policy(self, policy: CompiledPolicy, path: str) -> None:
        """Note the configured policy file; if it is newer than the active
        policy, say so (it is applied only when signed and pushed)."""
        self._policy_file = (policy.version, policy.digest, path)
        offered = self.offered_policy()
        if offered is not None:
            log.warning(
                "policy file %s has version %s newer than the active %s: sign and push it to apply",
                path,
                policy.version,
                self.ctx.policy.version,
                extra={"offered_version": policy.version},
            )

    def offered_policy(self) -> dict[str, str] | None:
        """The configured policy file while it is newer than the active policy."""
        if self._policy_file is None:
            return None
        version, digest, path = self._policy_file
        if version_key(version) <= version_key(self.ctx.policy.version):
            return None
        return {"version": version, "digest": digest, "path": path}

    def _handle_ecall(self, msg: InboundMessage) -> None:
        """The legal-obligation lane: decided on receipt (pure, no store, no queue)."""
        assert self.ecall_backend_edge is not None
        self.metrics.inc(self.metrics.received, ECALL)
        slot = self._windows[ECALL].open(msg)
        try:
            decision = decide(self.ctx, msg.topic, msg.payload, {}, {}, self._clock())
        except Exception:
            log.exception("internal error deciding %s", self.log_topic(msg.topic))
            self.metrics.internal_errors.inc()
            slot.settle()
            return
        if not isinstance(decision, Forward):
            reason = decision.reason.value if isinstance(decision, Drop) else "not_a_stream"
            self.metrics.inc(self.metrics.dropped, "ecall", reason)
            slot.settle()
            return
        self._ecall_taken.add(_digest(msg))
        self.metrics.forwarded_message(decision.stream, decision.feature, ())
        key = self._count_key(decision)
        self._deliver(
            self.ecall_backend_edge,
            decision.topic,
            decision.payload,
            decision.user_properties,
            lambda outcome: self._settle_forward(outcome, key, slot, wait_for_count=False),
            self._undeliverable(DeadLetterKind.VEHICLE, decision, msg),
        )

    def _enqueue_vehicle_message(self, msg: InboundMessage) -> None:
        self._queue.put_nowait(msg)
        self.budget.take(len(msg.payload))

    def readiness(self) -> dict[str, bool]:
        """Readiness as last known: every broker connection (the eCall lane's too)
        connected and subscribed, the
        store accepting writes, a policy loaded (/readyz adds a test write)."""
        vehicle = getattr(self, "vehicle_edge", None)  # set by start()
        backend = getattr(self, "backend_edge", None)
        ecall = [e for e in (self.ecall_vehicle_edge, self.ecall_backend_edge) if e is not None]
        return {
            "vehicle_broker": vehicle is not None and vehicle.ready.is_set(),
            "backend_broker": backend is not None and backend.ready.is_set(),
            "ecall_lane": all(e.ready.is_set() for e in ecall),
            "policy_loaded": self.ctx.policy is not None,
            "store_writable": self.store_writable,
        }

    async def _announce_ready(self) -> None:
        for edge in self.edges:
            await edge.ready.wait()
        await self._purged_once.wait()
        self.ready.set()
        log.info(
            "gateway ready: policy %s, %d known vehicles, decision core and MQTT codec %s",
            self.ctx.policy.version,
            len(self.states),
            "compiled" if compiled.active() else "as Python",
            extra={"policy_version": self.ctx.policy.version},
        )

    async def stop(self) -> None:
        """Finish what is in flight (bounded), then disconnect.

        Messages not yet decided stay unacknowledged: the broker keeps them
        for the next start.
        """
        if self._stopping:
            return
        if self._shared and self._windows:
            await self._leave_share_group()
        self._stopping = True
        self._queue.put_nowait(None)
        timeout = self.config.pipeline.drain_timeout_s
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.drained.wait() for w in self._windows.values())), timeout
            )
        except TimeoutError:
            log.warning("stopping with messages still in flight (they will be redelivered)")
        for edge in self.edges:
            await edge.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._background:  # dead letters being filed, re-driven letters being removed
            await asyncio.wait(self._background, timeout=timeout or None)
        await self.accounting.flush()
        self._store_executor.shutdown(wait=True)
        self.store.close()
        log.info("gateway stopped", extra=self.summary())

    async def _leave_share_group(self, quiet_s: float = 0.5) -> None:
        """Scale-in strands nothing: UNSUBSCRIBE first, so the broker gives new
        messages to the other members (also from this member's persistent
        session), then decide and settle what it had sent here already, until
        nothing has arrived for `quiet_s` (bounded by the drain timeout)."""
        timeout = self.config.pipeline.drain_timeout_s or 30.0
        deadline = time.monotonic() + timeout
        edges = [self.vehicle_edge, self.backend_edge]
        if self.ecall_vehicle_edge is not None:
            # Plain, not shared: left too, or its persistent session would
            # queue every eCall for an instance that may never return.
            edges.append(self.ecall_vehicle_edge)
        for edge in edges:
            if not await edge.unsubscribe_all(timeout):
                log.warning("%s broker did not confirm leaving the shared group", edge.name)
        quiet_since = time.monotonic()
        while not self._halted and (now := time.monotonic()) < deadline:
            await asyncio.sleep(0.05)
            if not self._queue.empty() or any(len(w) for w in self._windows.values()):
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                log.info("left the shared group; nothing left in flight")
                return
        log.warning(
            "left the shared group with messages still in flight: the broker keeps them in"
            " this instance's session until an instance with the same id connects"
        )

    def summary(self) -> dict[str, float]:
        m = self.metrics
        return {
            "received": sum(
                m.value("gateway_messages_received_total", source=s)
                for s in (VEHICLE, BACKEND, ECALL)
            ),
            "settings_applied": m.value("gateway_settings_applied_total"),
            "internal_errors": m.value("gateway_internal_errors_total"),
        }

    def _edge_state(self, name: str, connected: bool) -> None:
        self.metrics.connected.labels(name).set(1 if connected else 0)

    # ---------------------------------------------------------------- pipeline

    async def _decide_loop(self) -> None:
        edges = {VEHICLE: self.vehicle_edge, BACKEND: self.backend_edge}
        queue = self._queue
        items = queue.items
        while True:
            if not items:
                await queue.wait()
            msg = items.popleft()
            if msg is None or self._stopping:
                return
            if isinstance(msg, ControlOp):
                try:
                    if self._shared:
                        # An operator's action starts from what every instance
                        # committed (a restriction made elsewhere survives an
                        # erasure made here; the epoch is the current one).
                        self._caught_up_at = float("-inf")
                        # With the store down the operation fails (the caller
                        # is told) instead of waiting for ever.
                        await self._catch_up(once=True)
                    msg.done.set_result(await msg.run())
                except Exception as exc:
                    msg.done.set_exception(exc)
                continue
            if self._halted or msg.generation != edges[msg.source].generation:
                # Received over a lost connection: the broker redelivers it.
                if msg.source == VEHICLE:
                    self.budget.give(len(msg.payload))
                continue
            self.metrics.inc(self.metrics.received, msg.source)
            slot = self._windows[msg.source].open(msg)
            try:
                if msg.source == VEHICLE:
                    await self._handle_vehicle_message(msg, slot)
                else:
                    await self._handle_command(msg, slot)
            except _Halted:
                continue  # not decided, not acknowledged: the broker redelivers it
            except Exception:
                # A bug must not wedge the pipeline with a poison message:
                # nothing was forwarded (fail closed); count it and go on.
                log.exception("internal error deciding %s", self.log_topic(msg.topic))
                self.metrics.internal_errors.inc()
                if not slot.done:
                    slot.settle()

    async def _handle_vehicle_message(
        self,
        msg: InboundMessage,
        slot: Settleable,
        *,
        redriven: bool = False,
        only_recipient: str = "",
    ) -> None:
        if self._shared and msg.received >= self._caught_up_at:
            await self._catch_up()
        if self._unclaimed:
            self._claim_topic(msg.topic)
        conflicts = 0
        while True:
            started = time.perf_counter()
            now = self._clock()
            decision = decide(
                self.ctx,
                msg.topic,
                msg.payload,
                self.states,
                self.anchors,
                now,
                histories=self.histories,
            )
            self.metrics.decision_seconds.observe(time.perf_counter() - started)
            if (
                not self._shared
                or not isinstance(decision, Forward)
                or (decision.anchor is None and decision.state is None)
                or await self._claimed_shared(decision)
            ):
                break
            # Another instance refreshed the car's anchor or spent a fix of its
            # command first: decide again with what it stored.
            conflicts += 1
            if conflicts >= SHARED_STATE_ATTEMPTS:
                self._refuse("shared_state_conflict", decision.stream, self._clock())
                slot.settle()
                return
        if isinstance(decision, Forward):
            if (
                self._ecall_lane
                and not redriven
                and decision.stream in self._legal_streams
                and _digest(msg) in self._ecall_taken
            ):
                # The eCall lane forwards its own copy; this one is only acknowledged.
                self.metrics.inc(self.metrics.dropped, decision.stream, "ecall_lane")
                slot.settle()
                return
            if decision.state is not None:
                # A find-my-car fix spends its command's budget durably before
                # it leaves: a restart never forwards it twice (fail closed).
                if not self._shared:  # shared: stored by _claimed_shared
                    await self._persist(
                        self.store.save_find_my_car,
                        self.audit_subject(decision.vin),
                        decision.state.find_my_car,
                        decision.state.window_until,
                    )
                self.states[decision.vin] = decision.state
            if decision.anchor is not None:
                self.anchors[decision.vin] = decision.anchor
                if not self._shared:  # shared: stored by _claimed_shared, before it leaves
                    self.accounting.anchor(decision.vin, decision.anchor)
            if not only_recipient:
                # One message, however many recipients: a re-driven copy for
                # one of them was counted with the message (it is not counted
                # at all when every copy was refused and is re-driven one by
                # one: the one undercount we accept).
                self.metrics.forwarded_message(
                    decision.stream, decision.feature, decision.transforms
                )
            key = self._count_key(decision, now)  # counted on the day it was decided
            if not decision.also and not only_recipient:
                self._deliver(
                    self.backend_edge,
                    decision.topic,
                    decision.payload,
                    decision.user_properties,
                    lambda outcome: self._settle_forward(outcome, key, slot),
                    lambda: self._undeliverable(
                        DeadLetterKind.VEHICLE, decision, msg, slot.expires_at
                    ),
                )
                return
            copies = [
                Egress(
                    decision.recipient, decision.topic, decision.payload, decision.user_properties
                ),
                *decision.also,
            ]
            if only_recipient:
                # A re-driven letter of one recipient: only its copy, if the
                # stream still goes there.
                copies = [c for c in copies if c.recipient == only_recipient]
                if not copies:
                    self.metrics.inc(self.metrics.dropped, decision.stream, "recipient_removed")
                    slot.settle()
                    return
            join = _AllCopies(
                len(copies),
                slot.settle_with
                if only_recipient
                else lambda outcome: self._settle_forward(outcome, key, slot),
            )
            for copy in copies:
                letter = self._undeliverable(DeadLetterKind.VEHICLE, decision, msg, slot.expires_at)
                self._deliver(
                    self.backend_edge,
                    copy.topic,
                    copy.payload,
                    copy.user_properties,
                    join.done,
                    dataclasses.replace(letter, recipient=copy.recipient),
                )
        elif isinstance(decision, Drop):
            self.metrics.inc(self.metrics.dropped, decision.stream, decision.reason.value)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("drop %s: %s", self.log_topic(msg.topic), decision.reason)
            if decision.reannounce is not None:
                topic, body = decision.reannounce
                slot.release_budget()  # its last step is a publish on the vehicle connection
                self._deliver(
                    self.vehicle_edge,
                    topic,
                    body,
                    (),
                    slot.settle_with,
                    self._egress_letter(
                        decision.vin, "avn/privacy/applied", topic, body, slot.expires_at
                    ),
                )
            else:
                slot.settle()
        elif isinstance(decision, Hold):
            if isinstance(slot, _ParkedSlot):  # released too early: stays parked
                slot.keep()
                return
            if not await self._park(decision, msg, slot):
                # Applied meanwhile by another instance: decided with it now.
                await self._reload_cars({self.audit_subject(decision.vin)}, frozenset())
                self.claim(decision.vin)  # reloaded under its subject if never seen here
                state = self.states.get(decision.vin)
                if state is not None and state.revision >= decision.revision:
                    await self._handle_vehicle_message(
                        msg, slot, redriven=redriven, only_recipient=only_recipient
                    )
                else:  # never expected: the store said it is applied
                    self.metrics.inc(self.metrics.dropped, decision.stream, "settings_pending")
                    slot.settle()
        elif isinstance(decision, ApplySettings):
            vin, now = decision.snapshot.vin, self._clock()
            if vin not in self.states and not self._new_vehicles.allow(now):
                # A flood of made-up VINs costs a durable write each: refused
                # (the car is still unknown, so fail closed) and retried by it.
                self._refuse("new_vehicle_rate", SETTINGS_STREAM, now)
                slot.settle()
                return
            merge = self._settings_rate.count(vin, now) > self.config.limits.settings_per_vehicle
            await self._apply_settings(decision, slot, merge)

    def _refuse(self, reason: str, stream: str, now: float) -> None:
        self.metrics.inc(self.metrics.dropped, stream, reason)
        count = self._refusals.due(reason, now)
        if count is not None:
            log.warning("refused %d message(s) of %s: %s", count, stream, reason)

    async def _apply_settings(
        self, decision: ApplySettings, slot: Settleable, merge: bool = False
    ) -> None:
        snapshot = decision.snapshot
        if decision.ignored_features:
            self.metrics.settings_ignored_features.inc(decision.ignored_features)
        if merge:
            self.metrics.settings_merged.inc()
        record = AuditRecord(
            actor="vehicle",
            action="settings_applied",
            subject=self.audit_subject(snapshot.vin),
            content={  # the subject names the car: no VIN in the store
                "revision": snapshot.revision,
                "privacy_mode": snapshot.privacy_mode,
                "location": snapshot.location.name,
                "features": snapshot.features,
                "policy_version": snapshot.policy_version,
            },
            at=snapshot.applied_at,
        )
        # Durable before it is announced and before the next message is decided.
        await self._persist(
            self.store.apply_settings,
            dataclasses.replace(snapshot, vin=record.subject),
            record,
            merge,
        )
        state = decision.state
        self._bind(snapshot.vin, record.subject)
        if snapshot.vin not in self.states:
            self._claimed[snapshot.vin] = record.subject
            erased = self.ctx.identity.row(self.ctx.stable_key, snapshot.vin)
            if erased is not None:  # back after an erasure: its epoch, its restriction
                self.ctx.identity.learn(snapshot.vin, erased)
                if erased.restricted:
                    self.restricted.add(snapshot.vin)
        if snapshot.vin in self.restricted and not state.restricted:
            state = dataclasses.replace(state, restricted=True)
        state = self._with_objections(record.subject, state)
        self.states[snapshot.vin] = state
        self._add_interval(snapshot.vin, snapshot.revision, snapshot.applied_at, state)
        self.metrics.settings_applied.inc()
        self.metrics.vehicles.set(len(self.states))
        log.info(
            "settings applied",
            extra={
                "vehicle": self.log_ref(snapshot.vin),
                "revision": snapshot.revision,
                "privacy_mode": snapshot.privacy_mode,
                "location": snapshot.location.name,
            },
        )
        slot.release_budget()  # its last step is a publish on the vehicle connection
        self._deliver(
            self.vehicle_edge,
            decision.applied_topic,
            decision.applied_payload,
            (),
            slot.settle_with,
            self._egress_letter(
                snapshot.vin,
                "avn/privacy/applied",
                decision.applied_topic,
                decision.applied_payload,
                slot.expires_at,
            ),
        )
        await self._release_parked(snapshot.vin, snapshot.revision)

    def _add_interval(self, vin: str, revision: int, since: float, state: VehicleState) -> None:
        self.histories[vin] = append(
            self.histories.get(vin),
            Interval(revision, revision, since, state),
            self.config.limits.capture_intervals_per_vehicle,
        )

    # ----------------------------------------------------- shared consent state

    async def _catch_up(self, once: bool = False) -> None:
        """Read what other instances committed since the last look (one round
        trip when nothing changed) and reload those cars, before a message
        received after the last look is decided: whatever was committed before
        the broker sent the message is then enforced on it (contract rule 21
        with several instances). The store being unreachable holds the pipeline
        (`_persist`): nothing is decided on a view that may be stale. `once`
        (an operator's action): a store error fails it instead of waiting.

        A look that did not complete (an error, a cancellation) does not
        count: the next message looks again."""
        if self._halted:
            raise _Halted
        started = time.monotonic()
        self._caught_up_at = started
        persist = self._persist_once if once else self._persist
        try:
            changes = await persist(self.store.changes_since, self._change_seq)
            if changes.resync:
                log.warning("fell behind the shared store's change log: reloading every car")
                await self._adopt_stored_policy(reload=True)
                return
            if changes.policy:
                await self._adopt_stored_policy()
            if changes.states or changes.anchors:
                await self._reload_cars(changes.states, changes.anchors, once)
            self._change_seq = max(self._change_seq, changes.seq)
        except BaseException:
            self._caught_up_at = float("-inf")
            raise

    async def _adopt_stored_policy(self, reload: bool = False) -> None:
        """Run the policy another instance pushed or rolled back to."""
        active = await self._persist(self.store.active_policy)
        if active is not None and active.digest != self.ctx.policy.digest:
            try:
                policy = parse_policy(active.yaml, source=f"stored policy {active.version}")
                self.check_egress(policy)
            except PolicyError as exc:
                # Deciding on with the old policy could allow what the new one
                # forbids: stop (fail closed); the start refuses it loudly.
                log.critical(
                    "cannot run policy %s another instance pushed: %s", active.version, exc
                )
                self._halted = True  # nothing more is decided, not even while draining
                os.kill(os.getpid(), signal.SIGTERM)
                raise _Halted from exc
            await self._switch_policy(policy, active, reload=True)
        elif reload:
            await self._persist(self.load_state)  # retried, holding the pipeline

    async def _reload_cars(
        self, subjects: Collection[str], anchored: Collection[str], once: bool = False
    ) -> None:
        """Replace what is held of these cars by what the shared store holds."""
        persist = self._persist_once if once else self._persist
        loaded = await persist(self._load_cars, frozenset(subjects), frozenset(anchored))
        book = self.ctx.identity
        for subject in loaded.subjects:
            key = self._vins.get(subject, subject)
            state = loaded.states.get(subject)
            if state is None:
                self.states.pop(key, None)
            else:
                self.states[key] = state
            history = loaded.histories.get(subject)
            if history is None:
                self.histories.pop(key, None)
            else:
                self.histories[key] = history
            self.restricted.discard(key)
            if subject in loaded.restricted:
                self.restricted.add(key)
            objected = loaded.objections.get(subject)
            if objected:
                self._objections[subject] = objected
            else:
                self._objections.pop(subject, None)
            row = loaded.identities.get(subject)
            if row is not None:
                book.rows[subject] = row
                if key != subject:
                    book.learn(key, row)
            if key == subject:
                # Its VIN was not seen here yet: claimed when it shows up.
                if state is not None or history is not None or subject in loaded.restricted:
                    self._unclaimed.add(subject)
                    self._checked.clear()
            elif state is None:
                # Erased, or a new owner, on another instance.
                self.anchors.pop(key, None)
                self.accounting.forget(key)
        for subject in loaded.anchored:
            key = self._vins.get(subject, subject)
            anchor = loaded.anchors.get(subject)
            if anchor is None:
                self.anchors.pop(key, None)  # erased, or a new owner
            else:
                # The store's: every anchor of a shared store is claimed there
                # before it is used, so it is never behind this instance's.
                self.anchors[key] = anchor
                if key == subject:
                    self._unclaimed.add(subject)
                    self._checked.clear()
        self.metrics.vehicles.set(len(self.states))

    def _load_cars(self, subjects: frozenset[str], anchored: frozenset[str]) -> _LoadedCars:
        """What the store holds of these cars, as of one moment (an ownership
        change between two reads would pair the new owner's settings with
        the previous owner's epoch); in the store's thread, reads only."""
        with self.store.read_snapshot():
            return self._load_cars_now(subjects, anchored)

    def _load_cars_now(self, subjects: frozenset[str], anchored: frozenset[str]) -> _LoadedCars:
        policy, now = self.ctx.policy, self._clock()
        loaded = _LoadedCars(subjects, anchored)
        ordered = sorted(subjects)
        for start in range(0, len(ordered), SUBJECTS_PER_READ):
            chunk = ordered[start : start + SUBJECTS_PER_READ]
            restricted = self.store.restricted_vins(chunk)
            identities = self.store.identities(chunk)
            restricted |= {s for s, row in identities.items() if row.restricted}
            commands = self.store.find_my_car_commands(chunk)
            objections = self.store.objections(chunk)
            states: dict[str, VehicleState] = {}
            for stored in self.store.load_all(chunk):
                subject = stored.snapshot.vin
                state = state_from_snapshot(policy, stored.snapshot, stored.window_until)
                if subject in restricted:
                    state = dataclasses.replace(state, restricted=True)
                if subject in commands:
                    state = expire_find_my_car(
                        with_find_my_car(state, commands[subject]), now, policy.window_s
                    )
                if subject in objections:
                    state = dataclasses.replace(state, objected=objections[subject])
                states[subject] = state
            loaded.states.update(states)
            loaded.histories.update(self._load_histories(states, chunk))
            loaded.restricted |= restricted
            loaded.identities.update(identities)
            loaded.objections.update(objections)
        chosen = sorted(anchored)
        for start in range(0, len(chosen), SUBJECTS_PER_READ):
            loaded.anchors.update(
                self.store.load_anchors(chosen[start : start + SUBJECTS_PER_READ])
            )
        return loaded

    async def _claimed_shared(self, decision: Forward) -> bool:
        """Store what forwarding `decision` spends (a refreshed anchor, a fix of
        a find-my-car command) unless another instance changed it since this
        one last looked: rule 13's one refresh per interval and rule 17's fix
        budget hold across instances. False: decide again (reloaded)."""
        subject = self.audit_subject(decision.vin)
        if decision.anchor is not None:
            previous = self.anchors.get(decision.vin)
            stored = await self._persist(
                self.store.claim_anchor,
                subject,
                None if previous is None else previous.refreshed_at,
                decision.anchor,
            )
            if stored is not None:
                self.anchors[decision.vin] = stored
                return False
            self.anchors[decision.vin] = decision.anchor
        if decision.state is not None and not await self._persist(
            self.store.save_find_my_car,
            subject,
            decision.state.find_my_car,
            decision.state.window_until,
            self._change_seq,
        ):
            self._caught_up_at = float("-inf")
            await self._catch_up()  # reloads it and moves past the other's change
            return False
        return True

    async def _stored_survivor(self, subject: str, survivor: IdentityRow) -> IdentityRow:
        """Shared: what the store kept of an erased car (it never weakens what
        another instance stored: a restriction, a later epoch or revision)."""
        if not self._shared:
            return survivor  # the store wrote exactly this (no other writer)
        # The erasure is committed: retried until read (fail closed), so this
        # instance's memory never keeps a weaker row than the store's.
        stored = await self._persist(self.store.identities, [subject])
        return stored.get(subject, survivor)

    def _bind(self, vin: str, subject: str) -> None:
        """Shared: `vin`'s entries are kept under its VIN (see `_vins`)."""
        if self._shared:
            self._vins[subject] = vin

    async def _prune_changes_periodically(self, interval: float = 60.0) -> None:
        prune = getattr(self.store, "prune_changes", None)
        while prune is not None:
            await asyncio.sleep(interval)
            try:
                await self._persist_once(prune)
            except Exception as exc:
                log.warning("pruning the shared store's change log failed: %s", exc)

    # ------------------------------------------------------------ parked messages

    async def _park(self, decision: Hold, msg: InboundMessage, slot: Settleable) -> bool:
        """Keep a message stating a revision not applied yet (contract rule 12):
        sealed in the store, acknowledged once durable (never in the ack window
        waiting for settings), released when that revision is applied. False
        (nothing done) when the store has that revision: another instance
        applied it after this one last looked."""
        now = self._clock()
        hold_max = self.config.pipeline.hold_max_s
        if hold_max <= 0:
            self.metrics.inc(self.metrics.dropped, decision.stream, "settings_pending")
            slot.settle()
            return True
        subject = self.audit_subject(decision.vin)
        expires_at = now + hold_max
        if slot.expires_at is not None:  # a re-driven dead letter keeps its expiry
            expires_at = min(expires_at, slot.expires_at)
        row = ParkedMessage(
            subject=subject,
            revision=decision.revision,
            parked_at=now,
            expires_at=expires_at,
            stream=decision.stream,
            size=len(msg.payload),
            sealed=self._park_seal.seal(msg.topic, msg.payload, subject),
        )
        pipeline = self.config.pipeline
        result = await self._persist(
            self.store.park, row, pipeline.parked_bytes_per_vehicle, pipeline.parked_bytes
        )
        if result.applied:
            return False
        self.metrics.inc(self.metrics.parked, decision.stream)
        self._parked_subjects.add(subject)
        self._parked_count += 1
        self._parked_bytes += row.size
        for _, stream, size in result.evicted:
            self._parked_count -= 1
            self._parked_bytes -= size
            self._refuse(DropReason.PARKED_EVICTED.value, stream, now)
        slot.settle()
        return True

    async def _release_parked(self, vin: str, revision: int) -> None:
        """Decide again, in order, a car's messages parked for `revision` or
        older, now that it is applied (in the decision loop, like any message)."""
        subject = self.audit_subject(vin)
        if subject not in self._parked_subjects and not self._shared:
            # Shared: another instance may have parked some (the store says).
            return
        rows = await self._persist(self.store.parked, subject)
        ready = [r for r in rows if r.revision <= revision]
        if len(ready) == len(rows):
            self._parked_subjects.discard(subject)
        await self._release(ready)

    async def _release(self, rows: list[ParkedMessage]) -> None:
        """Release VIN-keyed rows now and a car's app (pseudonymized) rows after
        a random delay of their own: one burst of both would pair the app's
        pseudonym with the VIN by timing (rule 15). Delayed rows stay parked
        (a restart releases them at start) and are spared from expiry meanwhile."""
        now = self._clock()
        rows = [r for r in rows if r.id not in self._releasing]
        pipeline = self.config.pipeline
        later = [r for r in rows if self._pseudonymized_stream(r.stream)]
        if later and pipeline.parked_app_release_max_delay_s > 0:
            rows = [r for r in rows if not self._pseudonymized_stream(r.stream)]
            delay = random.SystemRandom().uniform(
                pipeline.parked_app_release_min_delay_s, pipeline.parked_app_release_max_delay_s
            )
            self._releasing.update(r.id for r in later)
            self.spawn(self._release_later(later, now + delay, now))
        await self._release_now(rows, now)

    def _pseudonymized_stream(self, stream: str) -> bool:
        return any(
            s.key == stream and any(r.pseudonymize_vin for r in s.routes)
            for s in self.ctx.policy.streams
        )

    async def _release_later(self, rows: list[ParkedMessage], due: float, released: float) -> None:
        while (remaining := due - self._clock()) > 0:
            await asyncio.sleep(min(remaining, 1.0))
        self._releasing.difference_update(r.id for r in rows)
        try:
            await self.run_control(functools.partial(self._release_now, rows, released))
        except Exception:
            log.exception("releasing parked app messages failed; the next start releases them")

    async def _release_now(self, rows: list[ParkedMessage], now: float) -> None:
        """Decide parked rows again; `now`: when their revision was applied (a
        delayed row does not expire waiting for its own delay)."""
        for row in rows:
            if row.id in self._releasing:
                continue
            self._releasing.add(row.id)
            slot = _ParkedSlot(self, row)
            if row.expires_at <= now:
                self.metrics.inc(self.metrics.dropped, row.stream, "settings_pending")
                slot.settle()
                continue
            try:
                topic, payload = self._park_seal.open(row.sealed, row.subject)
            except ValueError:
                log.error("parked message %d does not open with the current key", row.id)
                self.metrics.internal_errors.inc()
                slot.settle()
                continue
            msg = InboundMessage("parked", topic, payload, 1, 0, 0)
            try:
                await self._handle_vehicle_message(msg, slot)
            except _Halted:
                slot.keep()  # stays parked (acknowledged when parked: nothing else has it)
                raise
            except Exception:
                log.exception("internal error deciding a parked message")
                self.metrics.internal_errors.inc()
                slot.settle()

    async def _release_applied_parked(self) -> None:
        """After a start: parked messages whose revision was applied before a
        crash could release them."""
        rows = await self._persist_once(self.store.parked)
        ready: list[ParkedMessage] = []
        for row in rows:
            try:
                topic, _ = self._park_seal.open(row.sealed, row.subject)
            except ValueError:
                continue  # left to expire
            parts = split_vehicle_topic(self.ctx.vehicle_prefix, topic)
            if parts is not None:
                self.claim(parts[0])
            state = self.states.get(parts[0]) if parts is not None else None
            if state is not None and row.revision <= state.revision:
                ready.append(row)
        await self._release(ready)

    async def _expire_parked_periodically(self) -> None:
        """Parked messages whose revision did not arrive in time are dropped
        (`settings_pending`), between two decisions."""
        interval = min(60.0, max(0.05, self.config.pipeline.hold_max_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_control(self._expire_parked)
            except Exception as exc:
                log.error("expiring parked messages failed: %s", exc)

    async def _release_orphans_periodically(self, interval: float = ORPHAN_CHECK_S) -> None:
        while True:
            try:
                await self.run_control(self._release_orphaned_parked)
            except Exception as exc:
                log.error("releasing orphaned parked messages failed: %s", exc)
            await asyncio.sleep(interval)

    async def _release_orphaned_parked(self) -> int:
        """Shared: parked messages whose revision was applied longer ago than
        the longest release delay are held by no instance (the one that
        applied it stopped or crashed before releasing them): released now,
        as of when their revision was applied (so they do not expire for
        having waited on a dead instance)."""
        if not await self._persist_once(self.store.sweep_lease):
            return 0  # another instance sweeps (one at a time: no row released twice)
        now = self._clock()
        pipeline = self.config.pipeline
        grace = pipeline.parked_app_release_max_delay_s + ORPHAN_GRACE_S
        released = 0
        rng = random.SystemRandom()
        for row in await self._persist_once(self.store.applied_parked, now - grace):
            since = self._applied_at(row)
            if row.id in self._releasing or since is None or now - since < grace:
                continue
            released += 1
            if self._pseudonymized_stream(row.stream) and pipeline.parked_app_release_max_delay_s:
                # A delay of its own, as for any release (rule 15: no burst
                # pairs the app's pseudonym with the car's VIN-keyed rows).
                delay = rng.uniform(
                    pipeline.parked_app_release_min_delay_s,
                    pipeline.parked_app_release_max_delay_s,
                )
                self._releasing.add(row.id)
                self.spawn(self._release_later([row], now + delay, since))
            else:
                await self._release_now([row], since)
        return released

    def _applied_at(self, row: ParkedMessage) -> float | None:
        """When the revision `row` waits for was applied (None: not yet, or unknown car)."""
        try:
            topic, _ = self._park_seal.open(row.sealed, row.subject)
        except ValueError:
            return None
        parts = split_vehicle_topic(self.ctx.vehicle_prefix, topic)
        if parts is None:
            return None
        self.claim(parts[0])
        state = self.states.get(parts[0])
        if state is None or state.revision < row.revision:
            return None
        for interval in self.histories.get(parts[0], ()):
            if interval.revision >= row.revision:
                return interval.since
        return 0.0  # applied, when unknown: long ago

    async def _expire_parked(self) -> int:
        expired = [
            e
            for e in await self._persist_once(self.store.expired_parked, self._clock())
            if e[0] not in self._releasing
        ]
        if self._shared and expired:
            # Applied rows are some instance's to release (or orphans), not expired.
            waiting = set(await self._persist_once(self.store.unapplied_parked_ids))
            expired = [e for e in expired if e[0] in waiting]
        if not expired:
            return 0
        deleted = await self._persist_once(self.store.delete_parked, [e[0] for e in expired])
        for _, stream, size in expired:
            self.metrics.inc(self.metrics.dropped, stream, "settings_pending")
            self._parked_bytes -= size
        self._parked_count -= len(expired)
        if deleted != len(expired):  # erased meanwhile: count again
            count, size, _ = await self._persist_once(self.store.parked_stats)
            self._parked_count, self._parked_bytes = count, size
        log.info("dropped %d parked message(s) whose settings never arrived", len(expired))
        return len(expired)

    def _decide_request(self, msg: InboundMessage) -> CommandDecision | None:
        """A command (tsp/{vin}/cmd/{name}) or a message-centre message
        (tsp/{vin}/msg/{category}); None for any other topic."""
        if self._unclaimed:
            self._claim_command_topic(msg.topic)
        now = self._clock()
        decision = decide_command(self.ctx, msg.topic, msg.payload, self.states, now)
        if decision is None:
            decision = decide_message(self.ctx, msg.topic, msg.payload, self.states, now)
        return decision

    async def _handle_command(self, msg: InboundMessage, slot: Settleable) -> None:
        if self._shared and msg.received >= self._caught_up_at:
            await self._catch_up()
        decision = self._decide_request(msg)
        if decision is None:
            self.metrics.dropped.labels("command", "unknown_topic").inc()
            slot.settle()
            return
        if self._shared and decision.state is not None:
            for _ in range(SHARED_STATE_ATTEMPTS):
                if await self._persist(
                    self.store.save_find_my_car,
                    self.audit_subject(decision.vin),
                    decision.state.find_my_car,
                    decision.state.window_until,
                    self._change_seq,
                ):
                    break
                # Another instance took a command of the car meanwhile (its cap).
                self._caught_up_at = float("-inf")
                await self._catch_up()
                decision = self._decide_request(msg)
                if decision is None or decision.state is None:
                    break
            else:
                self._refuse("shared_state_conflict", "command", self._clock())
                slot.settle()
                return
            if decision is None:
                self.metrics.dropped.labels("command", "unknown_topic").inc()
                slot.settle()
                return
        # The command name comes from the topic: only the policy's own are labels.
        policy = self.ctx.policy
        known = decision.command in policy.commands or decision.command in policy.messages
        name = decision.command if known else "unknown"
        self.metrics.inc(self.metrics.commands, name, str(decision.accepted).lower())
        if decision.state is not None:
            # The window and the command's place under the hourly cap are
            # durable before the command reaches the car.
            if not self._shared:  # shared: stored above, if nobody else changed them
                await self._persist(
                    self.store.save_find_my_car,
                    self.audit_subject(decision.vin),
                    decision.state.find_my_car,
                    decision.state.window_until,
                )
            self.states[decision.vin] = decision.state
        log.info(
            "command %s",
            "forwarded" if decision.accepted else "refused",
            extra={
                "vehicle": self.log_ref(decision.vin),
                "command": decision.command,
                "reason": decision.reason,
            },
        )

        def publish_result(result_topic: str, result_payload: bytes) -> None:
            self._deliver(
                self.backend_edge,
                result_topic,
                result_payload,
                (),
                slot.settle_with,
                self._egress_letter(
                    decision.vin, "cmd/result", result_topic, result_payload, slot.expires_at
                ),
            )

        def forwarded(outcome: Outcome) -> None:
            if outcome is Outcome.DELIVERED:
                publish_result(decision.result_topic, decision.result_payload)
            else:  # the command is a dead letter: tell the backend it did not reach the car
                publish_result(*refused_result(decision, "undeliverable"))

        if decision.accepted and decision.forward_topic and decision.forward_payload is not None:
            self._deliver(
                self.vehicle_edge,
                decision.forward_topic,
                decision.forward_payload,
                (),
                forwarded,
                Undeliverable(
                    DeadLetterKind.COMMAND,
                    decision.vin,
                    f"cmd/{decision.command}",
                    "",
                    self.config.dead_letters.retention_days,
                    msg.topic,
                    msg.payload,
                    slot.expires_at,
                ),
            )
        else:
            publish_result(decision.result_topic, decision.result_payload)

    # ------------------------------------------------------- control operations

    async def run_control(self, run: Callable[[], Awaitable[T]]) -> T:
        """Run `run` inside the decision loop, between two messages."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(ControlOp(run, done))
        return await done

    def log_ref(self, vin: str) -> str:
        """How logs name a vehicle: a keyed hash, never the VIN (logs travel far)."""
        return self.audit_subject(vin)[:16]

    def log_topic(self, topic: str) -> str:
        return self.redact_vins(topic, self.log_ref)

    def redact_vins(self, path: str, replace: Callable[[str], str] | None = None) -> str:
        """`path` with every segment that is a VIN (in any letter case, with
        stray whitespace: invalid in a topic or URL, still a VIN) replaced by
        its keyed hash (default: the audit subject)."""
        replace = replace or self.audit_subject
        return "/".join(
            replace(p) if is_valid_vin(p.strip().upper()) else p for p in path.split("/")
        )

    def audit_subject(self, vin: str) -> str:
        """Keyed hash of a VIN: how the store and the audit ledger name a car
        (never the VIN itself). Remembered for the cars seen lately: every
        forwarded message's egress count is written under it."""
        key = self.ctx.stable_key
        if key is not self._subjects_key:
            self._subjects, self._subjects_key = {}, key
        subject = self._subjects.get(vin)
        if subject is None:
            if len(self._subjects) >= SUBJECTS_CACHED:  # bounded: spoofed VINs
                self._subjects.clear()
            subject = self._subjects[vin] = identity_subject(key, vin)
        return subject

    def claim(self, vin: str) -> None:
        """Move what was loaded for `vin` under its subject to its VIN (see
        `_unclaimed`); before anything about the car is decided or answered."""
        if not self._unclaimed or vin in self._claimed or vin in self._checked:
            return
        subject = self.audit_subject(vin)
        if subject not in self._unclaimed:
            if len(self._checked) >= CHECKED_VINS_MAX:  # spoofed VINs: bounded
                self._checked.clear()
            self._checked.add(vin)
            return
        self._unclaimed.discard(subject)
        self._claimed[vin] = subject
        self._bind(vin, subject)
        if (state := self.states.pop(subject, None)) is not None:
            self.states[vin] = state
            erased = self.ctx.identity.rows.get(subject)
            if erased is not None:  # back after an erasure: its epoch
                self.ctx.identity.learn(vin, erased)
        if (anchor := self.anchors.pop(subject, None)) is not None:
            self.anchors[vin] = anchor
        if (history := self.histories.pop(subject, None)) is not None:
            self.histories[vin] = history
        if subject in self.restricted:
            self.restricted.discard(subject)
            self.restricted.add(vin)

    def _claim_command_topic(self, topic: str) -> None:
        prefix = self.ctx.backend_prefix
        parts = split_command_topic(prefix, topic) or split_command_topic(prefix, topic, "msg")
        if parts is not None and parts[0] not in self.states:
            self.claim(parts[0])

    def _claim_topic(self, topic: str) -> None:
        parts = split_vehicle_topic(self.ctx.vehicle_prefix, topic)
        if parts is not None and parts[0] not in self.states:
            self.claim(parts[0])

    async def push_policy(self, policy: CompiledPolicy, signer: str, actor: str) -> StoredPolicy:
        """Store `policy` and switch every later message to it.

        Checked and swapped in one step of the decision loop, against the store
        (whose write refuses a version not newer than every stored one in the
        same transaction): of concurrent pushes each gets one outcome, and the
        highest accepted version is the one left active. Raises VersionConflict.
        """

        async def run() -> StoredPolicy:
            now = self._clock()
            record = StoredPolicy(
                policy.version, policy.digest, policy.text, signer, now, now, True
            )
            audit = AuditRecord(
                actor=actor,
                action="policy_pushed",
                subject=policy.version,
                content={
                    "version": policy.version,
                    "digest": policy.digest,
                    "signer": signer,
                    "previous": self.ctx.policy.version,
                },
                at=now,
            )
            await self._persist_once(self.store.save_policy, record, audit)
            await self._switch_policy(policy, record)
            return record

        return await self.run_control(run)

    async def rollback_policy(
        self, policy: CompiledPolicy, stored: StoredPolicy, actor: str
    ) -> StoredPolicy:
        """Re-activate a stored version (`policy`: its text, compiled) in the same
        serialized step as pushes. Raises VersionConflict when it is active."""

        async def run() -> StoredPolicy:
            now = self._clock()
            previous = self.ctx.policy.version
            audit = AuditRecord(
                actor=actor,
                action="policy_rolled_back",
                subject=stored.version,
                content={"version": stored.version, "previous": previous},
                at=now,
            )
            await self._persist_once(self.store.activate_policy, stored.version, now, audit)
            record = dataclasses.replace(stored, applied_at=now, active=True)
            # The store capped newer confirmed versions at this one: reload them.
            await self._switch_policy(policy, record, reload=True)
            return record

        return await self.run_control(run)

    async def _switch_policy(
        self, policy: CompiledPolicy, record: StoredPolicy, reload: bool = False
    ) -> None:
        """Every message decided after this uses `policy` (runs in the decision loop)."""
        old = self.ctx.policy
        self._set_policy(policy)
        self.policy_record = record
        if reload or (old.default_on, old.features.keys(), old.per_app_features) != (
            policy.default_on,
            policy.features.keys(),
            policy.per_app_features,
        ):
            # Which features a snapshot enables depends on the policy.
            if self._shared:  # retried, holding the pipeline: no stale view
                await self._persist(self.load_state)
            else:
                await asyncio.get_running_loop().run_in_executor(
                    self._store_executor, self.load_state
                )
        log.info("policy %s active", policy.version, extra={"policy_version": policy.version})

    def _with_objections(self, subject: str, state: VehicleState) -> VehicleState:
        objected = self._objections.get(subject, _NO_OBJECTIONS)
        if objected == state.objected:
            return state
        return dataclasses.replace(state, objected=objected)

    async def set_objection(self, vin: str, feature: str, objected: bool, actor: str) -> bool:
        """Art. 21: the car's data for a legitimate-interest feature stops (or
        resumes), whatever its toggle says; durable and audited."""

        async def run() -> bool:
            self.claim(vin)
            subject = self.audit_subject(vin)
            record = AuditRecord(
                actor=actor,
                action="objection_made" if objected else "objection_withdrawn",
                subject=subject,
                content={"feature": feature},
                at=self._clock(),
            )
            changed = await self._persist_once(
                self.store.set_objection, subject, feature, objected, record
            )
            current = set(self._objections.get(subject, frozenset()))
            if objected:
                current.add(feature)
            else:
                current.discard(feature)
            if current:
                self._objections[subject] = frozenset(current)
            else:
                self._objections.pop(subject, None)
            state = self.states.get(vin)
            if state is not None:
                self.states[vin] = self._with_objections(subject, state)
            return bool(changed)

        return await self.run_control(run)

    def is_restricted(self, vin: str) -> bool:
        """Restricted now, or restricted when it was erased (kept for its return).
        Reads only (the control plane calls it outside the decision loop)."""
        erased = self.ctx.identity.row(self.ctx.stable_key, vin)
        return (
            vin in self.restricted
            or (bool(self._unclaimed) and self.audit_subject(vin) in self.restricted)
            or (erased is not None and erased.restricted)
        )

    def state_of(self, vin: str) -> VehicleState | None:
        """The car's state whether or not its VIN was seen since the load. Reads
        only: `claim` moves state and runs in the decision loop, this does not."""
        state = self.states.get(vin)
        if state is None and self._unclaimed:
            state = self.states.get(self.audit_subject(vin))
        return state

    async def set_restriction(self, vin: str, restricted: bool, actor: str) -> bool:
        async def run() -> bool:
            record = AuditRecord(
                actor=actor,
                action="restriction_set" if restricted else "restriction_lifted",
                subject=self.audit_subject(vin),
                content={},
                at=self._clock(),
            )
            self.claim(vin)
            subject = record.subject
            changed = await self._persist_once(
                self.store.set_restriction, subject, restricted, record
            )
            erased = self.ctx.identity.rows.get(subject)
            if erased is not None and erased.restricted != restricted:
                # Carried past the erasure: lifting or setting it again holds there too.
                await self._persist_once(self.store.set_identity_restricted, subject, restricted)
                self.ctx.identity.rows[subject] = dataclasses.replace(erased, restricted=restricted)
                if not changed:  # the store had no row by VIN to audit the change with
                    await self._persist_once(self.store.append_audit, record)
                changed = True
            if restricted:
                self._bind(vin, subject)
                self.restricted.add(vin)
            else:
                self.restricted.discard(vin)
            state = self.states.get(vin)
            if state is not None:
                self.states[vin] = dataclasses.replace(state, restricted=restricted)
                if changed:  # a restriction period is part of what was allowed when
                    self._add_interval(vin, state.revision, record.at, self.states[vin])
            if changed:
                # Stored backend data is marked (Art. 18): the backend is told.
                # Not awaited in the decision loop; it ends delivered or as a
                # dead letter, like the erasure event.
                self._publish_events(
                    vin,
                    "restriction",
                    [
                        restriction_event(prefix, vin, restricted, record.at)
                        for prefix in vin_prefixes(self.ctx.policy, self.ctx.backend_prefix)
                    ],
                )
            return bool(changed)

        return await self.run_control(run)

    async def erase_vehicle(self, vin: str, actor: str) -> dict[str, Any]:
        """Art. 17: forget the vehicle, tell downstream systems, fail closed after."""

        async def run() -> dict[str, Any]:
            now = self._clock()
            self.claim(vin)
            subject = self.audit_subject(vin)
            used = {  # (stream, feature, day) the car sent data on
                (k[2], k[3], k[1]) for k in self.accounting.pending_keys() if k[0] == vin
            } | {
                (c.stream, c.feature, c.day)
                for c in await self._persist_once(self.store.egress_counts, subject)
            }
            targets = self._pseudonym_targets(used)
            record = AuditRecord(actor=actor, action="erasure", subject=subject, content={}, at=now)
            # Rule 16: the VIN event carries only the VIN; each pseudonym (of the
            # epoch ending now) gets its own event at its recipient, later, after
            # a random delay.
            book, erasure = self.ctx.identity, self.config.erasure
            # The epoch ending now: the stored row's when the VIN was not seen
            # since the last start (its epoch is learned when it is).
            known = book.rows.get(subject)
            epoch = max(book.epoch(vin), known.epoch if known is not None else 0)
            rng = random.SystemRandom()
            # Refs made with a retired key may still be held downstream: each
            # gets its event too (the VIN event is one).
            step_ms = self.ctx.policy.document.identity.pseudonymized_timestamp_step_s * 1000
            events, *older = [
                erasure_events(
                    key,
                    vin_prefixes(self.ctx.policy, self.ctx.backend_prefix),
                    vin,
                    targets,
                    epoch,
                    now,
                    [
                        rng.uniform(erasure.app_event_min_delay_s, erasure.app_event_max_delay_s)
                        for _ in targets
                    ],
                    step_ms,
                )
                for key in (self.ctx.key, *self.retired_keys)
            ]
            app_events = [e for batch in (events, *older) for e in batch.app_events]
            # What survives: a new pseudonym epoch, the revision floor (older
            # settings are void) and a restriction; keyed by the subject hash.
            state, before = self.states.get(vin), book.rows.get(subject)
            survivor = IdentityRow(
                epoch=epoch + 1,
                revision_floor=max(
                    state.revision if state is not None else 0,
                    before.revision_floor if before is not None else 0,
                ),
                restricted=self.is_restricted(vin),  # also one kept from an earlier erasure
                ownership=before.ownership if before is not None else 0,  # same grid offset
            )
            removed = await self._erase_in_store(vin, subject, record, survivor, app_events)
            self._erased[vin] = now  # before any other task runs: see _settle_forward
            survivor = await self._stored_survivor(subject, survivor)
            book.rows[subject] = survivor
            book.learn(vin, survivor)
            self._bind(vin, subject)
            self.states.pop(vin, None)
            self.anchors.pop(vin, None)
            self.histories.pop(vin, None)
            if removed.get("parked"):
                count, size, subjects = await self._persist_once(self.store.parked_stats)
                self._parked_count, self._parked_bytes = count, size
                self._parked_subjects = subjects
            self.accounting.forget(vin)
            forget_addresses()  # the cache of truncations is keyed by full addresses
            for old in [v for v, at in self._erased.items() if now - at > ERASED_MEMORY_S]:
                del self._erased[old]
            self.metrics.vehicles.set(len(self.states))
            self.metrics.dead_letters_stored.set(
                await self._persist_once(self.store.dead_letter_count)
            )
            # Not awaited inside the decision loop: a refused event must not
            # hold every car's messages (it ends delivered or as a dead letter).
            outcome = self._publish_events(vin, "erasure", events.vin_events)
            topic = events.vin_events[0][0]
            # The car is asked to show its privacy screen again.
            reprompt_topic, reprompt = applied_message(
                self.ctx, vin, survivor.revision_floor, reprompt=True
            )
            self._deliver(
                self.vehicle_edge,
                reprompt_topic,
                reprompt,
                (),
                lambda _: None,
                self._egress_letter(vin, "avn/privacy/applied", reprompt_topic, reprompt),
            )
            self._erasure_events_changed.set()
            return {
                "removed": removed,
                "erasure_event_topic": topic,
                "erasure_event_topics": [t for t, _ in events.vin_events],
                "pseudonymous_refs": [r for batch in (events, *older) for r in batch.refs],
                "app_erasure_events": [
                    {"topic": t, "due_in_s": round(due - now, 1)} for due, t, _ in app_events
                ],
                "_outcome": outcome,
            }

        result = await self.run_control(run)
        outcome = result.pop("_outcome")
        try:
            result["erasure_event"] = (await asyncio.wait_for(asyncio.shield(outcome), 5)).value
        except TimeoutError:
            result["erasure_event"] = "pending"  # backend unreachable: delivered on reconnect
        return result

    async def change_ownership(self, vin: str, actor: str) -> dict[str, Any]:
        """The car has a new owner: what the gateway holds of the previous one
        leaves (settings, history, counts, anchors, find-my-car, parked and
        dead-lettered messages; the audit trail stays, content included),
        consent is unknown again (only legal obligations pass), the pseudonyms
        start a new epoch and the grid offset changes; the backend is told to
        unlink the car, and the car to show its privacy screen to the new owner."""

        async def run() -> dict[str, Any]:
            now = self._clock()
            self.claim(vin)
            subject = self.audit_subject(vin)
            book = self.ctx.identity
            state, before = self.states.get(vin), book.rows.get(subject)
            survivor = IdentityRow(
                epoch=max(book.epoch(vin), before.epoch if before is not None else 0) + 1,
                revision_floor=max(
                    state.revision if state is not None else 0,
                    before.revision_floor if before is not None else 0,
                ),
                restricted=False,  # a restriction was the previous owner's
                ownership=(before.ownership if before is not None else 0) + 1,
            )
            record = AuditRecord(
                actor=actor, action="ownership_changed", subject=subject, content={}, at=now
            )
            removed = await self._erase_in_store(vin, subject, record, survivor, (), False)
            survivor = await self._stored_survivor(subject, survivor)
            book.rows[subject] = survivor
            book.learn(vin, survivor)
            self._bind(vin, subject)
            self.states.pop(vin, None)
            self.anchors.pop(vin, None)
            self.histories.pop(vin, None)
            self.restricted.discard(vin)
            self._objections.pop(subject, None)
            if removed.get("parked"):
                count, size, subjects = await self._persist_once(self.store.parked_stats)
                self._parked_count, self._parked_bytes = count, size
                self._parked_subjects = subjects
            self.accounting.forget(vin)
            self.metrics.vehicles.set(len(self.states))
            prefixes = vin_prefixes(self.ctx.policy, self.ctx.backend_prefix)
            sent = [ownership_event(prefix, vin, now) for prefix in prefixes]
            outcome = self._publish_events(vin, "ownership", sent)
            topic = sent[0][0]
            reprompt_topic, reprompt = applied_message(
                self.ctx, vin, survivor.revision_floor, reprompt=True
            )
            self._deliver(
                self.vehicle_edge,
                reprompt_topic,
                reprompt,
                (),
                lambda _: None,
                self._egress_letter(vin, "avn/privacy/applied", reprompt_topic, reprompt),
            )
            return {"removed": removed, "ownership_event_topic": topic, "_outcome": outcome}

        result = await self.run_control(run)
        outcome = result.pop("_outcome")
        try:
            result["ownership_event"] = (await asyncio.wait_for(asyncio.shield(outcome), 5)).value
        except TimeoutError:
            result["ownership_event"] = "pending"
        return result

    async def _publish_erasure_events(self, idle_s: float = 60.0) -> None:
        """Publish app erasure events once due (they are stored with the
        erasure, so a restart loses none); each leaves the store once delivered
        or kept as a dead letter. At least once: a crash between the publish
        and the removal publishes it again."""
        in_flight: set[int] = set()
        while True:
            self._erasure_events_changed.clear()
            wait = idle_s
            try:
                pending = await self._persist_once(self.store.pending_erasure_events)
            except Exception:
                log.exception("pending erasure events unreadable; retrying")
                pending = []
            now = self._clock()
            for event_id, due_at, topic, payload in pending:
                if event_id in in_flight:
                    continue
                if due_at > now:
                    wait = min(wait, due_at - now)
                    continue
                in_flight.add(event_id)
                self._deliver(
                    self.backend_edge,
                    topic,
                    payload,
                    (),
                    functools.partial(self._erasure_event_done, event_id, in_flight),
                    Undeliverable(
                        DeadLetterKind.EGRESS,
                        "",  # filed under no car: nothing pairs it with the VIN
                        "erasure",
                        "",
                        self.config.dead_letters.retention_days,
                        topic,
                        payload,
                    ),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._erasure_events_changed.wait(), max(wait, 0.05))

    def _erasure_event_done(self, event_id: int, in_flight: set[int], _: Outcome) -> None:
        self.spawn(self._remove_erasure_event(event_id, in_flight))

    async def _remove_erasure_event(self, event_id: int, in_flight: set[int]) -> None:
        try:
            await self._persist_once(self.store.delete_pending_erasure_event, event_id)
        except Exception:
            log.exception("erasure event not removed; it will be published again")
        in_flight.discard(event_id)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A background task kept referenced until done (the loop holds only weak ones)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _persist_once(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call for a control operation: failures go back to the caller."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_executor, fn, *args)

    # ------------------------------------------------------------ dead letters

    async def redrive_dead_letters(self, ids: list[int] | None) -> dict[str, int]:
        """Take dead letters out of the store and send them through again.

        Vehicle messages and commands are decided again under the consent in
        force now (a car that withdrew consent meanwhile gets nothing sent);
        messages the gateway produced are republished. A letter leaves the
        store once its new outcome is final (delivered, dropped, or a new
        dead letter), so a crash meanwhile re-drives it again, never loses it.
        """

        async def run() -> dict[str, int]:
            letters = await self._persist_once(
                self.store.dead_letters, ids, 0, 1000 if ids is None else len(ids)
            )
            counts = {"redriven": 0, "unreadable": 0, "in_progress": 0}
            now = self._clock()
            for letter in letters:
                if letter.id in self._redriving:  # a previous re-drive has not finished it
                    counts["in_progress"] += 1
                    continue
                try:
                    topic, payload = self._seal.open(letter.sealed, letter.subject)
                except ValueError:
                    log.error("dead letter %d does not open with the current key", letter.id)
                    counts["unreadable"] += 1
                    continue
                self._redriving.add(letter.id)
                slot = _RedriveSlot(self, letter.id, letter.expires_at)
                msg = InboundMessage(letter.kind.value, topic, payload, 1, 0, 0)
                if letter.kind is DeadLetterKind.VEHICLE:
                    await self._handle_vehicle_message(
                        msg, slot, redriven=True, only_recipient=letter.recipient
                    )
                elif letter.kind is DeadLetterKind.COMMAND:
                    if now - letter.created_at > COMMAND_REDRIVE_TTL_S:
                        self._expire_command(msg, slot)
                    else:
                        await self._handle_command(msg, slot)
                else:
                    edge = self.vehicle_edge if letter.edge == VEHICLE else self.backend_edge
                    self._deliver(
                        edge,
                        topic,
                        payload,
                        (),
                        slot.settle_with,
                        Undeliverable(
                            letter.kind,
                            "",
                            letter.stream,
                            letter.feature,
                            0,
                            topic,
                            payload,
                            letter.expires_at,
                        ),
                        subject=letter.subject,
                    )
                counts["redriven"] += 1
            return counts

        return await self.run_control(run)

    def _expire_command(self, msg: InboundMessage, slot: Settleable) -> None:
        """A command dead-lettered too long ago is not run now (the backend was
        told it did not reach the car): answered `expired` instead."""
        decision = self._decide_request(msg)
        if decision is None:
            slot.settle()
            return
        topic, payload = refused_result(decision, "expired")
        self._deliver(
            self.backend_edge,
            topic,
            payload,
            (),
            slot.settle_with,
            self._egress_letter(decision.vin, "cmd/result", topic, payload, slot.expires_at),
        )

    async def delete_dead_letters(self, ids: list[int] | None) -> int:
        removed = await self._persist_once(self.store.delete_dead_letters, ids)
        self.metrics.dead_letters_stored.set(await self._persist_once(self.store.dead_letter_count))
        return int(removed)

    async def _purge_dead_letters_periodically(self, interval: float = 3600.0) -> None:
        while True:
            try:
                removed = await self._persist_once(self.store.purge_dead_letters, self._clock())
                if removed:
                    log.info("purged %d dead letters past retention", removed)
                self.metrics.dead_letters_stored.set(
                    await self._persist_once(self.store.dead_letter_count)
                )
                await self.purge_retention()
            except Exception as exc:
                log.error("retention purge failed: %s", exc)
            self._purged_once.set()  # also after a failure: it is retried in an hour
            await asyncio.sleep(interval)

    async def purge_retention(self) -> dict[str, int]:
        """What the gateway itself holds, bounded by the policy's retention: a
        stream's egress counts as long as the backend may keep its data; the
        settings history and the audit content of cars as long as the longest
        of them (data captured under those settings may still be held)."""
        now = self._clock()
        streams = self.ctx.policy.document.streams
        longest = max((s.retention_days for s in streams.values()), default=0)
        day = 86_400.0
        counts_before = {
            key: time.strftime("%Y-%m-%d", time.gmtime(now - s.retention_days * day))
            for key, s in streams.items()
        }
        removed: dict[str, int] = await self._persist_once(
            self.store.purge_retention, counts_before, now - longest * day, now - longest * day
        )
        if any(removed.values()):
            log.info("purged what is past retention: %s", removed)
        return removed

    async def _erase_in_store(
        self,
        vin: str,
        subject: str,
        record: AuditRecord,
        survivor: IdentityRow,
        events: Sequence[tuple[float, str, bytes]],
        scrub: bool = True,
    ) -> dict[str, int]:
        """The store's erasure of a car (or of its previous owner's data).
        Nothing is counted for the car meanwhile: a count whose commit queued
        behind the erasure's transaction would write the car's row again. (If
        the erasure fails, what was forwarded meanwhile stays uncounted: an
        undercount, never a row left behind.)"""
        self.accounting.forget(vin)
        self._erasing.add(vin)
        try:
            # The store names the car by its subject, never the VIN.
            return await self._persist_once(
                self.store.erase_vehicle, subject, subject, record, survivor, events, scrub
            )
        finally:
            self._erasing.discard(vin)

    def _count_key(
        self, decision: Forward, now: float | None = None
    ) -> tuple[str, str, str, str, str]:
        day = self.accounting.day(self._clock() if now is None else now)
        return (decision.vin, day, decision.stream, decision.feature, self.ctx.policy.version)

    def _settle_forward(
        self,
        outcome: Outcome,
        key: tuple[str, str, str, str, str],
        slot: Settleable,
        *,
        wait_for_count: bool = True,
    ) -> None:
        """A forwarded message is acknowledged once its egress count is durable;
        a dead letter is acknowledged at once (it was never sent)."""
        if outcome is not Outcome.DELIVERED or key[0] in self._erased or key[0] in self._erasing:
            # Never sent, or sent for a car erased meanwhile: nothing to count
            # (a count written now would outlive the erasure).
            slot.settle()
        elif wait_for_count:
            self.accounting.record(key, slot.settle)
        else:  # eCall lane: needs no store write to be acknowledged
            if key[0] in self.states:  # made-up VINs get no durable rows
                self.accounting.record(key)
            slot.settle()

    def _publish_events(
        self, vin: str, kind: str, events: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[Outcome]:
        """VIN-keyed events (erasure, restriction, ownership), one per recipient
        that got the VIN; the future is delivered once every one is, else
        dead-lettered (a refused one is kept for re-drive)."""
        outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def done(result: Outcome) -> None:
            if not outcome.done():
                outcome.set_result(result)

        join = _AllCopies(len(events), done, all_needed=True)
        for topic, payload in events:
            self._deliver(
                self.backend_edge,
                topic,
                payload,
                (),
                join.done,
                self._egress_letter(vin, kind, topic, payload),
            )
        return outcome

    def _pseudonym_targets(self, used: set[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """(prefix, pseudonym scope, stream topic) of every pseudonym the car
        was sent under: per pseudonymized recipient of each stream it used (by
        `(stream, feature, day)`), per rotation period of an app."""
        identity = self.ctx.policy.document.identity
        targets: set[tuple[str, str, str]] = set()
        for stream_key, feature, day in used:
            _, dot, app = feature.partition(".")
            relative = re.sub(r"\{[a-z][a-z0-9_]*\}", app, stream_key) if dot else stream_key
            routed = self.ctx.policy.route(relative)
            if routed is None:  # a stream the policy no longer has: as its last rule said
                continue
            stream, _ = routed
            for route in stream.routes:
                if not route.pseudonymize_vin:
                    continue
                scope = (
                    app_scope(app, identity.rotation_days(app), _day_start(day))
                    if dot
                    else stream.key
                )
                prefix = route.prefix or self.ctx.backend_prefix
                targets.add((prefix, scope + route.scope_suffix, relative))
        return sorted(targets)

    def _undeliverable(
        self,
        kind: DeadLetterKind,
        decision: Forward,
        msg: InboundMessage,
        expires_at: float | None = None,
    ) -> Undeliverable:
        retention = float(dict(decision.user_properties).get("retention-days", 0))
        return Undeliverable(
            kind,
            decision.vin,
            decision.stream,
            decision.feature,
            retention or self.config.dead_letters.retention_days,
            msg.topic,
            msg.payload,
            expires_at,
        )

    def _egress_letter(
        self, vin: str, stream: str, topic: str, payload: bytes, expires_at: float | None = None
    ) -> Undeliverable:
        return Undeliverable(
            DeadLetterKind.EGRESS,
            vin,
            stream,
            "",
            self.config.dead_letters.retention_days,
            topic,
            payload,
            expires_at,
        )

    # ------------------------------------------------------------------ I/O

    def _deliver(
        self,
        edge: MqttEdge,
        topic: str,
        payload: bytes,
        user_properties: Sequence[tuple[str, str]],
        on_done: Callable[[Outcome], None],
        letter: Undeliverable | Callable[[], Undeliverable],
        attempt: int = 0,
        **filing: Any,
    ) -> None:
        """Publish at QoS 1; `on_done(outcome)` once the fate is final.

        A lost connection is not a refusal (the message is resent after the
        reconnect and completes then). A transient refusal is retried for
        about a second; then, or at once for a permanent one, the message
        becomes a dead letter (`letter`, or what it builds: most messages
        never need one).
        """

        def completed(exc: PublishRefused | None) -> None:
            if exc is None:
                on_done(Outcome.DELIVERED)
                return
            code = exc.code
            if is_transient(code) and attempt < len(RETRY_DELAYS_S):
                self.metrics.publish_retries.labels(edge.name).inc()
                asyncio.get_running_loop().call_later(
                    RETRY_DELAYS_S[attempt],
                    lambda: self._deliver(
                        edge,
                        topic,
                        payload,
                        user_properties,
                        on_done,
                        letter,
                        attempt + 1,
                        **filing,
                    ),
                )
                return
            kept = letter if isinstance(letter, Undeliverable) else letter()
            task = self.spawn(
                self._dead_letter(edge.name, kept, code, str(exc), attempt + 1, **filing)
            )
            task.add_done_callback(lambda t: self._filed(t, on_done))

        edge.publish_then(topic, payload, user_properties, completed)

    def _filed(self, task: asyncio.Task[None], on_done: Callable[[Outcome], None]) -> None:
        """Acknowledge a dead letter only once it is stored; if filing failed (a
        bug: store writes are retried) or was cancelled (shutdown), the message
        stays unacknowledged and the broker redelivers it."""
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("dead letter not filed: %s", task.exception())
            self.metrics.internal_errors.inc()
            return
        on_done(Outcome.DEAD_LETTERED)

    async def _dead_letter(
        self,
        edge: str,
        letter: Undeliverable,
        code: int,
        detail: str,
        attempts: int,
        *,
        subject: str | None = None,
    ) -> None:
        now = self._clock()
        if (
            letter.kind is not DeadLetterKind.EGRESS
            and letter.vin in self._erased
            and letter.stream not in self._legal_streams
        ):
            # Decided before its car was erased: keeping it would undo the erasure.
            log.warning("refused message of an erased vehicle not kept (%s)", letter.stream)
            return
        expires_at = letter.expires_at
        subject = (
            subject
            if subject is not None
            else (self.audit_subject(letter.vin) if letter.vin else "")
        )
        reason = refusal_reason(code)
        row = DeadLetter(
            created_at=now,
            expires_at=expires_at
            if expires_at is not None
            else now + 86400 * min(letter.retention_days, self.config.dead_letters.retention_days),
            subject=subject,
            kind=letter.kind,
            edge=edge,
            stream=letter.stream,
            feature=letter.feature,
            reason=reason,
            code=code,
            attempts=attempts,
            size=len(letter.payload),
            sealed=self._seal.seal(letter.topic, letter.payload, subject),
            recipient=letter.recipient,
        )
        _, evicted = await self._persist(
            self.store.add_dead_letter, row, self.config.dead_letters.max_rows
        )
        self.metrics.dead_letters.labels(edge, reason).inc()
        self.metrics.dead_letters_stored.inc(1 - evicted)
        if evicted:
            self.metrics.dead_letters_evicted.inc(evicted)
            log.error("dead-letter store full: evicted the %d oldest", evicted)
        # The subject (a keyed hash) identifies the car in logs, never the VIN.
        log.warning(
            "dead letter: %s on %s refused (%s); acknowledged and kept for re-drive",
            letter.stream,
            edge,
            detail,
            extra={"edge": edge, "reason": reason, "subject": subject[:16]},
        )

    async def _persist(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store write off the loop; on failure retry, holding the pipeline.

        Nothing after this message is decided until its state is durable
        (fail closed rather than enforce something we could forget).
        """
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                result = await loop.run_in_executor(self._store_executor, fn, *args)
                if attempt:
                    log.warning("consent store writable again")
                    self.store_writable = True
                    self.metrics.store_writable.set(1)
                return result
            except Exception as exc:
                attempt += 1
                self.store_writable = False
                self.metrics.store_writable.set(0)
                delay = min(10.0, 0.1 * 2**attempt)
                log.error("consent store write failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)


class _AllCopies:
    """Several copies (one per recipient) are final once every one is:
    delivered if any was (`all_needed`: if every one was), else dead-lettered."""

    __slots__ = ("_all", "_delivered", "_left", "_on_done", "_total")

    def __init__(
        self, copies: int, on_done: Callable[[Outcome], None], *, all_needed: bool = False
    ) -> None:
        self._left = self._total = copies
        self._all = all_needed
        self._delivered = 0
        self._on_done = on_done

    def done(self, outcome: Outcome) -> None:
        self._left -= 1
        self._delivered += outcome is Outcome.DELIVERED
        if self._left == 0:
            enough = self._delivered == self._total if self._all else self._delivered > 0
            self._on_done(Outcome.DELIVERED if enough else Outcome.DEAD_LETTERED)


def _day_start(day: str) -> float:
    """'YYYY-MM-DD' (UTC) -> epoch seconds of its midnight."""
    return float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))


def _digest(msg: InboundMessage) -> bytes:
    return hashlib.blake2b(msg.topic.encode() + b"\x00" + msg.payload, digest_size=16).digest()


class _ParkedSlot:
    """Stands in for an ack-window slot when a parked message is released (it
    was acknowledged when parked): its final outcome removes the stored row."""

    __slots__ = ("done", "expires_at", "row", "service")

    def __init__(self, service: GatewayService, row: ParkedMessage) -> None:
        self.service = service
        self.row = row
        self.expires_at: float | None = None  # a dead letter gets the stream's retention
        self.done = False

    def settle(self) -> None:
        if self.done:
            return
        self.done = True
        self.service.spawn(self._remove())

    def keep(self) -> None:
        """Still waiting for its revision: stays parked."""
        self.done = True
        self.service._releasing.discard(self.row.id)

    async def _remove(self) -> None:
        service = self.service
        try:
            deleted = await service._persist(service.store.delete_parked, [self.row.id])
            if deleted:
                service._parked_count -= 1
                service._parked_bytes -= self.row.size
        finally:
            service._releasing.discard(self.row.id)

    def settle_with(self, outcome: Outcome) -> None:
        self.settle()

    def release_budget(self) -> None:
        pass  # a released message holds no ingress budget


class _RedriveSlot:
    """Stands in for an ack-window slot when a dead letter is re-driven: its
    final outcome removes the stored letter (a new refusal has filed a new one)."""

    __slots__ = ("done", "expires_at", "letter_id", "service")

    def __init__(self, service: GatewayService, letter_id: int, expires_at: float) -> None:
        self.service = service
        self.letter_id = letter_id
        self.expires_at = expires_at
        self.done = False

    def settle(self) -> None:
        if self.done:
            return
        self.done = True
        self.service.spawn(self._remove())

    async def _remove(self) -> None:
        try:
            await self.service.delete_dead_letters([self.letter_id])
        finally:
            self.service._redriving.discard(self.letter_id)

    def settle_with(self, outcome: Outcome) -> None:
        self.settle()

    def release_budget(self) -> None:
        pass  # a re-driven letter holds no ingress budget


__all__ = ["AckWindow", "GatewayService", "PublishRefused"]


@dataclass
class _LoadedCars:
    """Cars as a shared store holds them, by subject (`GatewayService._load_cars`)."""

    subjects: frozenset[str]
    anchored: frozenset[str]
    states: dict[str, VehicleState] = dataclasses.field(default_factory=dict)
    histories: dict[str, CaptureHistory] = dataclasses.field(default_factory=dict)
    restricted: set[str] = dataclasses.field(default_factory=set)
    identities: dict[str, IdentityRow] = dataclasses.field(default_factory=dict)
    objections: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    anchors: dict[str, LocationAnchor] = dataclasses.field(default_factory=dict)


class _Halted(Exception):
    """This instance must not decide any more (see `_adopt_stored_policy`)."""
