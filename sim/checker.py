"""Judge what the backend received (recording) against what the cars did (ground truth).

Every published message gets an expectation from the wire contract and the
settings in force when it was published: it must arrive (and be transformed
exactly as the contract says), it must not arrive, or it is ambiguous (a
find-my-car window edge, settings the gateway had not confirmed yet). The
checker reports:

- leaks: anything forwarded that the contract forbids,
- losses: anything allowed that never arrived (duplicates are fine: QoS 1),
- over-coarsening / wrong transforms, missing or wrong user properties,
- protocol problems (PrivacyApplied missing or wrong, command results),
- utility: share of allowed messages delivered, error of approximate positions.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import itertools
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError, Message
from rich.console import Console
from rich.table import Table

from sim.contract import ACCEPT, AMBIGUOUS, LOCATION_ON, PASS, decide_command, decide_message
from sim.deadletters import DeadLetterRecord, LostMessage, account_losses
from sim.geo import METRES_PER_DEGREE, Point, cell_half_extent_deg, distance_m
from sim.groundtruth import GROUND_TRUTH_FILE, RECORDING_FILE, read_json_lines, unb64
from sim.model import (
    MUST_NOT_ARRIVE,
    OWNERSHIP_CHANGE,
    PURPOSE_MALFORMED,
    PURPOSE_SPOOFED,
    Settings,
)
from sim.policy import APP_STREAM_PREFIX, DEFAULT_POLICY_PATH, Policy, load_policy
from telematics.v1 import common_pb2, privacy_pb2, streams_pb2

LEAK = "leak"
LOSS = "loss"
OVER_COARSENING = "over_coarsening"
WRONG_TRANSFORM = "wrong_transform"
USER_PROPERTIES = "user_properties"
PROTOCOL = "protocol"
CATEGORIES = (LEAK, LOSS, OVER_COARSENING, WRONG_TRANSFORM, USER_PROPERTIES, PROTOCOL)
WINDOW_TOLERANCE_S = 2.0  # messages this close to a window boundary may go either way
SLACK = 1.01  # 1 % slack on the approximate-location cell bounds
# A coarse value (and the odometer frozen with it) may change once per refresh
# interval on the gateway's clock; the recorder sees forwards a little later
# than the gateway decided them, so changes this much closer still pass.
REFRESH_TOLERANCE = 0.25  # of an interval
# A message published this long (wall seconds) before a DPO action may still
# be in the gateway's queue when the action runs: decided before it or after.
OPERATOR_SLACK_S = 1.0
# How late the gateway may have got to a message that did not arrive
# (Checker._decision_lag), from wall seconds around its publication: its car's
# messages this close took about as long (queued behind the same ones) ...
LAG_NEIGHBOURHOOD_WALL_S = 5.0
# ... any car's messages and settings this close met the same instances in the
# same state (an instance that stalls unannounced, a starved CPU, holds
# every car's share) ...
MOMENT_WALL_S = 0.5
# ... and a stall the run made (STALLS_FILE: an instance paused or killed)
# holds what was published from this long before it began until it ended.
STALL_LEAD_WALL_S = 0.5
STALLS_FILE = "stalls.json"
# The gateway's default `pipeline.capture_skew_s` (contract rule 11), which
# the simulator's runs keep.
CAPTURE_SKEW_S = 180.0
# Between the gateway applying a car's first settings and the car getting
# its PrivacyApplied (wall seconds): messages captured this close to the
# boundary are not judged.
FIRST_SETTINGS_TOLERANCE_WALL_S = 0.5
REQUIRED_PROPERTIES = ("policy-version", "feature", "legal-basis", "retention-days", "transforms")
CHECK_FILE = "check.json"
GEOPOINT = "telematics.v1.GeoPoint"


def pseudonym(key: bytes, purpose: str, value: str) -> str:
    """The contract's keyed pseudonym (HMAC-SHA-256, hex, 128 bits)."""
    return hmac.new(key, purpose.encode() + b"\x00" + value.encode(), hashlib.sha256).hexdigest()[
        :32
    ]


def truncate_ip(address: str) -> str:
    """IPv4 -> a.b.c.0 (/24); IPv6 -> first three hextets, rest zero (/48)."""
    parsed = ipaddress.ip_address(address)
    prefix = 24 if parsed.version == 4 else 48
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return str(network.network_address)


def message_class(policy: Policy, stream: str) -> type[Message] | None:
    rule = policy.rule_for(stream)
    if rule is None:
        return None
    cls = getattr(streams_pb2, rule.message, None)
    return cls if isinstance(cls, type) and issubclass(cls, Message) else None


def geopoint_fields(message: Message) -> list[str]:
    return [
        f.name
        for f in message.DESCRIPTOR.fields
        if f.message_type is not None
        and f.message_type.full_name == GEOPOINT
        and not _is_repeated(f)
    ]


def _is_repeated(field_descriptor: Any) -> bool:
    repeated = getattr(field_descriptor, "is_repeated", None)
    if isinstance(repeated, bool):
        return repeated
    return bool(field_descriptor.label == field_descriptor.LABEL_REPEATED)  # older protobuf


@dataclass
class Issue:
    category: str
    rule: str
    stream: str
    vin: str
    detail: str
    topic: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "category": self.category,
            "rule": self.rule,
            "stream": self.stream,
            "vin": self.vin,
            "detail": self.detail,
            "topic": self.topic,
        }


@dataclass
class StreamTally:
    published: int = 0
    must_pass: int = 0
    delivered: int = 0
    duplicates: int = 0
    ambiguous: int = 0
    dead_lettered: int = 0  # must pass, not delivered, accounted for by a dead letter
    dropped: Counter[str] = field(default_factory=Counter)  # correct drops by reason
    issues: Counter[str] = field(default_factory=Counter)  # category -> count


@dataclass(frozen=True)
class Arrival:
    """A delivered message: when the car started and finished publishing it, when
    its first copy reached the backend, and how many copies did."""

    vin: str
    stream: str
    wall_start: float
    wall_end: float
    first_arrival: float
    copies: int

    @property
    def latency_s(self) -> float:
        return self.first_arrival - self.wall_start


@dataclass
class DeadLetterSummary:
    total: int
    by_reason: dict[str, int]
    by_stream: dict[str, int]
    accounted: int  # missing messages a dead letter stands for
    unaccounted: int  # missing messages no dead letter stands for (reported as losses)
    unmatched_letters: int  # letters that stand for no missing message
    matched_by_reason: dict[str, int]
    by_subject: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": self.by_reason,
            "by_stream": self.by_stream,
            "accounted_losses": self.accounted,
            "unaccounted_losses": self.unaccounted,
            "letters_without_a_missing_message": self.unmatched_letters,
            "accounted_by_reason": self.matched_by_reason,
            "matched_by": "subject+stream+time" if self.by_subject else "stream+time",
        }


@dataclass
class CheckResult:
    issues: list[Issue]
    tallies: dict[str, StreamTally]
    utility_delivered: float
    approx_errors_m: list[float]
    recorded: int
    published: int
    commands: Counter[str]
    settings_timeouts: int
    key_available: bool
    # Per published message: (vin, stream, outcome) for the report's decision mix.
    outcomes: list[tuple[str, str, str]] = field(default_factory=list)
    # Received positions per vin for the report: (ts_ms, lat, lon, mode, stream).
    received_positions: dict[str, list[tuple[int, float, float, str, str]]] = field(
        default_factory=dict
    )
    # Per concrete stream: messages the backend received, and the entries of their
    # `transforms` user property (what the gateway says it did), for the report.
    forwarded: Counter[str] = field(default_factory=Counter)
    transforms_seen: dict[str, Counter[str]] = field(default_factory=dict)
    # Legal-obligation messages (eCall) that arrived: for end-to-end latency.
    legal_arrivals: list[Arrival] = field(default_factory=list)
    # Set when dead letters were given: how missing messages were accounted for.
    dead_letters: DeadLetterSummary | None = None
    # Message-centre messages (backend -> car) by outcome, and the DPO's
    # actions of the scenario (ownership changes, objections) by outcome.
    messages: Counter[str] = field(default_factory=Counter)
    operator: Counter[str] = field(default_factory=Counter)

    def count(self, category: str) -> int:
        return sum(1 for issue in self.issues if issue.category == category)

    @property
    def leaks(self) -> int:
        return self.count(LEAK)

    @property
    def losses(self) -> int:
        return self.count(LOSS)

    @property
    def median_approx_error_m(self) -> float | None:
        return statistics.median(self.approx_errors_m) if self.approx_errors_m else None

    def by_rule(self) -> Counter[tuple[str, str]]:
        return Counter((issue.category, issue.rule) for issue in self.issues)

    def exit_code(self) -> int:
        """1 on any leak or loss; 3 on other contract violations only; 0 when clean."""
        if self.leaks or self.losses:
            return 1
        return 3 if self.issues else 0

    @property
    def dead_lettered(self) -> int:
        return sum(t.dead_lettered for t in self.tallies.values())

    def summary_json(self) -> dict[str, Any]:
        rules = self.by_rule()
        return {
            "leaks": self.leaks,
            "losses": self.losses,
            "losses_dead_lettered": self.dead_lettered,
            "dead_letters": None if self.dead_letters is None else self.dead_letters.to_json(),
            "issues_by_category": {c: self.count(c) for c in CATEGORIES},
            "issues_by_rule": [
                {"category": c, "rule": r, "count": n} for (c, r), n in rules.most_common()
            ],
            "utility_delivered_share": round(self.utility_delivered, 4),
            "median_approximate_error_m": (
                None if self.median_approx_error_m is None else round(self.median_approx_error_m, 1)
            ),
            "approximate_positions": len(self.approx_errors_m),
            "published": self.published,
            "recorded": self.recorded,
            "commands": dict(self.commands),
            "messages": dict(self.messages),
            "operator_actions": dict(self.operator),
            "settings_timeouts": self.settings_timeouts,
            "pseudonym_key_available": self.key_available,
            "transforms_seen": {
                stream: dict(counts.most_common())
                for stream, counts in sorted(self.transforms_seen.items())
            },
            "streams": {
                stream: {
                    "published": t.published,
                    "must_pass": t.must_pass,
                    "delivered": t.delivered,
                    "duplicates": t.duplicates,
                    "ambiguous": t.ambiguous,
                    "dead_lettered": t.dead_lettered,
                    "dropped": dict(t.dropped),
                    "issues": dict(t.issues),
                }
                for stream, t in sorted(self.tallies.items())
            },
        }


@dataclass
class Recorded:
    index: int
    wall: float
    topic: str
    payload: bytes
    props: list[tuple[str, str]]
    ref: str = ""
    stream: str = ""
    matched: bool = False
    recipient: str = ""


@dataclass
class Published:
    record: dict[str, Any]
    payload: bytes
    message: Message | None

    @property
    def vin(self) -> str:
        return str(self.record["vin"])

    @property
    def stream(self) -> str:
        return str(self.record["stream"])

    @property
    def ts_ms(self) -> int:
        return int(self.record["ts_ms"])


class Checker:
    def __init__(
        self,
        truth: list[dict[str, Any]],
        recording: list[dict[str, Any]],
        policy: Policy,
        key: bytes | None = None,
        dead_letters: list[DeadLetterRecord] | None = None,
        stalls: Sequence[tuple[float, float]] = (),
    ) -> None:
        """`dead_letters`: the gateway's dead-letter store (None: not known). Given, a
        missing message a dead letter stands for is counted as dead-lettered, not
        lost (see sim.deadletters.account_losses). `stalls`: (wall start, wall
        end) of each time the run stopped a gateway instance (STALLS_FILE)."""
        self.policy = policy
        self.stalls = sorted(stalls)
        self.key = key
        self.dead_letters = dead_letters
        self.legal_arrivals: list[Arrival] = []
        # Missing messages waiting for the dead-letter accounting: (publish, outcome index).
        self._missing: list[tuple[Published, int]] = []
        self.truth = truth
        meta = next((r for r in truth if r["type"] == "meta"), {})
        self.backend_prefix = str(meta.get("backend_prefix", "tsp"))
        # Wall seconds per second of the gateway's clock: the gateway runs on the
        # fleet's compressed time when the run says so (`run --simulated-clock`).
        self.gateway_wall_per_s = (
            1.0 / float(meta.get("speedup", 1.0))
            if meta.get("gateway_clock") == "simulated"
            else 1.0
        )
        self._sim_start_s = float(meta.get("sim_start_ms", 0)) / 1000.0
        self._fleet_wall_start = float(
            next((r["wall"] for r in truth if r["type"] == "start"), 0.0)
        )
        self.speedup = float(meta.get("speedup", 1.0))
        self.vins = [str(r["vin"]) for r in truth if r["type"] == "vehicle"]
        self.issues: list[Issue] = []
        # Approximate values of where the car is or was, and odometer readings,
        # as forwarded: (recorder wall time, value), for the refresh-interval rule.
        # (backend arrival wall, car publish wall, value): the gateway decided
        # in between (later than the publish after an outage or a restart).
        self.anchor_values: dict[str, list[tuple[float, float, tuple[float, float]]]] = defaultdict(
            list
        )
        self.odometer_values: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        self.tallies: dict[str, StreamTally] = defaultdict(StreamTally)
        self.approx_errors: list[float] = []
        self.outcomes: list[tuple[str, str, str]] = []
        self.received_positions: dict[str, list[tuple[int, float, float, str, str]]] = defaultdict(
            list
        )
        self.settings: dict[str, dict[int, Settings]] = defaultdict(dict)
        self.settings_applied_wall: dict[str, list[tuple[float, Settings]]] = defaultdict(list)
        # Every revision each car sent: (wall time sent, settings, whether the
        # car got its PrivacyApplied), in order.
        self.settings_sent_wall: dict[str, list[tuple[float, Settings, bool]]] = defaultdict(list)
        self.settings_timeouts = 0
        # (sent wall, how long the gateway took to it) of every message that
        # arrived and every settings revision applied, in order of sending; and
        # per car, of its messages.
        self._lags: list[tuple[float, float]] = []
        self._car_lags: dict[str, list[tuple[float, float]]] = {}
        self._settings_lags: list[tuple[float, float]] = []  # the revisions' part
        for record in truth:
            if record["type"] == "settings":
                snapshot = Settings.from_json(record["settings"])
                self.settings[record["vin"]][snapshot.revision] = snapshot
                if "wall_sent" in record:
                    self.settings_sent_wall[record["vin"]].append(
                        (float(record["wall_sent"]), snapshot, bool(record.get("applied")))
                    )
                if record.get("applied"):
                    self.settings_applied_wall[record["vin"]].append(
                        (float(record["wall_applied"]), snapshot)
                    )
                    if "wall_sent" in record:
                        sent = float(record["wall_sent"])
                        self._settings_lags.append((sent, float(record["wall_applied"]) - sent))
                else:
                    self.settings_timeouts += 1
        # The scenario's DPO actions that the gateway accepted: ownership
        # changes per car (sim time, wall start, wall end), objections per
        # (car, feature) (wall start, wall end).
        self.ownership: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        self.objections: dict[tuple[str, str], tuple[float, float]] = {}
        self.operator_outcomes: Counter[str] = Counter()
        for record in truth:
            if record["type"] == "operator_skipped":
                self.operator_outcomes[f"{record['action']}:skipped"] += 1
            if record["type"] != "operator":
                continue
            vin, action = str(record["vin"]), str(record["action"])
            span = (float(record["wall_start"]), float(record["wall_end"]))
            if int(record["status"]) != 200:
                self.operator_outcomes[f"{action}:failed"] += 1
                self.issues.append(
                    Issue(
                        LEAK,
                        "operator_action_refused",
                        "(control)",
                        vin,
                        f"{action} {record.get('feature', '')} answered {record['status']}:"
                        f" {record.get('detail', '')}"[:300],
                    )
                )
                continue
            self.operator_outcomes[f"{action}:done"] += 1
            if action == OWNERSHIP_CHANGE:
                self.ownership[vin].append((int(record["t_ms"]), *span))
            else:
                self.objections[(vin, str(record["feature"]))] = span
        self.recorded = [
            Recorded(
                index=n,
                wall=float(r["wall"]),
                topic=str(r["topic"]),
                payload=unb64(r["payload"]),
                props=[(str(k), str(v)) for k, v in r.get("props", [])],
            )
            for n, r in enumerate(recording)
        ]
        self.published = [self._published(r) for r in truth if r["type"] == "publish"]
        self._fixes_by_vin: dict[str, list[Published]] = defaultdict(list)
        for pub in self.published:
            rule = policy.rule_for(pub.stream)
            if (
                rule is not None
                and rule.requires_window
                and pub.message is not None
                and pub.record.get("purpose") not in MUST_NOT_ARRIVE
            ):
                self._fixes_by_vin[pub.vin].append(pub)
        self.positions = self._true_positions()
        self.windows = self._windows()
        # Contract rule 17: (vin, request_id) -> when the gateway opened its window.
        self.command_windows = self._command_windows()
        self._fixes_delivered: list[Published] = []  # forwarded fixes, judged together
        # pseudonym stability without the key: input -> outputs seen
        self.pseudonyms_seen: dict[tuple[str, str], set[str]] = defaultdict(set)
        # Copies for a stream's other recipients, and the messages its first
        # recipient got (per concrete stream): every one has one copy each.
        self._copies: list[Recorded] = []
        self._delivered_first: Counter[str] = Counter()

    # --- loading helpers ------------------------------------------------------------
    def _published(self, record: dict[str, Any]) -> Published:
        payload = unb64(record["payload"])
        message: Message | None = None
        cls = message_class(self.policy, str(record["stream"]))
        if cls is not None and record.get("purpose") != PURPOSE_MALFORMED:
            message = cls()
            try:
                message.ParseFromString(payload)
            except DecodeError:
                message = None
        return Published(record, payload, message)

    def _true_positions(self) -> dict[str, tuple[list[int], list[Point]]]:
        """Every `position` GeoPoint each car published, by vehicle time."""
        points: dict[str, list[tuple[int, Point]]] = defaultdict(list)
        for pub in self.published:
            if pub.message is None or pub.record.get("purpose") == PURPOSE_SPOOFED:
                continue
            rule = self.policy.rule_for(pub.stream)
            for name in geopoint_fields(pub.message):
                action = rule.fields.get(name, "place") if rule else "place"
                if (action == "position" or pub.stream == "tbox/ecall") and pub.message.HasField(
                    name
                ):
                    geo = getattr(pub.message, name)
                    if _valid(geo):  # GPS without a fix says nothing about where it is
                        points[pub.vin].append((pub.ts_ms, Point(geo.latitude, geo.longitude)))
        result: dict[str, tuple[list[int], list[Point]]] = {}
        for vin, items in points.items():
            items.sort(key=lambda item: item[0])
            result[vin] = ([t for t, _ in items], [p for _, p in items])
        return result

    def _windows(self) -> dict[str, list[float]]:
        """Wall-clock times at which the gateway opened a find-my-car window, per car."""
        forwarded: dict[str, float] = {}
        for record in self.truth:
            if record["type"] == "command_received" and record["command"] == "find_my_car":
                forwarded.setdefault(str(record["request_id"]), float(record["wall"]))
        windows: dict[str, list[float]] = defaultdict(list)
        for record in self.truth:
            if record["type"] != "command" or record["command"] != "find_my_car":
                continue
            times = []
            if record.get("wall_forwarded") is not None:
                times.append(float(record["wall_forwarded"]))
            if str(record["request_id"]) in forwarded:
                times.append(forwarded[str(record["request_id"])])
            result = record.get("result")
            if result and result.get("accepted") and record.get("wall_result") is not None:
                times.append(float(record["wall_result"]))
            if times:
                windows[str(record["vin"])].append(min(times))
        for opens in windows.values():
            opens.sort()
        return windows

    def _command_windows(self) -> dict[tuple[str, str], float]:
        """When each find_my_car command's window opened, by (vin, request_id)."""
        opened: dict[tuple[str, str], float] = {}
        received = {
            str(r["request_id"]): float(r["wall"])
            for r in self.truth
            if r["type"] == "command_received" and r["command"] == "find_my_car"
        }
        for record in self.truth:
            if record["type"] != "command" or record["command"] != "find_my_car":
                continue
            request_id = str(record["request_id"])
            times = [float(record["wall_forwarded"])] if record.get("wall_forwarded") else []
            if request_id in received:
                times.append(received[request_id])
            result = record.get("result")
            if result and result.get("accepted") and record.get("wall_result") is not None:
                times.append(float(record["wall_result"]))
            if times:
                opened[(str(record["vin"]), request_id)] = min(times)
        return opened

    def _answer_state(self, pub: Published) -> str | None:
        """Contract rule 17 for a fix that is inside some window: None when it
        must pass, AMBIGUOUS when its budget may have gone to another fix, or
        why it must be dropped ("unanswered", "outside_window")."""
        request_id = str(getattr(pub.message, "request_id", "") or "")
        start, end = float(pub.record["wall_start"]), float(pub.record["wall_end"])
        length = self.policy.find_my_car_window_s * self.gateway_wall_per_s
        tol = min(WINDOW_TOLERANCE_S, length / 4)
        if request_id:
            opened = self.command_windows.get((pub.vin, request_id))
            if opened is None:
                return "unanswered"
            if end < opened - tol or start > opened + length + tol:
                return "outside_window"
            if not (opened + tol <= start and end <= opened + length - tol):
                return AMBIGUOUS
            since = opened - tol
        else:
            containing = [
                opened
                for (vin, _), opened in self.command_windows.items()
                if vin == pub.vin and opened - tol <= end and start <= opened + length + tol
            ]
            if not containing:
                return None  # judged by the window rule alone
            since = min(containing) - tol
        # Another fix of this car in the window may have taken its budget first.
        for other in self._fixes_by_vin.get(pub.vin, []):
            if other is pub:
                continue
            other_start = float(other.record["wall_start"])
            other_id = str(getattr(other.message, "request_id", "") or "")
            if since <= other_start <= end and (not request_id or other_id in ("", request_id)):
                return AMBIGUOUS
        return None

    def _check_fix_budgets(self) -> None:
        """Every forwarded fix answers an accepted command inside its window, at
        most fixes_per_command per command (a fix without a request id: the first
        of a window)."""
        length = self.policy.find_my_car_window_s * self.gateway_wall_per_s
        tol = min(WINDOW_TOLERANCE_S, length / 4)
        spent: Counter[tuple[str, str]] = Counter()
        v1_spent: set[tuple[str, str]] = set()
        budget = self.policy.fixes_per_command
        ordered = sorted(self._fixes_delivered, key=lambda p: float(p.record["wall_start"]))
        for pub in ordered:
            request_id = str(getattr(pub.message, "request_id", "") or "")
            start, end = float(pub.record["wall_start"]), float(pub.record["wall_end"])
            if request_id:
                key = (pub.vin, request_id)
                if key not in self.command_windows:
                    continue  # flagged as a leak already (unanswered)
                spent[key] += 1
                if spent[key] > budget:
                    self._issue(
                        LEAK,
                        "find_my_car_fixes_over_budget",
                        pub.stream,
                        pub.vin,
                        f"seq {pub.record['seq']}: fix {spent[key]} for {request_id}",
                    )
                continue
            candidates = sorted(
                (opened, key)
                for key, opened in self.command_windows.items()
                if key[0] == pub.vin
                and opened - tol <= end
                and start <= opened + length + tol
                and key not in v1_spent
                and spent[key] < budget
            )
            if not candidates:
                self._issue(
                    LEAK,
                    "find_my_car_fix_answers_no_command",
                    pub.stream,
                    pub.vin,
                    f"seq {pub.record['seq']}: no window with a fix left for it",
                )
                continue
            key = candidates[0][1]
            v1_spent.add(key)
            spent[key] += 1

    def _settings_candidates(self, record: dict[str, Any]) -> list[Settings | None]:
        history = self.settings.get(str(record["vin"]), {})
        applied = record.get("applied_rev")
        candidates: list[Settings | None] = [
            history.get(int(applied)) if applied is not None else None
        ]
        pending = record.get("pending_rev")
        if pending is not None and int(pending) in history:
            candidates.append(history[int(pending)])
        return candidates

    def _window_state(self, vin: str, wall_start: float, wall_end: float) -> bool | None:
        """True: certainly inside a window; False: certainly outside; None: too close to say."""
        length = self.policy.find_my_car_window_s * self.gateway_wall_per_s
        tol = min(WINDOW_TOLERANCE_S, length / 4)
        certainly_in = False
        near = False
        for opened in self.windows.get(vin, []):
            closes = opened + length
            if opened + tol <= wall_start and wall_end <= closes - tol:
                certainly_in = True
                # A settings change that disabled the feature inside the window may or may
                # not close it: the contract does not say, so do not judge such messages.
                for applied_wall, settings in self.settings_applied_wall.get(vin, []):
                    if opened <= applied_wall <= wall_start and (
                        settings.privacy_mode or not settings.enabled("find_my_car")
                    ):
                        return None
            elif not (wall_end < opened - tol or wall_start > closes + tol):
                near = True
        if certainly_in:
            return True
        return None if near else False

    # --- the check ------------------------------------------------------------------
    def run(self) -> CheckResult:
        index = self._index_recording()
        self._check_publishes(index)
        dead_letter_summary = self._account_missing()
        self._check_fix_budgets()
        self._check_global_grid()
        self._check_refresh_interval()
        self._check_recipients()
        self._check_unmatched()
        self._check_app_topics()
        commands = self._check_commands()
        messages = self._check_messages()
        self._check_applied()
        must_pass = sum(t.must_pass for t in self.tallies.values())
        delivered = sum(t.delivered for t in self.tallies.values())
        return CheckResult(
            issues=self.issues,
            tallies=dict(self.tallies),
            utility_delivered=delivered / must_pass if must_pass else 1.0,
            approx_errors_m=self.approx_errors,
            recorded=len(self.recorded),
            published=len(self.published),
            commands=commands,
            settings_timeouts=self.settings_timeouts,
            key_available=self.key is not None,
            outcomes=self.outcomes,
            received_positions=dict(self.received_positions),
            forwarded=Counter(rec.stream for rec in self.recorded if rec.stream),
            transforms_seen=self._transforms_seen(),
            legal_arrivals=self.legal_arrivals,
            dead_letters=dead_letter_summary,
            messages=messages,
            operator=self.operator_outcomes,
        )

    def _transforms_seen(self) -> dict[str, Counter[str]]:
        seen: dict[str, Counter[str]] = defaultdict(Counter)
        for rec in self.recorded:
            if not rec.stream:
                continue
            listed = next((value for name, value in rec.props if name == "transforms"), "")
            seen[rec.stream].update(t for t in listed.split(",") if t)
        return dict(seen)

    def _issue(
        self, category: str, rule: str, stream: str, vin: str, detail: str, topic: str = ""
    ) -> None:
        self.issues.append(Issue(category, rule, stream, vin, detail, topic))
        self.tallies[stream].issues[category] += 1

    def _index_recording(self) -> dict[tuple[Any, ...], list[Recorded]]:
        index: dict[tuple[Any, ...], list[Recorded]] = defaultdict(list)
        prefixes = self.policy.prefixes(self.backend_prefix)
        for rec in self.recorded:
            recipient = prefixes.get(rec.topic.split("/", 1)[0])
            if recipient is None:
                continue
            parts = rec.topic.split("/")
            if len(parts) < 4 or parts[2] in ("cmd", "msg"):
                continue
            rec.ref, rec.stream, rec.recipient = parts[1], "/".join(parts[2:]), recipient
            rule = self.policy.rule_for(rec.stream)
            if rule is not None and rule.routes and recipient != next(iter(rule.routes)):
                # Another recipient's copy: judged by _check_recipients.
                self._copies.append(rec)
                continue
            index[("raw", rec.stream, rec.payload)].append(rec)
            cls = message_class(self.policy, rec.stream)
            if cls is None:
                continue
            message = cls()
            try:
                message.ParseFromString(rec.payload)
            except DecodeError:
                continue
            if rec.stream.startswith(APP_STREAM_PREFIX):
                nonce = _app_nonce(message)
                if nonce:
                    index[("app", nonce)].append(rec)
            else:
                header = message.header  # type: ignore[attr-defined]
                index[(rec.ref, rec.stream, header.seq, header.timestamp_ms)].append(rec)
        return index

    def _keys_for(self, pub: Published) -> list[tuple[Any, ...]]:
        record = pub.record
        if record.get("purpose") == PURPOSE_MALFORMED:
            return [("raw", pub.stream, pub.payload)]
        if pub.stream.startswith(APP_STREAM_PREFIX):
            return [("app", str(record["nonce"]))]
        # The unit's own clock stamped the header (it may be minutes off).
        header_ts = int(record.get("header_ts_ms") or pub.ts_ms)
        keys = [(pub.vin, pub.stream, int(record["seq"]), header_ts)]
        if record.get("purpose") == PURPOSE_SPOOFED:
            # A gateway that trusts header.vin would forward it under the claimed VIN.
            keys.append((str(record["header_vin"]), pub.stream, int(record["seq"]), header_ts))
        return keys

    def _matches(
        self, pub: Published, index: dict[tuple[Any, ...], list[Recorded]]
    ) -> list[Recorded]:
        """The forwarded copies of one message."""
        matches: list[Recorded] = []
        for key in self._keys_for(pub):
            matches.extend(r for r in index.get(key, []) if r not in matches)
        if pub.stream.startswith(APP_STREAM_PREFIX):
            matches = [r for r in matches if r.stream == pub.stream]
        return matches

    def _arrival_lags(
        self, index: dict[tuple[Any, ...], list[Recorded]]
    ) -> tuple[list[tuple[float, float]], dict[str, list[tuple[float, float]]]]:
        """For each message that arrived (eCall and messages that must not
        arrive left out): its publish wall time and how long it took to its
        first copy; with each settings revision a car saw applied (when it was
        sent, how long it took to be applied), sorted by the first. And the
        messages' part per car."""
        lags: list[tuple[float, float]] = []
        per_car: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for pub in self.published:
            if self.policy.is_legal_obligation(pub.stream) or (
                str(pub.record.get("purpose")) in MUST_NOT_ARRIVE
            ):
                continue
            if matches := self._matches(pub, index):
                published = float(pub.record["wall_end"])
                lag = (published, min(r.wall for r in matches) - published)
                lags.append(lag)
                per_car[pub.vin].append(lag)
        lags.extend(self._settings_lags)
        lags.sort()
        return lags, per_car

    def _slowest(self, since: float, until: float) -> float:
        """The longest any message or revision sent in [since, until] took."""
        lags = self._lags
        start = bisect.bisect_left(lags, (since, float("-inf")))
        end = bisect.bisect_right(lags, (until, float("inf")))
        return max((lag for _, lag in lags[start:end]), default=0.0)

    def _decision_lag(self, pub: Published) -> float:
        """How late the gateway may have got to this message: as late as its
        car's messages of that stretch (LAG_NEIGHBOURHOOD_WALL_S), or any car's
        of that moment (MOMENT_WALL_S), took; published while the run stopped
        an instance (or just before), until that instance was back and had
        worked off what it held. Local to the car and the moment, so a slow
        stretch of a run excuses nothing elsewhere."""
        published = float(pub.record["wall_end"])
        lag = max(
            (
                lag
                for at, lag in self._car_lags.get(pub.vin, ())
                if abs(at - published) <= LAG_NEIGHBOURHOOD_WALL_S
            ),
            default=0.0,
        )
        lag = max(lag, self._slowest(published - MOMENT_WALL_S, published + MOMENT_WALL_S))
        for start, end in self.stalls:
            if start - STALL_LEAD_WALL_S <= published <= end:
                held = self._slowest(start - STALL_LEAD_WALL_S, end)
                lag = max(lag, end - published, held - (published - start))
        return lag

    def _check_publishes(self, index: dict[tuple[Any, ...], list[Recorded]]) -> None:
        self._lags, self._car_lags = self._arrival_lags(index)
        for pub in self.published:
            record = pub.record
            tally = self.tallies[pub.stream]
            tally.published += 1
            matches = self._matches(pub, index)
            for rec in matches:
                rec.matched = True
            if matches:
                self._delivered_first[pub.stream] += 1
            rule = self.policy.rule_for(pub.stream)
            if matches and rule is not None and rule.requires_window:
                self._fixes_delivered.append(pub)
            if record.get("error"):
                tally.ambiguous += 1
                self.outcomes.append((pub.vin, pub.stream, "publish_failed"))
                continue
            purpose = str(record.get("purpose"))
            decision = purpose if purpose in MUST_NOT_ARRIVE else self._decision(pub)
            if decision == PASS and not matches and self._dropped_by_later_settings(pub):
                decision = AMBIGUOUS
            if decision == PASS:
                tally.must_pass += 1
                if not matches:
                    if self.dead_letters is not None:
                        # Judged once every publish is seen: a dead letter may stand for it.
                        self._missing.append((pub, len(self.outcomes)))
                        self.outcomes.append((pub.vin, pub.stream, "lost"))
                        continue
                    self._lost(pub)
                    self.outcomes.append((pub.vin, pub.stream, "lost"))
                    continue
                tally.delivered += 1
                if self.policy.is_legal_obligation(pub.stream):
                    self.legal_arrivals.append(
                        Arrival(
                            pub.vin,
                            pub.stream,
                            float(record["wall_start"]),
                            float(record["wall_end"]),
                            min(rec.wall for rec in matches),
                            len(matches),
                        )
                    )
                tally.duplicates += len(matches) - 1
                for rec in matches:
                    self._check_forwarded(pub, rec, self._candidates_allowing(pub, rec.wall))
                self.outcomes.append((pub.vin, pub.stream, "delivered"))
            elif decision == AMBIGUOUS:
                tally.ambiguous += 1
                for rec in matches:
                    self._check_forwarded(pub, rec, self._candidates_allowing(pub, rec.wall))
                self.outcomes.append(
                    (pub.vin, pub.stream, "ambiguous_delivered" if matches else "ambiguous_dropped")
                )
            else:
                if matches:
                    self._issue(
                        LEAK,
                        _leak_rule(decision),
                        pub.stream,
                        pub.vin,
                        f"seq {record['seq']} ts {pub.ts_ms} must be dropped ({decision}) "
                        f"but arrived {len(matches)}x on {matches[0].topic}",
                        matches[0].topic,
                    )
                    self.outcomes.append((pub.vin, pub.stream, "leaked"))
                else:
                    tally.dropped[decision] += 1
                    self.outcomes.append((pub.vin, pub.stream, f"dropped:{decision}"))

    def _lost(self, pub: Published, why: str = "") -> None:
        self._issue(
            LOSS,
            "allowed_message_not_delivered",
            pub.stream,
            pub.vin,
            f"seq {pub.record['seq']} ts {pub.ts_ms} ({pub.record.get('purpose')}) never "
            f"reached the backend{why}",
            str(pub.record["topic"]),
        )

    def _gateway_to_wall(self, t: float) -> float:
        """Wall time of a gateway-clock time (the fleet's time mapping)."""
        return self._fleet_wall_start + (t - self._sim_start_s) * self.gateway_wall_per_s

    def _account_missing(self) -> DeadLetterSummary | None:
        """Missing messages a dead letter stands for are dead-lettered; the rest are lost."""
        if self.dead_letters is None:
            return None
        letters = self.dead_letters
        losses = []
        for ref, (pub, _) in enumerate(self._missing):
            rule = self.policy.rule_for(pub.stream)
            losses.append(
                LostMessage(
                    ref,
                    pub.vin,
                    rule.key if rule is not None else pub.stream,
                    float(pub.record["wall_start"]),
                )
            )
        key = self.key
        subject_of = None if key is None else (lambda vin: pseudonym(key, "audit-subject", vin))
        if self.gateway_wall_per_s != 1.0:
            # Letters are stamped on the gateway's clock: the fleet's compressed
            # time when the run says so; losses are on wall time.
            letters = [
                dataclasses.replace(d, created_at=self._gateway_to_wall(d.created_at))
                for d in letters
            ]
        accounting = account_losses(losses, letters, subject_of)
        for loss, _ in accounting.matched:
            pub, at = self._missing[loss.ref]
            self.tallies[pub.stream].dead_lettered += 1
            self.outcomes[at] = (pub.vin, pub.stream, "dead_lettered")
        for loss in accounting.unaccounted:
            self._lost(self._missing[loss.ref][0], " and no dead letter stands for it")
        return DeadLetterSummary(
            total=len(letters),
            by_reason=dict(Counter(d.reason for d in letters).most_common()),
            by_stream=dict(Counter(d.stream for d in letters).most_common()),
            accounted=len(accounting.matched),
            unaccounted=len(accounting.unaccounted),
            unmatched_letters=len(accounting.unmatched_letters),
            matched_by_reason=dict(Counter(d.reason for _, d in accounting.matched).most_common()),
            by_subject=accounting.by_subject,
        )

    def _decision(self, pub: Published) -> str:
        window: bool | None = None
        rule = self.policy.rule_for(pub.stream)
        if rule is not None and rule.requires_window:
            window = self._window_state(
                pub.vin, float(pub.record["wall_start"]), float(pub.record["wall_end"])
            )
        decisions = {
            decide_message(self.policy, pub.stream, settings, window)
            for settings in self._settings_candidates(pub.record)
        }
        arrival = decisions.pop() if len(decisions) == 1 else AMBIGUOUS
        if rule is not None and rule.requires_window and arrival in (PASS, AMBIGUOUS):
            answer = self._answer_state(pub)
            if answer is not None and (arrival == PASS or answer != AMBIGUOUS):
                arrival = answer
        if self.policy.is_legal_obligation(pub.stream):
            return arrival
        published = float(pub.record["wall_start"])
        for t_ms, wall_start, wall_end in self.ownership.get(pub.vin, ()):
            if published >= wall_end and pub.ts_ms < t_ms:
                # Captured under the previous owner, uploaded after the change.
                return "previous_owner"
            if wall_start - OPERATOR_SLACK_S <= published < wall_start and arrival == PASS:
                # Published just before the change: the gateway may have decided
                # it before (forwarded) or after (dropped, the car unknown).
                return AMBIGUOUS
        decided = self._capture_decision(pub, arrival)
        if decided in (PASS, AMBIGUOUS):
            return self._before_known_settings(pub) or decided
        return decided

    def _gateway_time(self, wall: float) -> float:
        """The gateway's clock at a wall time (inverse of `_gateway_to_wall`)."""
        return self._sim_start_s + (wall - self._fleet_wall_start) / self.gateway_wall_per_s

    def _before_known_settings(self, pub: Published) -> str | None:
        """Contract rule 11 before a car's first settings: the gateway knows
        nothing of the time before it applied them, so it drops what was
        captured before then (`captured_before_known_settings`), whatever the
        car had set: a message stating its revision when even the latest time
        the skew margin allows is earlier, one stating none when its stamp is.
        It happens when a car's first settings wait for a gateway that is down
        or slow: at a compressed clock a second of restart is minutes. When the
        gateway applied them is known here from the wall time the car got its
        PrivacyApplied: near that boundary the message is not judged."""
        applied = self.settings_applied_wall.get(pub.vin)
        if not applied:
            return None
        first = self._gateway_time(min(wall for wall, _ in applied))
        stamped = int(pub.record.get("header_ts_ms") or pub.ts_ms) / 1000.0
        latest = stamped + CAPTURE_SKEW_S if int(pub.record.get("capture_rev") or 0) else stamped
        tolerance = FIRST_SETTINGS_TOLERANCE_WALL_S / self.gateway_wall_per_s
        if latest < first - tolerance:
            return "captured_before_known_settings"
        if latest < first + tolerance:
            return AMBIGUOUS
        return None

    def epoch_at(self, vin: str, wall: float) -> int:
        """The car's pseudonym epoch for a message published at `wall`: one
        more per ownership change done before."""
        return sum(1 for _, _, end in self.ownership.get(vin, ()) if end <= wall)

    def _capture_decision(self, pub: Published, arrival: str) -> str:
        """Consent at capture time and the causal token (contract rules 11, 12):
        a message passes only if the settings it states it was captured under
        allowed it too; one stating a revision the gateway had not applied when
        it arrived is parked until that revision is applied (or dropped as
        `settings_pending` if it never is)."""
        record = pub.record
        revision = int(record.get("capture_rev") or 0)
        if revision <= 0:
            return arrival
        vin = str(record["vin"])
        captured = self.settings.get(vin, {}).get(revision)
        applied = record.get("applied_rev")
        if applied is None or revision > int(applied):
            if not any(s.revision >= revision for _, s in self.settings_applied_wall[vin]):
                return "settings_pending"
            # Released when its revision was applied: decided then, under settings
            # of that moment; whether it was released before the gateway's maximum
            # wait is not known here.
            at_capture = decide_message(self.policy, pub.stream, captured, True)
            return at_capture if at_capture not in (PASS, AMBIGUOUS) else AMBIGUOUS
        if captured is None:
            return arrival
        at_capture = decide_message(self.policy, pub.stream, captured, True)
        if at_capture not in (PASS, AMBIGUOUS) and arrival in (PASS, AMBIGUOUS):
            return at_capture
        return arrival

    def _captured_under(self, pub: Published) -> Settings | None:
        revision = int(pub.record.get("capture_rev") or 0)
        if revision <= 0:
            return None
        return self.settings.get(str(pub.record["vin"]), {}).get(revision)

    def _sent_after(
        self, pub: Published, until: float, *, applied_only: bool = False
    ) -> list[Settings]:
        """The revisions the car sent after it published this message and
        before `until` (wall). The gateway decides a message under the settings
        it holds when it gets to it: a later revision applied first (by another
        instance of a group, while the broker held the message behind this one's
        Receive Maximum) counts too, and can only make the decision stricter,
        since the settings it was captured under still bound it (rules 11, 21)."""
        published = float(pub.record["wall_start"])
        return [
            s
            for sent, s, applied in self.settings_sent_wall.get(pub.vin, ())
            if published < sent < until and (applied or not applied_only)
        ]

    def _dropped_by_later_settings(self, pub: Published) -> bool:
        """Whether a revision the car sent (and saw applied) just after this
        message would drop it: then missing it is not judged a loss. "Just
        after": sooner than the gateway may have got to it (_decision_lag)."""
        if self.policy.is_legal_obligation(pub.stream):
            return False
        until = float(pub.record["wall_end"]) + self._decision_lag(pub)
        return any(
            decide_message(self.policy, pub.stream, later, True) not in (PASS, AMBIGUOUS)
            for later in self._sent_after(pub, until, applied_only=True)
        )

    def _candidates_allowing(self, pub: Published, decided_by: float) -> list[Settings | None]:
        """Settings under which this message may be forwarded (to judge its
        transforms); `decided_by`: the wall time the gateway had decided it by
        (a copy's arrival), so the car's later revisions sent before count too."""
        candidates = self._settings_candidates(pub.record)
        if not self.policy.is_legal_obligation(pub.stream):
            # Never looser than settings in force when it was published that
            # let it through: a later revision's location mode counts only
            # where it is stricter than one of those (settings that drop it, or
            # none yet, bound nothing: the copy is judged under the others).
            bases = [
                base
                for base in candidates
                if base is not None
                and decide_message(self.policy, pub.stream, base, True) in (PASS, AMBIGUOUS)
            ]
            candidates += [
                dataclasses.replace(later, location=_stricter(later.location, base.location))
                for later in self._sent_after(pub, decided_by)
                for base in bases
            ]
        allowing = [
            s
            for s in candidates
            if decide_message(self.policy, pub.stream, s, True) in (PASS, AMBIGUOUS)
        ]
        captured = self._captured_under(pub)
        if captured is None or self.policy.is_legal_obligation(pub.stream):
            return allowing or candidates
        # The stricter location mode of capture and arrival applies.
        return [
            s
            if s is None
            else dataclasses.replace(s, location=_stricter(s.location, captured.location))
            for s in (allowing or candidates)
        ]

    # --- transforms ---------------------------------------------------------------
    def _check_forwarded(
        self, pub: Published, rec: Recorded, candidates: list[Settings | None]
    ) -> None:
        """Judge one delivered copy; accept it if it is right under any candidate settings."""
        attempts: list[list[Issue]] = []
        for settings in candidates:
            saved_errors = len(self.approx_errors)
            saved_positions = {k: len(v) for k, v in self.received_positions.items()}
            saved_anchor = len(self.anchor_values[pub.vin])
            saved_odometer = len(self.odometer_values[pub.vin])
            found = self._transform_issues(pub, rec, settings)
            if not found:
                return
            del self.approx_errors[saved_errors:]
            for vin, items in self.received_positions.items():
                del items[saved_positions.get(vin, 0) :]
            del self.anchor_values[pub.vin][saved_anchor:]
            del self.odometer_values[pub.vin][saved_odometer:]
            attempts.append(found)
        if attempts:
            for issue in min(attempts, key=len):
                self._issue(
                    issue.category, issue.rule, issue.stream, issue.vin, issue.detail, issue.topic
                )

    def _transform_issues(
        self, pub: Published, rec: Recorded, settings: Settings | None
    ) -> list[Issue]:
        found: list[Issue] = []
        stream, vin = pub.stream, pub.vin

        def add(category: str, rule: str, detail: str) -> None:
            found.append(Issue(category, rule, stream, vin, detail, rec.topic))

        self._check_properties(pub, rec, add)
        if self.policy.is_legal_obligation(stream):
            if rec.payload != pub.payload:
                add(
                    WRONG_TRANSFORM,
                    "legal_obligation_payload_modified",
                    "eCall must be byte-identical",
                )
            if rec.ref != vin:
                add(WRONG_TRANSFORM, "wrong_topic_ref", f"eCall forwarded under {rec.ref}")
            return found
        cls = message_class(self.policy, stream)
        if cls is None or pub.message is None:
            return found
        received = cls()
        try:
            received.ParseFromString(rec.payload)
        except DecodeError:
            add(WRONG_TRANSFORM, "undecodable_forward", "forwarded payload does not decode")
            return found
        original = pub.message
        rule = self.policy.rule_for(stream)
        assert rule is not None
        is_app = stream.startswith(APP_STREAM_PREFIX)
        if is_app:
            self._check_app(pub, rec, received, add)
        else:
            if rec.ref != vin:
                add(
                    WRONG_TRANSFORM,
                    "wrong_topic_ref",
                    f"forwarded under {rec.ref}, expected the VIN",
                )
            if received.header.vin != vin:  # type: ignore[attr-defined]
                add(WRONG_TRANSFORM, "header_vin_changed", "header.vin differs from the car's VIN")
        mode = settings.location if settings is not None else common_pb2.LOCATION_OFF
        cleared: list[str] = []
        geo = set(geopoint_fields(original))
        for name in geo:
            cleared.append(name)
            action = rule.fields.get(name, "place")
            self._check_geopoint(pub, received, original, name, action, mode, add, rec.wall)
        for name, action in rule.fields.items():
            if name in geo:  # judged above, whatever the action
                continue
            if action == "place_id":
                cleared.append(name)
                got, want = getattr(received, name), getattr(original, name)
                if mode == common_pb2.LOCATION_PRECISE:
                    if got != want:
                        add(
                            OVER_COARSENING, f"{name}_changed_under_precise", f"{got!r} != {want!r}"
                        )
                elif got:
                    add(LEAK, f"{name}_present", f"{name}={got!r} under {_mode_name(mode)}")
            elif action == "remove":
                cleared.append(name)
                if getattr(received, name):
                    add(LEAK, f"{name}_present", f"{name} was forwarded")
            elif action in ("odometer", "generalize", "enum", "place_text"):
                cleared.append(name)
                self._check_side_field(
                    pub, rule, name, action, original, received, mode, add, rec.wall
                )
            elif action == "truncate_ip":
                cleared.append(name)
                self._check_ip(getattr(original, name), getattr(received, name), add)
            elif action == "pseudonymize" and name != "payload":
                cleared.append(name)
                # A MAC is keyed per vehicle (one phone in two cars: two values)
                # and per owner (a new owner starts a new epoch).
                purpose = f"bluetooth_mac/{vin}" if name == "bluetooth_mac" else "voice_session"
                value = getattr(original, name)
                if name == "bluetooth_mac":
                    value = value.upper()
                    epoch = self.epoch_at(pub.vin, float(pub.record["wall_start"]))
                    purpose += f"@{epoch}" if epoch else ""
                self._check_pseudonym(purpose, value, getattr(received, name), add, name)
        # Everything the policy does not act on must arrive unchanged.
        left, right = cls(), cls()
        left.CopyFrom(original)
        right.CopyFrom(received)
        for name in cleared:
            left.ClearField(name)
            right.ClearField(name)
        if is_app:
            # Rule 15: the header of a pseudonymized stream shares nothing with
            # VIN streams (vin, seq and capture time are rewritten).
            sent_header, got_header = original.header, received.header  # type: ignore[attr-defined]
            if sent_header.seq and got_header.seq == sent_header.seq:
                add(LEAK, "app_seq_shared", "header.seq of an app stream equals the car's")
            if got_header.timestamp_ms % 1000 or got_header.timestamp_ms > sent_header.timestamp_ms:
                add(LEAK, "app_time_precise", "header.timestamp_ms of an app stream not coarsened")
            left.ClearField("header")
            right.ClearField("header")
        if left.SerializeToString(deterministic=True) != right.SerializeToString(
            deterministic=True
        ):
            add(WRONG_TRANSFORM, "unexpected_field_change", "fields the policy keeps were changed")
        return found

    def _check_properties(self, pub: Published, rec: Recorded, add: Any) -> None:
        props: dict[str, str] = {}
        for name, value in rec.props:
            props.setdefault(name, value)
        missing = [name for name in REQUIRED_PROPERTIES if name not in props]
        for name in missing:
            add(USER_PROPERTIES, f"missing_{name}", f"user property {name} absent")
        feature = self.policy.feature_for(pub.stream)
        rule = self.policy.rule_for(pub.stream)
        assert rule is not None
        expected = {
            "policy-version": self.policy.version,
            "legal-basis": self.policy.legal_basis_for(feature),
            "retention-days": str(rule.retention_days),
        }
        for name, want in expected.items():
            if name in props and props[name] != want:
                add(USER_PROPERTIES, f"wrong_{name}", f"{name}={props[name]!r}, expected {want!r}")
        if "feature" in props and props["feature"] not in (feature, feature.split(".", 1)[0]):
            add(
                USER_PROPERTIES,
                "wrong_feature",
                f"feature={props['feature']!r}, expected {feature!r}",
            )
        if "transforms" in props and not props["transforms"] and rec.payload != pub.payload:
            add(USER_PROPERTIES, "transforms_not_listed", "payload changed but transforms is empty")

    def _check_geopoint(
        self,
        pub: Published,
        received: Message,
        original: Message,
        name: str,
        action: str,
        mode: int,
        add: Any,
        wall: float = 0.0,
    ) -> None:
        has_original, has_received = original.HasField(name), received.HasField(name)
        if action == "remove":  # the policy never sends it, whatever the mode
            if has_received:
                add(LEAK, f"{name}_present", f"{name} was forwarded")
            return
        if has_original and not _valid(getattr(original, name)):
            # GPS without a fix: nothing to report, in every mode.
            if has_received:
                add(WRONG_TRANSFORM, "invalid_position_forwarded", f"{name} had no fix")
            return
        if mode not in LOCATION_ON:
            if has_received:
                add(LEAK, "geopoint_under_location_off", f"{name} present under {_mode_name(mode)}")
            return
        if not has_original:
            if has_received:
                add(WRONG_TRANSFORM, "geopoint_invented", f"{name} was not sent by the car")
            return
        if not has_received:
            add(OVER_COARSENING, "geopoint_removed", f"{name} removed under {_mode_name(mode)}")
            return
        got, want = getattr(received, name), getattr(original, name)
        if mode == common_pb2.LOCATION_PRECISE:
            if got.SerializeToString(deterministic=True) != want.SerializeToString(
                deterministic=True
            ):
                add(OVER_COARSENING, "geopoint_changed_under_precise", f"{name} changed")
            else:
                self.received_positions[pub.vin].append(
                    (pub.ts_ms, got.latitude, got.longitude, "precise", pub.stream)
                )
            return
        # Approximate.
        cell = self.policy.cell_size_m
        if got.latitude == want.latitude and got.longitude == want.longitude:
            add(LEAK, "location_finer_than_mode", f"{name} forwarded exactly under APPROXIMATE")
            return
        if got.altitude_m or got.heading_deg or got.speed_kmh:
            add(LEAK, "approximate_keeps_motion", f"{name} keeps altitude/heading/speed")
        if abs(got.horizontal_accuracy_m - cell) > 0.5:
            add(
                WRONG_TRANSFORM,
                "approximate_accuracy",
                f"accuracy {got.horizontal_accuracy_m} != {cell}",
            )
        candidates = [Point(want.latitude, want.longitude)]
        if action == "position":
            refresh_ms = self._refresh_sim_ms()
            # The anchor: refreshed at most an interval (gateway clock) before. A
            # record uploaded late may meet a coarse value refreshed after it was
            # captured (the refresh interval runs on arrival).
            later_ms = refresh_ms if pub.record.get("uploaded_late") else 0
            candidates.extend(
                self._positions_between(pub.vin, pub.ts_ms - refresh_ms, pub.ts_ms + later_ms)
            )
        elif action != "destination":
            # Where the car was: the anchor that held before, however old.
            candidates.extend(self._positions_between(pub.vin, 0, pub.ts_ms))
        if not any(_within_cell(got, point, cell) for point in candidates):
            error = distance_m(Point(got.latitude, got.longitude), candidates[0])
            if error < cell / 2 / 4:  # far inside any cell: finer than the grid allows
                add(LEAK, "location_finer_than_mode", f"{name} {error:.0f} m from truth, off-grid")
            else:
                add(
                    WRONG_TRANSFORM,
                    "approximate_outside_cell",
                    f"{name} {error:.0f} m from truth ({action})",
                )
            return
        self.approx_errors.append(distance_m(Point(got.latitude, got.longitude), candidates[0]))
        self.received_positions[pub.vin].append(
            (pub.ts_ms, got.latitude, got.longitude, "approximate", pub.stream)
        )
        if action != "destination":
            self.anchor_values[pub.vin].append(
                (wall, float(pub.record["wall_start"]), (got.latitude, got.longitude))
            )

    def _refresh_sim_ms(self) -> int:
        """The refresh interval (gateway clock) in simulated ms, with tolerance."""
        wall_s = self.policy.refresh_interval_s * self.gateway_wall_per_s
        return int(wall_s * self.speedup * 1000 * (1 + REFRESH_TOLERANCE)) + 2000

    def _check_side_field(
        self,
        pub: Published,
        rule: Any,
        name: str,
        action: str,
        original: Message,
        received: Message,
        mode: int,
        add: Any,
        wall: float,
    ) -> None:
        """Contract rule 14: fields that would rebuild a track or name a place."""
        got, want = getattr(received, name), getattr(original, name)
        if action == "enum":
            allowed = rule.enums.get(name, frozenset())
            if got and (got not in allowed or got != want):
                add(LEAK, f"{name}_free_text", f"{name}={got[:40]!r} is not a listed value")
            elif want in allowed and got != want:
                add(OVER_COARSENING, f"{name}_listed_value_removed", f"{name}={want!r} removed")
            return
        if mode == common_pb2.LOCATION_PRECISE:
            if got != want:
                add(OVER_COARSENING, f"{name}_changed_under_precise", f"{got!r} != {want!r}")
            return
        if mode not in LOCATION_ON:
            if got:
                add(LEAK, f"{name}_under_location_off", f"{name}={got!r} under {_mode_name(mode)}")
            return
        if action == "place_text":
            if got:
                add(LEAK, f"{name}_under_approximate", f"{name}={got!r} under approximate")
        elif action == "generalize":
            step = rule.steps[name]
            on_grid = abs(got / step - round(got / step)) < 1e-6
            if not on_grid or abs(got - want) > step / 2 + 1e-6:
                add(
                    LEAK if not on_grid else WRONG_TRANSFORM,
                    f"{name}_not_on_step_grid",
                    f"{name}={got!r} from {want!r} (step {step:g})",
                )
        elif action == "odometer" and got:
            self.odometer_values[pub.vin].append(
                (wall, float(pub.record["wall_start"]), float(got))
            )

    def _check_global_grid(self) -> None:
        """Approximate values are points of the one public grid (rows at whole cell
        heights from the pole, contract rule 13), not of a grid of the car's own
        whose cell centre is where the car is: that would mark every change of
        value as a crossing of a known line. Fresh per-message noise (which would
        average out) is off the grid too."""
        step = self.policy.cell_size_m / METRES_PER_DEGREE
        for vin, items in self.received_positions.items():
            for _, lat, _, mode, _ in items:
                if mode != "approximate":
                    continue
                phase = ((lat + 90.0) / step - 0.5) % 1.0
                if min(phase, 1.0 - phase) > 0.02:
                    self._issue(
                        WRONG_TRANSFORM,
                        "approximate_not_on_global_grid",
                        "(all)",
                        vin,
                        f"approximate latitude {lat:.6f} is {phase:.2f} cells off the global grid",
                    )
                    break

    def _check_refresh_interval(self) -> None:
        """Contract rules 13 and 14: per car, across all units and streams, the
        approximate value of where the car is or was, and the odometer frozen
        with it, change at most once per refresh interval on the gateway's
        clock, whatever the cars' timestamps say."""
        interval = self.policy.refresh_interval_s * self.gateway_wall_per_s
        least = interval * (1 - REFRESH_TOLERANCE)
        series: list[tuple[str, str, dict[str, list[tuple[float, float, Any]]]]] = [
            ("approximate_refresh_too_soon", "approximate value", dict(self.anchor_values)),
            ("odometer_moves_between_refreshes", "odometer", dict(self.odometer_values)),
        ]
        for rule, what, by_vin in series:
            for vin, items in by_vin.items():
                # Judged by the widest the gateway's gap can have been: from the
                # publish of the message that changed the value before to the
                # arrival of the one that changed it again (outages delay both).
                items = sorted(items, key=lambda item: item[0])
                last_change: float | None = None
                changes = [start for _, start, _ in self.ownership.get(vin, ())]
                for (before_wall, _, before), (wall, published, value) in itertools.pairwise(items):
                    if any(before_wall <= start <= published for start in changes):
                        # A new owner: a new grid offset and anchor, a new series.
                        last_change = None
                        continue
                    if value == before:
                        continue
                    if last_change is not None and wall - last_change < least:
                        self._issue(
                            LEAK,
                            rule,
                            "(all)",
                            vin,
                            f"{what} changed at most {wall - last_change:.2f} s (wall) after the"
                            f" previous change; the refresh interval is {interval:.2f} s",
                        )
                        break
                    last_change = min(wall, published)

    def _positions_between(self, vin: str, start_ms: int, end_ms: int) -> list[Point]:
        times, points = self.positions.get(vin, ([], []))
        low = bisect.bisect_left(times, start_ms - 1000)
        high = bisect.bisect_right(times, end_ms + 1000)
        return points[low:high]

    def _check_ip(self, original: str, received: str, add: Any) -> None:
        try:
            expected = truncate_ip(original)
        except ValueError:
            return
        if received == original and expected != original:
            add(LEAK, "full_ip_address", f"ip_address {received} not truncated")
        elif received != expected:
            try:
                same = ipaddress.ip_address(received) == ipaddress.ip_address(expected)
            except ValueError:
                same = False
            if not same:
                add(WRONG_TRANSFORM, "ip_truncation", f"{received!r}, expected {expected!r}")

    def _check_pseudonym(
        self, purpose: str, value: str, received: str, add: Any, name: str
    ) -> None:
        if not received:
            add(OVER_COARSENING, f"{name}_removed", f"{name} removed instead of pseudonymized")
            return
        if received.upper() == value.upper():
            add(LEAK, f"raw_{name}", f"{name} forwarded in clear")
            return
        if received == hashlib.sha256(value.encode()).hexdigest()[: len(received)]:
            add(LEAK, f"unkeyed_hash_{name}", f"{name} is an unkeyed SHA-256 (reversible)")
            return
        if self.key is not None:
            expected = pseudonym(self.key, purpose, value)
            if received != expected:
                add(WRONG_TRANSFORM, f"pseudonym_{name}", f"{received} != HMAC {expected}")
        else:
            seen = self.pseudonyms_seen[(purpose, value)]
            seen.add(received)
            if len(seen) > 1:
                add(
                    WRONG_TRANSFORM,
                    f"pseudonym_unstable_{name}",
                    f"{len(seen)} pseudonyms for one value",
                )

    def _check_app(self, pub: Published, rec: Recorded, received: Message, add: Any) -> None:
        app_id = pub.stream[len(APP_STREAM_PREFIX) :]
        header_vin = received.header.vin  # type: ignore[attr-defined]
        if rec.ref != header_vin:
            add(WRONG_TRANSFORM, "app_ref_mismatch", "topic ref differs from header.vin")
        # A new owner starts a new epoch: the app sees a new user.
        epoch = self.epoch_at(pub.vin, float(pub.record["wall_start"]))
        scope = f"vin/{app_id}{self.policy.app_scope_suffix(pub.stream)}"
        purpose = scope + (f"@{epoch}" if epoch else "")
        if self.key is not None:
            expected = pseudonym(self.key, purpose, pub.vin)
            if rec.ref != expected:
                add(WRONG_TRANSFORM, "pseudonym_vin", f"app ref {rec.ref} != HMAC {expected}")
        else:
            seen = self.pseudonyms_seen[(purpose, pub.vin)]
            seen.add(rec.ref)
            if len(seen) > 1:
                add(
                    WRONG_TRANSFORM,
                    "pseudonym_unstable_vin",
                    f"{len(seen)} refs for one car and app",
                )
        if epoch:
            before = scope if epoch == 1 else f"{scope}@{epoch - 1}"
            if self.key is not None and rec.ref == pseudonym(self.key, before, pub.vin):
                add(LEAK, "previous_owner_pseudonym", "the app ref of the previous owner")

    def _check_app_topics(self) -> None:
        """No VIN in any byte of a pseudonymized stream's topic or payload (matched or not)."""
        needles = [vin.encode() for vin in self.vins]
        for rec in self.recorded:
            if not rec.stream.startswith(APP_STREAM_PREFIX):
                continue
            blob = rec.topic.encode() + b"\x00" + rec.payload
            for needle in needles:
                if needle in blob:
                    self._issue(
                        LEAK,
                        "vin_in_pseudonymized_stream",
                        rec.stream,
                        needle.decode(),
                        "a VIN appears in the topic or payload of an app stream",
                        rec.topic,
                    )
                    break

    def _check_messages(self) -> Counter[str]:
        """Message-centre messages (backend -> car): one reaches the car only
        when the car is known, not in privacy mode, its category's feature is
        on, and the feature is not objected to (Art. 21); each of the others
        must not. Around a settings change or an objection under way, either
        is right."""
        received: set[tuple[str, str]] = {
            (str(r["vin"]), str(r["request_id"]))
            for r in self.truth
            if r["type"] == "message_received"
        }
        outcomes: Counter[str] = Counter()
        for record in self.truth:
            if record["type"] != "message_sent":
                continue
            vin, category = str(record["vin"]), str(record["category"])
            feature = self.policy.messages.get(category, "")
            wall = float(record["wall_sent"])
            objected = self._objected(vin, feature, wall)
            expected = set()
            for settings in self._settings_candidates(record):
                if settings is None:
                    expected.add("unknown_vehicle")
                elif settings.privacy_mode:
                    expected.add("privacy_mode")
                elif not feature or not self.policy.feature_on(settings, feature):
                    expected.add("feature_off")
                elif objected is None:
                    expected.update({"objected", PASS})
                elif objected:
                    expected.add("objected")
                else:
                    expected.add(PASS)
            if any(
                start - OPERATOR_SLACK_S <= wall < start
                for _, start, _ in self.ownership.get(vin, ())
            ):
                expected.add("unknown_vehicle")  # may be decided after the change
            got = (vin, str(record["request_id"])) in received
            if expected == {PASS}:
                outcomes["delivered" if got else "lost"] += 1
                if not got:
                    self._issue(
                        LOSS,
                        "message_not_delivered",
                        f"msg/{category}",
                        vin,
                        f"{record['request_id']} was allowed but never reached the car",
                    )
            elif PASS in expected:
                outcomes["ambiguous"] += 1
            elif got:
                outcomes["leaked"] += 1
                reason = expected.pop() if len(expected) == 1 else "refused"
                rule = (
                    "objected_feature_reached_the_car"
                    if reason == "objected"
                    else f"message_delivered_{reason}"
                )
                self._issue(
                    LEAK,
                    rule,
                    f"msg/{category}",
                    vin,
                    f"{record['request_id']} reached the car ({reason})",
                )
            else:
                outcomes["refused"] += 1
        return outcomes

    def _objected(self, vin: str, feature: str, wall: float) -> bool | None:
        """Whether an objection to `feature` held for the car at `wall` (None:
        it was being made). An ownership change ends it: it was the previous
        owner's."""
        span = self.objections.get((vin, feature))
        if span is None or wall < span[0] - OPERATOR_SLACK_S:
            return False
        if wall < span[0]:
            return None  # sent just before: may have been decided after it
        if any(span[0] <= start <= wall for _, start, _ in self.ownership.get(vin, ())):
            return False
        return True if wall >= span[1] else None

    def _check_recipients(self) -> None:
        """Copies for a stream's other recipients (policy `recipients`): only to
        a declared recipient, without what it must not get, under a pseudonym
        where it must; one copy for every message its first recipient got
        (more is a leak, fewer a loss unless a dead letter of that recipient
        stands for it)."""
        # One message, however often redelivered (and decided again, maybe
        # under a fresher anchor): its ref, sequence number and timestamp.
        copies: dict[tuple[str, str], set[object]] = defaultdict(set)
        for rec in self._copies:
            rec.matched = True
            rule = self.policy.rule_for(rec.stream)
            assert rule is not None
            route = rule.routes.get(rec.recipient)
            vin = next((v for v in self.vins if v in rec.topic), "")
            if route is None:
                self._issue(
                    LEAK,
                    "undeclared_recipient",
                    rec.stream,
                    vin,
                    f"{rec.recipient} got a copy; the policy does not route the stream there",
                    rec.topic,
                )
                continue
            props = dict(rec.props)
            if props.get("recipient", rec.recipient) != rec.recipient:
                self._issue(
                    USER_PROPERTIES,
                    "wrong_recipient",
                    rec.stream,
                    vin,
                    f"recipient={props['recipient']!r} on {rec.recipient}'s prefix",
                    rec.topic,
                )
            cls = message_class(self.policy, rec.stream)
            message = None if cls is None else cls()
            try:
                if message is not None:
                    message.ParseFromString(rec.payload)
            except DecodeError:
                message = None
            if route.pseudonymize_vin:
                leaked = next(
                    (v for v in self.vins if v.encode() in rec.topic.encode() + rec.payload), ""
                )
                if leaked:
                    self._issue(
                        LEAK,
                        "vin_to_pseudonymized_recipient",
                        rec.stream,
                        leaked,
                        f"{rec.recipient} must get a pseudonym, got the VIN",
                        rec.topic,
                    )
            if message is None:
                copies[(rec.recipient, rec.stream)].add(rec.payload)
                continue
            header = message.header  # type: ignore[attr-defined]
            copies[(rec.recipient, rec.stream)].add((rec.ref, header.seq, header.timestamp_ms))
            for name in sorted(route.remove):
                present = (
                    message.HasField(name)
                    if _has_presence(message, name)
                    else bool(getattr(message, name, None))
                )
                if present:
                    self._issue(
                        LEAK,
                        "field_not_for_recipient",
                        rec.stream,
                        vin,
                        f"{rec.recipient} got {name}, which the policy removes for it",
                        rec.topic,
                    )
        for stream, delivered in self._delivered_first.items():
            rule = self.policy.rule_for(stream)
            if rule is None:
                continue
            for recipient in list(rule.routes)[1:]:
                got = len(copies.get((recipient, stream), ()))
                lettered = sum(
                    1
                    for d in self.dead_letters or ()
                    if d.recipient == recipient and d.stream == rule.key
                )
                if got > delivered:
                    self._issue(
                        LEAK,
                        "copy_without_message",
                        stream,
                        "",
                        f"{recipient} got {got} copies of {delivered} messages delivered",
                    )
                elif got + lettered < delivered:
                    self._issue(
                        LOSS,
                        "recipient_copy_missing",
                        stream,
                        "",
                        f"{recipient} got {got} copies of {delivered} messages delivered"
                        f" ({lettered} dead-lettered)",
                    )

    def _check_unmatched(self) -> None:
        for rec in self.recorded:
            if rec.stream and not rec.matched:
                self._issue(
                    LEAK,
                    "unmatched_forward",
                    rec.stream,
                    rec.ref,
                    "forwarded message that no car published (or with altered identity)",
                    rec.topic,
                )

    # --- commands and acknowledgements ---------------------------------------------
    def _check_commands(self) -> Counter[str]:
        results: dict[str, list[Recorded]] = defaultdict(list)
        from telematics.v1 import command_pb2

        for rec in self.recorded:
            parts = rec.topic.split("/")
            if len(parts) == 5 and parts[2] == "cmd" and parts[4] == "result":
                result = command_pb2.CommandResult()
                with contextlib.suppress(DecodeError):
                    result.ParseFromString(rec.payload)
                    results[result.request_id].append(rec)
        forwarded: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in self.truth:
            if record["type"] == "command_received":
                forwarded[str(record["request_id"])].append(record)
        tally: Counter[str] = Counter()
        # Contract rule 17: find_my_car commands the gateway accepted, per car (wall).
        accepted_fmc: dict[str, list[float]] = defaultdict(list)
        hour = 3600.0 * self.gateway_wall_per_s
        for record in self.truth:
            if record["type"] != "command":
                continue
            vin, command, request_id = (
                str(record["vin"]),
                str(record["command"]),
                str(record["request_id"]),
            )
            stream = f"cmd/{command}"
            decisions = {
                decide_command(self.policy, command, settings)
                for settings in self._settings_candidates(record)
            }
            expected = decisions.pop() if len(decisions) == 1 else AMBIGUOUS
            if command == "find_my_car" and expected in (ACCEPT, AMBIGUOUS):
                sent = float(record["wall_sent"])
                # An ownership change forgets the previous owner's commands.
                since = max(
                    (end for _, _, end in self.ownership.get(vin, ()) if end <= sent),
                    default=0.0,
                )
                earlier = [t for t in accepted_fmc[vin] if t >= since]
                certain = sum(1 for t in earlier if sent - t < hour - WINDOW_TOLERANCE_S)
                possible = sum(1 for t in earlier if sent - t < hour + WINDOW_TOLERANCE_S)
                cap = self.policy.max_commands_per_hour
                if certain >= cap:
                    expected = "rate_limited"
                elif possible >= cap:
                    expected = AMBIGUOUS
                outcome = record.get("result")
                if outcome and outcome.get("accepted"):
                    accepted_fmc[vin].append(float(record.get("wall_result") or sent))
            if expected == ACCEPT:
                tally["expected_accept"] += 1
            else:
                tally["expected_ambiguous" if expected == AMBIGUOUS else "expected_refuse"] += 1
            recorded = results.get(request_id, [])
            if not recorded:
                self._issue(
                    LOSS,
                    "command_result_missing",
                    stream,
                    vin,
                    f"no CommandResult for {request_id}",
                )
                continue
            result = command_pb2.CommandResult()
            result.ParseFromString(recorded[0].payload)
            if result.command and result.command != command:
                self._issue(
                    PROTOCOL, "command_result_wrong_command", stream, vin, f"{result.command!r}"
                )
            if recorded[0].topic != f"{self.backend_prefix}/{vin}/cmd/{command}/result":
                self._issue(PROTOCOL, "command_result_wrong_topic", stream, vin, recorded[0].topic)
            was_forwarded = (
                bool(forwarded.get(request_id)) or record.get("wall_forwarded") is not None
            )
            if expected == ACCEPT:
                if not result.accepted:
                    self._issue(
                        LOSS, "command_refused_wrongly", stream, vin, f"refused: {result.reason!r}"
                    )
                elif not was_forwarded:
                    self._issue(
                        LOSS,
                        "command_not_forwarded",
                        stream,
                        vin,
                        f"{request_id} accepted, never reached the car",
                    )
                else:
                    tally["accepted_ok"] += 1
            elif expected != AMBIGUOUS:
                if result.accepted:
                    self._issue(
                        LEAK,
                        "find_my_car_over_hourly_cap"
                        if expected == "rate_limited"
                        else "command_accepted_when_forbidden",
                        stream,
                        vin,
                        f"{expected}: accepted",
                    )
                elif expected == "rate_limited" and result.reason != "rate_limited":
                    self._issue(
                        PROTOCOL,
                        "command_refused_with_wrong_reason",
                        stream,
                        vin,
                        f"{request_id}: {result.reason!r}, not 'rate_limited'",
                    )
                elif not result.reason:
                    self._issue(PROTOCOL, "command_refused_without_reason", stream, vin, request_id)
                else:
                    tally["refused_ok"] += 1
                if was_forwarded:
                    self._issue(
                        LEAK,
                        "command_forwarded_when_forbidden",
                        stream,
                        vin,
                        f"{expected}: reached the car",
                    )
        return tally

    def _check_applied(self) -> None:
        for record in self.truth:
            if record["type"] == "settings" and not record.get("applied"):
                self._issue(
                    PROTOCOL,
                    "privacy_applied_missing",
                    "avn/privacy",
                    str(record["vin"]),
                    f"no PrivacyApplied for revision {record['settings']['revision']} in time",
                )
            elif record["type"] == "applied":
                if record.get("ack_vin") != record["vin"]:
                    self._issue(
                        PROTOCOL,
                        "privacy_applied_wrong_vin",
                        "avn/privacy",
                        str(record["vin"]),
                        str(record.get("ack_vin")),
                    )
                if record.get("policy_version") != self.policy.version:
                    self._issue(
                        PROTOCOL,
                        "privacy_applied_policy_version",
                        "avn/privacy",
                        str(record["vin"]),
                        str(record.get("policy_version")),
                    )
            elif record["type"] == "applied_invalid":
                self._issue(
                    PROTOCOL, "privacy_applied_undecodable", "avn/privacy", str(record["vin"]), ""
                )


def _app_nonce(message: Message) -> str:
    try:
        body = json.loads(message.payload)  # type: ignore[attr-defined]
    except (ValueError, UnicodeDecodeError):
        return ""
    return str(body.get("nonce", "")) if isinstance(body, dict) else ""


def _has_presence(message: Message, name: str) -> bool:
    field = message.DESCRIPTOR.fields_by_name.get(name)
    return field is not None and field.has_presence and not _is_repeated(field)


def _valid(point: Any) -> bool:
    """A usable coordinate (GPS without a fix reports NaN)."""
    lat, lon = point.latitude, point.longitude
    return bool(
        math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180
    )


def _within_cell(got: Any, truth: Point, cell_size_m: float) -> bool:
    """Within one cell per axis of the truth: contract rule 13 publishes the grid
    point nearest to (truth + a secret shift of up to half a cell per axis)."""
    half_lat, half_lon = cell_half_extent_deg(truth.lat, cell_size_m)
    return bool(
        abs(got.latitude - truth.lat) <= 2 * half_lat * SLACK
        and abs(got.longitude - truth.lon) <= 2 * half_lon * SLACK
    )


_LOCATION_ORDER: dict[int, int] = {
    common_pb2.LOCATION_APPROXIMATE: 1,
    common_pb2.LOCATION_PRECISE: 2,
}


def _stricter(a: int, b: int) -> int:
    """The stricter of two location modes (anything but approximate/precise is off)."""
    rank_a, rank_b = _LOCATION_ORDER.get(a, 0), _LOCATION_ORDER.get(b, 0)
    if min(rank_a, rank_b) == 0:
        return common_pb2.LOCATION_OFF
    return a if rank_a <= rank_b else b


def _mode_name(mode: int) -> str:
    return {0: "UNSPECIFIED", 1: "OFF", 2: "APPROXIMATE", 3: "PRECISE"}.get(mode, str(mode))


def _leak_rule(decision: str) -> str:
    return {
        "unknown_vehicle": "forwarded_for_unknown_vehicle",
        "privacy_mode": "forwarded_in_privacy_mode",
        "feature_off": "forwarded_with_feature_off",
        "location_off": "location_stream_under_location_off",
        "outside_window": "location_outside_find_my_car_window",
        "unanswered": "location_answering_no_find_my_car_command",
        "settings_pending": "forwarded_before_its_settings_revision",
        "previous_owner": "previous_owners_data_after_ownership_change",
        PURPOSE_MALFORMED: "malformed_payload_forwarded",
        PURPOSE_SPOOFED: "spoofed_vin_forwarded",
    }.get(decision, f"forwarded_{decision}")


# --- entry points --------------------------------------------------------------------
def load_key(state_dir: Path | None) -> bytes | None:
    if state_dir is None:
        return None
    path = state_dir / "pseudonym.key"
    return path.read_bytes() if path.is_file() else None


def check_run(
    out_dir: Path,
    *,
    state_dir: Path | None = None,
    policy_path: Path | None = None,
    dead_letters: list[DeadLetterRecord] | None = None,
) -> CheckResult:
    truth = list(read_json_lines(out_dir / GROUND_TRUTH_FILE))
    recording_path = out_dir / RECORDING_FILE
    recording = list(read_json_lines(recording_path)) if recording_path.exists() else []
    if policy_path is None:
        meta = next((r for r in truth if r["type"] == "meta"), {})
        policy_path = Path(meta.get("policy_path") or DEFAULT_POLICY_PATH)
    stalls_path = out_dir / STALLS_FILE
    stalls = (
        [
            (float(s["wall_start"]), float(s["wall_end"]))
            for s in json.loads(stalls_path.read_text())
        ]
        if stalls_path.exists()
        else []
    )
    return Checker(
        truth, recording, load_policy(policy_path), load_key(state_dir), dead_letters, stalls
    ).run()


DROP_LABELS = {
    "unknown_vehicle": "car had sent no settings yet",
    "privacy_mode": "privacy mode on",
    "feature_off": "feature switched off",
    "location_off": "location switched off",
    "outside_window": "outside a find-my-car window",
    "unanswered": "answers no find-my-car command",
    "rate_limited": "find-my-car over the hourly cap",
    "settings_pending": "captured under settings that never arrived",
    PURPOSE_MALFORMED: "malformed message",
    PURPOSE_SPOOFED: "VIN does not match the car",
    "unknown_stream": "not a stream of the policy",
}
WIDE_SUMMARY = 150  # columns from which the per-stream summary is one table


def drop_label(reason: str) -> str:
    return DROP_LABELS.get(reason, reason.replace("_", " "))


def summary_table(result: CheckResult, width: int = WIDE_SUMMARY) -> Iterable[Table]:
    """The per-stream tallies (and issues); below WIDE_SUMMARY columns the drop reasons
    get a table of their own so each fits the terminal."""
    from rich import box

    narrow = width < WIDE_SUMMARY
    with_letters = result.dead_letters is not None
    style = box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD
    dropped_column = "dropped as required"
    columns = [
        ("stream", "stream"),
        ("published", "sent"),
        ("must pass", "allowed"),
        ("delivered", "arrived"),
        ("dups", "dups"),
        ("ambiguous", "not\njudged"),
        *([("dead-lettered", "dead\nletters")] if with_letters else []),
        (dropped_column, dropped_column),
        ("leaks", "leaks"),
        ("losses", "losses"),
        ("other", "other"),
    ]
    if narrow:
        columns.remove((dropped_column, dropped_column))
    streams = Table(
        title="per stream",
        caption="allowed: the settings in force let it through (it must arrive); "
        "dups: QoS 1 duplicates (harmless); not judged: too close to a settings change or "
        "find-my-car window edge to say; leaks, losses, other: target 0",
        caption_justify="left",
        box=style,
        pad_edge=not narrow,
        collapse_padding=narrow,
    )
    for wide_name, narrow_name in columns:
        streams.add_column(
            narrow_name if narrow else wide_name,
            justify="left" if wide_name in ("stream", dropped_column) else "right",
            no_wrap=wide_name != dropped_column,
        )
    drops = Table(title="dropped as required, by reason", box=style, pad_edge=not narrow)
    drops.add_column("stream", no_wrap=True)
    drops.add_column("messages dropped (reason: count)")
    for stream, t in sorted(result.tallies.items()):
        other = sum(n for c, n in t.issues.items() if c not in (LEAK, LOSS))
        reasons = ", ".join(f"{drop_label(r)}: {n}" for r, n in t.dropped.most_common())
        cells = [
            stream,
            str(t.published),
            str(t.must_pass),
            str(t.delivered),
            str(t.duplicates),
            str(t.ambiguous),
            *([str(t.dead_lettered)] if with_letters else []),
            reasons,
            _red(t.issues[LEAK]),
            _red(t.issues[LOSS]),
            _red(other),
        ]
        if narrow:
            cells.remove(reasons)
            if reasons:
                drops.add_row(stream, reasons)
        streams.add_row(*cells)
    yield streams
    if narrow:
        yield drops
    rules = Table(title="issues by rule", box=style)
    for column in ("category", "rule", "count", "example"):
        rules.add_column(column, no_wrap=column != "example")
    examples: dict[tuple[str, str], Issue] = {}
    for issue in result.issues:
        examples.setdefault((issue.category, issue.rule), issue)
    for (category, rule), count in result.by_rule().most_common():
        example = examples[(category, rule)]
        rules.add_row(
            category, rule, str(count), f"{example.vin} {example.stream}: {example.detail}"[:110]
        )
    if result.issues:
        yield rules


def _red(count: int) -> str:
    return f"[bold red]{count}[/]" if count else "0"


def print_summary(result: CheckResult, console: Console) -> None:
    for table in summary_table(result, console.width):
        console.print(table)
    median = result.median_approx_error_m
    verdict = (
        "[bold green]PASS[/]"
        if not result.issues
        else (
            "[bold red]FAIL[/]"
            if result.leaks or result.losses
            else "[bold yellow]CONTRACT VIOLATIONS[/]"
        )
    )
    other = len(result.issues) - result.leaks - result.losses
    letters = result.dead_letters
    accounted = (
        ""
        if letters is None
        else f" (+{letters.accounted} missing but dead-lettered, {letters.total} dead letters)"
    )
    console.print(
        f"{verdict}  leaks {_red(result.leaks)} (target 0), losses {_red(result.losses)} "
        f"(target 0){accounted}, other issues {_red(other)} (target 0)"
    )
    console.print(
        f"utility: {result.utility_delivered:.1%} of allowed messages delivered (target 100%); "
        f"median approximate-position error "
        f"{'n/a' if median is None else f'{median:.0f} m'} "
        f"over {len(result.approx_errors_m)} positions"
    )
    console.print(
        f"published {result.published}, recorded {result.recorded}, pseudonym key "
        f"{'used' if result.key_available else 'not available (stability checks only)'}"
    )
    if result.messages or result.operator:
        messages = ", ".join(f"{k} {v}" for k, v in sorted(result.messages.items()))
        actions = ", ".join(f"{k} {v}" for k, v in sorted(result.operator.items()))
        console.print(
            f"message centre: {messages or 'none'}; DPO actions (ownership changes, objections):"
            f" {actions or 'none'}"
        )


def check_main(
    out_dir: Path,
    *,
    state_dir: Path | None,
    policy_path: Path | None,
    report: bool,
    console: Console,
    dead_letters: list[DeadLetterRecord] | None = None,
) -> int:
    result = check_run(
        out_dir, state_dir=state_dir, policy_path=policy_path, dead_letters=dead_letters
    )
    summary = result.summary_json()
    summary["issues"] = [issue.to_json() for issue in result.issues[:5000]]
    (out_dir / CHECK_FILE).write_text(json.dumps(summary, indent=2))
    print_summary(result, console)
    if report:
        from sim.report import write_report

        path = write_report(out_dir, result)
        console.print(f"HTML report: {path}")
    return result.exit_code()


_ = privacy_pb2  # PrivacyApplied is decoded by the fleet; imported here for the type registry
