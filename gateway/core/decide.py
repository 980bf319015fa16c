"""The privacy decision: (policy, state, topic, payload, now) -> decision.

Pure and synchronous: no I/O, no clock (time comes in as `now`), no mutation
of its inputs. Every rule of the wire contract's "Decisions" list lives here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple

from google.protobuf.message import DecodeError, Message

from gateway.core import findmycar
from gateway.core.cache import ENTRY_OVERHEAD, ByteBoundedMemo, strings_size
from gateway.core.capture import CaptureHistory, capture_state, stricter_mode
from gateway.core.ecall import conform_ecall
from gateway.core.header_peek import peek_header
from gateway.core.identity import (
    IdentityBook,
    app_id_mismatch,
    app_scope,
    pseudonymize_header,
    pseudonymize_vehicle_field,
    vin_in_bytes,
    vin_ref,
)
from gateway.core.state import (
    EFFECTIVE_MODES,
    FindMyCarCommand,
    LocationAnchor,
    LocationMode,
    SettingsSnapshot,
    VehicleState,
    is_valid_vin,
)
from gateway.core.transforms import (
    coarsen_geopoint,
    coarsen_position,
    destination_offset,
    generalize_number,
    grid_offset,
    truncate_ip,
    valid_position,
)
from gateway.policy import (
    IMPLICIT_RECIPIENT_ID,
    CompiledCommand,
    CompiledPolicy,
    CompiledRoute,
    CompiledStream,
)
from telematics.v1 import command_pb2, common_pb2, privacy_pb2, streams_pb2

SETTINGS_TOPIC: Final = "avn/privacy"
APPLIED_TOPIC: Final = "avn/privacy/applied"
MAX_REVISION: Final = 2**63 - 1  # PrivacySettings.revision is uint64; stores keep signed 64-bit
# Per-app consents kept from one snapshot (contract rule 20). Only consents
# that are on are kept: an absent per-app feature is off, so dropping the
# rest never enables anything, and nothing a car sends grows the store
# beyond this.
MAX_APP_CONSENTS: Final = 64
# Explicit offs of feature ids the policy does not know yet, kept so a later
# policy that adds such a feature (on by default) cannot re-enable what the
# driver switched off. Bounded like the consents; an off never enables anything.
MAX_UNKNOWN_OFFS: Final = 32
FEATURE_ID_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*(\.[A-Za-z0-9_-]+)?")
MAX_FEATURE_ID: Final = 96


class DropReason(StrEnum):
    UNKNOWN_TOPIC = "unknown_topic"
    INVALID_VIN = "invalid_vin"
    UNDECODABLE = "undecodable"
    VIN_MISMATCH = "vin_mismatch"
    UNKNOWN_VEHICLE = "unknown_vehicle"
    PRIVACY_MODE = "privacy_mode"
    RESTRICTED = "restricted"
    FEATURE_DISABLED = "feature_disabled"
    CONSENT_OUTDATED = "consent_outdated"  # widened since the consent: ask again
    OBJECTED = "objected"  # Art. 21: the feature was objected to for this car
    LOCATION_OFF = "location_off"
    NO_WINDOW = "no_find_my_car_window"
    UNANSWERED_LOCATION = findmycar.FixRefusal.UNANSWERED.value
    FIXES_SPENT = findmycar.FixRefusal.SPENT.value
    STALE_REVISION = "stale_revision"
    VIN_IN_PAYLOAD = "vin_in_pseudonymized_payload"
    APP_ID_MISMATCH = "app_id_mismatch"
    OVERSIZED = "oversized"
    # Contract v2 rules 11 and 12 (consent at capture time, the causal token).
    CAPTURED_BEFORE_KNOWN_SETTINGS = "captured_before_known_settings"
    SETTINGS_PENDING = "settings_pending"  # parked too long for its revision
    PARKED_EVICTED = "parked_evicted"  # parked, pushed out by the byte bounds


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """Everything a decision depends on besides per-vehicle state.

    Replaced as a whole (never mutated) when the policy changes, so every
    message is decided under exactly one policy version.
    """

    policy: CompiledPolicy
    key: bytes  # pseudonyms that leave the gateway (app refs, seq hashes): rotatable
    vehicle_prefix: str = "vehicle"
    backend_prefix: str = "tsp"
    # Clock skew allowed between a car's capture timestamp and the gateway's
    # clock: the strictest settings within this margin apply (rule 11).
    capture_skew_s: float = 180.0
    # Pseudonym epochs and what survived erasures (kept by the service; the
    # same book across policy swaps).
    identity: IdentityBook = dataclasses.field(default_factory=IdentityBook)
    # What must never change with a key rotation: subjects naming cars in the
    # store and the grid offset of a car (two offsets of one parked car could be
    # intersected). None: `key` (a gateway whose key was never rotated).
    internal_key: bytes | None = None
    # Per stored policy version V: the consent-based streams the active policy
    # widened relative to V (a consent given under V does not cover them).
    consent_scopes: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    # The user properties of a forwarded message, built once per stream, route,
    # feature and transforms under this context's policy (which owns the
    # streams and routes the ids name). Bounded: app ids in topics come from cars.
    _properties_memo: dict[tuple[int, int, str, tuple[str, ...]], tuple[tuple[str, str], ...]] = (
        dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    )

    # Routed topics (relative to vehicle/{vin}/): a template route (an app id
    # in the topic) is a split, a scan and a regex match, and policy.route is
    # not compiled. Bounded the same way: app ids come from cars.
    _routes_memo: dict[str, tuple[CompiledStream, str | None]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def route(self, relative: str) -> tuple[CompiledStream, str | None] | None:
        """The policy's route of a topic relative to vehicle/{vin}/."""
        memo = self._routes_memo
        found = memo.get(relative)
        if found is None:
            found = self.policy.route(relative)
            if found is None:
                return None  # not remembered: unknown topics cost their lookup
            if len(memo) >= _MEMO_ENTRIES:
                memo.clear()
            memo[relative] = found
        return found

    def consent_outdated(self, version: str, stream: str) -> bool:
        """Whether a consent given under `version` does not cover `stream` as
        the active policy defines it. A version never stored is not judged."""
        if not version or version == self.policy.version:
            return False
        return stream in self.consent_scopes.get(version, frozenset())

    def properties(
        self,
        stream: CompiledStream,
        feature: str,
        transforms: tuple[str, ...],
        route: CompiledRoute,
    ) -> tuple[tuple[str, str], ...]:
        memo = self._properties_memo
        key = (id(stream), id(route), feature, transforms)
        found = memo.get(key)
        if found is None:
            if len(memo) >= _MEMO_ENTRIES:
                memo.clear()
            found = memo[key] = _properties(self.policy, stream, feature, transforms, route)
        return found

    @property
    def stable_key(self) -> bytes:
        return self.internal_key if self.internal_key is not None else self.key


_MEMO_ENTRIES: Final = 4096
_RESTRICTED: Final = DropReason.RESTRICTED
_PRIVACY_MODE: Final = DropReason.PRIVACY_MODE
_FEATURE_DISABLED: Final = DropReason.FEATURE_DISABLED

# Module constants: an enum member looked up on its class costs more than the
# comparison, several times per message.
_OFF: Final = LocationMode.OFF
_APPROXIMATE: Final = LocationMode.APPROXIMATE
_PRECISE: Final = LocationMode.PRECISE

# A stream of a compiled policy that predates recipients (built by hand).
_IMPLICIT_ROUTES: Final = (
    CompiledRoute(
        IMPLICIT_RECIPIENT_ID,
        None,
        False,
        (),
        "",
        (("recipient", IMPLICIT_RECIPIENT_ID), ("transfer-basis", "none")),
    ),
)


# The per-message decisions are named tuples, not frozen dataclasses: just as
# immutable, and built in a third of the time (a frozen dataclass sets every
# field through object.__setattr__), which is a tenth of deciding a message.


class Egress(NamedTuple):
    """One more recipient's copy of a forwarded message."""

    recipient: str
    topic: str
    payload: bytes
    user_properties: tuple[tuple[str, str], ...]


class Forward(NamedTuple):
    topic: str
    payload: bytes
    user_properties: tuple[tuple[str, str], ...]
    vin: str
    stream: str
    feature: str
    transforms: tuple[str, ...]
    anchor: LocationAnchor | None = None  # the vehicle's new location anchor, if it refreshed
    # New state when forwarding changes it (a find-my-car fix spends its
    # command's budget): durable before the message is forwarded.
    state: VehicleState | None = None
    recipient: str = IMPLICIT_RECIPIENT_ID  # who `topic` reaches
    # The stream's other recipients, each with its own copy: the message is
    # final once every copy is.
    also: tuple[Egress, ...] = ()


class Drop(NamedTuple):
    reason: DropReason
    stream: str
    vin: str = ""
    detail: str = ""
    # For a settings message equal to the applied revision (a redelivery):
    # announce the applied state again so the car converges.
    reannounce: tuple[str, bytes] | None = None


@dataclass(frozen=True, slots=True)
class ApplySettings:
    snapshot: SettingsSnapshot
    state: VehicleState
    applied_topic: str
    applied_payload: bytes
    ignored_features: int = 0  # feature ids of the snapshot not kept (unknown, off apps, cap)


class Hold(NamedTuple):
    """Captured under a revision newer than the applied one (rule 12): not
    decided under older settings; parked until `revision` is applied."""

    vin: str
    stream: str
    revision: int


Decision = Forward | Drop | ApplySettings | Hold

# A named tuple's constructor is a generated Python function (a lambda around
# tuple.__new__): from compiled code, the frame it costs is a twentieth of
# deciding a message. The two decisions nearly every message ends in are
# built with tuple.__new__ directly, every field given.
_new_tuple = tuple.__new__


def _forward(
    topic: str,
    payload: bytes,
    user_properties: tuple[tuple[str, str], ...],
    vin: str,
    stream: str,
    feature: str,
    transforms: tuple[str, ...],
    anchor: LocationAnchor | None,
    state: VehicleState | None,
    recipient: str,
) -> Forward:
    return _new_tuple(
        Forward,
        (
            topic,
            payload,
            user_properties,
            vin,
            stream,
            feature,
            transforms,
            anchor,
            state,
            recipient,
            (),  # also
        ),
    )


def _drop(reason: DropReason, stream: str, vin: str = "", detail: str = "") -> Drop:
    return _new_tuple(Drop, (reason, stream, vin, detail, None))


@dataclass(frozen=True, slots=True)
class CommandDecision:
    vin: str
    command: str
    accepted: bool
    reason: str
    result_topic: str
    result_payload: bytes
    forward_topic: str | None = None
    forward_payload: bytes | None = None
    state: VehicleState | None = None  # new state when the command opens a window


# --------------------------------------------------------------------------
# Vehicle -> backend


def split_vehicle_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """'vehicle/{vin}/tbox/status' -> ('{vin}', 'tbox/status')."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    vin, sep, rest = topic[len(head) :].partition("/")
    if not sep or not rest:
        return None
    return vin, rest


def decide(
    ctx: DecisionContext,
    topic: str,
    payload: bytes,
    states: Mapping[str, VehicleState],
    anchors: Mapping[str, LocationAnchor],
    now: float,
    histories: Mapping[str, CaptureHistory] | None = None,
) -> Decision:
    """Decide one message received from the vehicle side.

    `now` is the gateway's clock (epoch seconds): the refresh interval of
    approximate locations runs on it, never on a car timestamp.

    With `histories` (per car: the settings intervals applied, see
    gateway.core.capture), a message also has to have been allowed when it
    was captured, and one stating a revision not applied yet is held.
    """
    # split_vehicle_topic, inline (a call is a tenth of an all-forward decision's
    # own work): "{prefix}/{vin}/{relative}", both parts non-empty but the VIN.
    start = len(ctx.vehicle_prefix) + 1
    vin, sep, relative = topic[start:].partition("/")
    if not (sep and relative and topic[start - 1 : start] == "/") or not topic.startswith(
        ctx.vehicle_prefix
    ):
        return _drop(DropReason.UNKNOWN_TOPIC, "", detail=topic)
    if relative == SETTINGS_TOPIC:
        if len(payload) > ctx.policy.max_payload_bytes_default:
            # Before parsing: a map of a million feature ids costs seconds and
            # several times its size in memory.
            return _drop(DropReason.OVERSIZED, SETTINGS_TOPIC, vin=vin, detail=str(len(payload)))
        if not is_valid_vin(vin):
            return _drop(DropReason.INVALID_VIN, SETTINGS_TOPIC, detail=vin)
        return _decide_settings(ctx, vin, payload, states.get(vin), now)
    route = ctx.route(relative)
    if route is None:
        return _drop(DropReason.UNKNOWN_TOPIC, "", vin=vin, detail=relative)
    stream, app_id = route
    # Always matched, also for a car with state: the service keeps cars not
    # seen since a restart under their subject, which no VIN pattern admits.
    if not is_valid_vin(vin):
        return _drop(DropReason.INVALID_VIN, stream.key, detail=vin)
    if len(payload) > stream.max_payload_bytes and not stream.legal_obligation:
        # Before parsing: a flood of huge payloads costs no protobuf work.
        return _drop(DropReason.OVERSIZED, stream.key, vin=vin, detail=str(len(payload)))
    feature = stream.feature if app_id is None else f"{stream.feature}.{app_id}"
    state = states.get(vin)
    # The drop under the car's settings now, whatever the capture time (rule
    # 11); taken below unless the message names another VIN or is held (rule
    # 12). Computed only then: most messages of an enabled feature pay no call.
    refused: Drop | None = None
    if (
        state is not None
        and not stream.legal_obligation
        and (
            state.restricted or state.privacy_mode or feature not in state.enabled or state.objected
        )
    ):
        refused = _refused(state, stream, feature, vin, "")
        if refused is not None:
            # The header alone decides, without parsing the message.
            peeked = peek_header(payload)
            if (
                peeked is not None
                and peeked[0] == vin
                and (histories is None or peeked[1] <= state.revision)
            ):
                return refused
    message = stream.message_cls()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        return _drop(DropReason.UNDECODABLE, stream.key, vin=vin)
    header: common_pb2.Header = message.header  # type: ignore[attr-defined]
    if header.vin != vin:
        return _drop(DropReason.VIN_MISMATCH, stream.key, vin=vin, detail=header.vin[:32])
    if stream.legal_obligation:
        # Legal obligation (eCall): always forwarded; byte for byte when it conforms.
        trimmed = (
            conform_ecall(message, payload, stream.max_payload_bytes)
            if isinstance(message, streams_pb2.ECall)
            else None
        )
        done: tuple[str, ...] = () if trimmed is None else ("trim",)
        only = (stream.routes or _IMPLICIT_ROUTES)[0]  # exactly one (policy validation)
        return Forward(
            topic=f"{only.prefix or ctx.backend_prefix}/{vin}/{relative}",
            payload=payload if trimmed is None else trimmed,
            user_properties=_properties(ctx.policy, stream, feature, done, only),
            vin=vin,
            stream=stream.key,
            feature=feature,
            transforms=done,
            recipient=only.recipient,
        )
    stated = header.settings_revision
    if histories is not None and stated > (state.revision if state is not None else 0):
        return Hold(vin, stream.key, stated)
    if state is None:
        return _drop(DropReason.UNKNOWN_VEHICLE, stream.key, vin=vin)
    if refused is not None:
        return refused
    if stream.legal_basis == "consent" and ctx.consent_outdated(state.consent_version, stream.key):
        return _drop(DropReason.CONSENT_OUTDATED, stream.key, vin=vin, detail=state.consent_version)
    mode = EFFECTIVE_MODES.get(state.location, _OFF)  # LocationMode.effective, inline
    if histories is not None:
        history = histories.get(vin)
        if history is None:
            # Applied settings without a history (never both in the service):
            # nothing is known about the time before them.
            return _drop(DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS, stream.key, vin=vin)
        last = history[-1]
        stamped = header.timestamp_ms
        # The earliest time the message may have been captured, as capture_state
        # computes it (a future stamp counts as now, in seconds, so the two agree
        # to the last bit), past the start of the last interval and of the first
        # (not the same when the clock was set back).
        earliest = min(stamped / 1000.0, now) - ctx.capture_skew_s
        if not (
            (stamped <= 0 or (earliest >= last.since and earliest >= history[0].since))
            and (
                stated == 0
                or (
                    stated == last.revision == last.first_revision
                    and (len(history) == 1 or history[-2].revision < stated)
                )
            )
        ):
            # Not the common case (stated = applied, the only interval of it,
            # or no revision stated; stamped after the interval began, or not
            # stamped: captured under the settings in force now, checked
            # above). A record stamped before the interval began may have been
            # captured during a restriction or before an erasure, which no
            # revision outranks.
            captured = capture_state(history, stated, header.timestamp_ms, now, ctx.capture_skew_s)
            if captured is None:
                return _drop(DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS, stream.key, vin=vin)
            refused = _refused(captured, stream, feature, vin, "at_capture")
            if refused is not None:
                return refused
            mode = stricter_mode(mode, captured.location)
    if stream.location_purpose and mode is _OFF:
        return _drop(DropReason.LOCATION_OFF, stream.key, vin=vin)
    new_state: VehicleState | None = None
    if stream.requires_window:
        if not state.window_open(now):
            return _drop(DropReason.NO_WINDOW, stream.key, vin=vin)
        # Contract rule 17: only a fix that answers an open command, within its budget.
        answered = findmycar.answer(
            findmycar.live_commands(state, now, ctx.policy.window_s),
            str(getattr(message, "request_id", "")),
            now,
            ctx.policy.fixes_per_command,
        )
        if isinstance(answered, findmycar.FixRefusal):
            return _drop(DropReason(answered.value), stream.key, vin=vin)
        new_state = with_find_my_car(state, answered)
    transforms, anchor = _transform(ctx, stream, message, vin, mode, anchors.get(vin), now)
    plain = stream.plain_route
    if plain is not None:
        # The common case, known at policy load: one recipient getting the
        # stream as the rules make it.
        done = tuple(transforms)
        return _forward(
            f"{plain.prefix or ctx.backend_prefix}/{vin}/{relative}",  # topic
            message.SerializeToString(),  # payload
            ctx.properties(stream, feature, done, plain),  # user_properties
            vin,
            stream.key,  # stream
            feature,
            done,  # transforms
            anchor,
            new_state,  # state
            plain.recipient,
        )
    routes = stream.routes or _IMPLICIT_ROUTES
    if (
        app_id is not None
        and any(r.pseudonymize_vin for r in routes)
        and (other := app_id_mismatch(message, app_id)) is not None
    ):
        return _drop(DropReason.APP_ID_MISMATCH, stream.key, vin=vin, detail=other[:32])
    copies: list[Egress] = []
    first_done = transforms
    for i, target in enumerate(routes):
        final = i == len(routes) - 1
        # The last route may change the message itself; the others get a copy.
        copy = message
        if not final:
            copy = type(message)()
            copy.CopyFrom(message)
        applied = transforms if final else list(transforms)
        if i == 0:
            first_done = applied
        egress = _route_copy(
            ctx, stream, copy, vin, app_id, feature, relative, now, target, applied
        )
        if egress is None:
            # The car put its VIN somewhere we cannot rewrite (opaque app
            # bytes), in clear or in a common encoding (best effort).
            return _drop(DropReason.VIN_IN_PAYLOAD, stream.key, vin=vin)
        copies.append(egress)
    first = copies[0]
    return Forward(
        topic=first.topic,
        payload=first.payload,
        user_properties=first.user_properties,
        vin=vin,
        stream=stream.key,
        feature=feature,
        transforms=tuple(first_done),
        anchor=anchor,
        state=new_state,
        recipient=first.recipient,
        also=tuple(copies[1:]),
    )


def _route_copy(
    ctx: DecisionContext,
    stream: CompiledStream,
    message: Message,
    vin: str,
    app_id: str | None,
    feature: str,
    relative: str,
    now: float,
    route: CompiledRoute,
    transforms: list[str],
) -> Egress | None:
    """One recipient's copy: its own removals and keying, serialized. None
    when a pseudonymized copy still holds the VIN."""
    for name in route.remove_fields:
        if message.HasField(name) if _has_presence(message, name) else bool(getattr(message, name)):
            message.ClearField(name)
            transforms.append(f"remove:{name}")
    ref = vin
    if route.pseudonymize_vin:
        # Rule 15: the header shares no value with the car's VIN-keyed streams.
        identity = ctx.policy.document.identity
        scope = (
            stream.key if app_id is None else app_scope(app_id, identity.rotation_days(app_id), now)
        )
        ref = vin_ref(ctx.key, scope + route.scope_suffix, vin, ctx.identity.epoch(vin))
        step_ms = identity.pseudonymized_timestamp_step_s * 1000
        pseudonymize_header(ctx.key, message.header, ref, step_ms)  # type: ignore[attr-defined]
        transforms.append("pseudonymize:vin")
    out = message.SerializeToString()
    if route.pseudonymize_vin and vin_in_bytes(out, vin, ref.encode(), _REF_AT):
        return None
    return Egress(
        route.recipient,
        f"{route.prefix or ctx.backend_prefix}/{ref}/{relative}",
        out,
        _properties(ctx.policy, stream, feature, transforms, route),
    )


# Where a pseudonymized copy's serialization holds its pseudonym: the header
# (field 1) comes first, and the VIN field (its field 1, now the 32-character
# pseudonym) first in it: tag, header length (one byte: a pseudonymized
# header is under 128 bytes), tag, 32. Elsewhere, the search covers it too.
_REF_AT: Final = 4


def _refused(
    state: VehicleState, stream: CompiledStream, feature: str, vin: str, when: str
) -> Drop | None:
    # Positional (reason, stream, vin, detail): a third of a dropped message's
    # decision is building its Drop.
    if state.restricted:
        return _drop(_RESTRICTED, stream.key, vin, when)
    if state.privacy_mode:
        return _drop(_PRIVACY_MODE, stream.key, vin, when)
    if feature not in state.enabled:
        return _drop(_FEATURE_DISABLED, stream.key, vin, f"{feature} {when}" if when else feature)
    if state.objected and feature in state.objected:
        return _drop(DropReason.OBJECTED, stream.key, vin, feature)
    return None


def _properties(
    policy: CompiledPolicy,
    stream: CompiledStream,
    feature: str,
    transforms: list[str] | tuple[str, ...],
    route: CompiledRoute,
) -> tuple[tuple[str, str], ...]:
    return (
        ("policy-version", policy.version),
        ("feature", feature),
        ("legal-basis", stream.legal_basis),
        ("retention-days", str(stream.retention_days)),
        ("transforms", ",".join(transforms)),
        *route.properties,
    )


def _transform(
    ctx: DecisionContext,
    stream: CompiledStream,
    message: Message,
    vin: str,
    mode: LocationMode,
    anchor: LocationAnchor | None,
    now: float,
) -> tuple[list[str], LocationAnchor | None]:
    """Apply the stream's field rules in place.

    Returns what was applied and the vehicle's new location anchor when this
    message refreshed it (approximate mode, refresh interval over on the
    gateway clock, a valid position in the message).
    """
    applied: list[str] = []
    new_anchor: LocationAnchor | None = None
    if stream.geo_fields:
        new_anchor = _locate(ctx, stream, message, vin, mode, anchor, now, applied)
    current = new_anchor if new_anchor is not None else anchor
    for name in stream.odometer_fields:
        _side_odometer(message, name, mode, current, applied)
    for name, step in stream.generalize_fields:
        value = getattr(message, name)
        if not value or mode is _PRECISE:
            continue
        if mode is _OFF or not math.isfinite(value):
            message.ClearField(name)
            applied.append(f"remove:{name}")
            continue
        setattr(message, name, generalize_number(value, step))
        applied.append(f"generalize:{name}")
    for name in stream.place_text_fields:
        # Text the user typed can hold an address or coordinates, with no
        # coarse form: only precise location lets it out.
        if mode is not _PRECISE and getattr(message, name):
            message.ClearField(name)
            applied.append(f"clear:{name}")
    for name, allowed in stream.enum_fields:
        value = getattr(message, name)
        if value and value not in allowed:
            # Free text outside the declared vocabulary may name a place.
            message.ClearField(name)
            applied.append(f"remove:{name}")
    for name in stream.place_id_fields:
        if mode is not _PRECISE and getattr(message, name):
            message.ClearField(name)
            applied.append(f"clear:{name}")
    for name in stream.pseudonymize_fields:
        value = getattr(message, name)
        if value:
            setattr(
                message,
                name,
                pseudonymize_vehicle_field(ctx.key, name, value, vin, ctx.identity.epoch(vin)),
            )
            applied.append(f"hmac:{name}")
    for name in stream.truncate_ip_fields:
        value = getattr(message, name)
        if value:
            setattr(message, name, truncate_ip(value))
            applied.append(f"truncate_ip:{name}")
    for name in stream.remove_fields:
        if message.HasField(name) if _has_presence(message, name) else bool(getattr(message, name)):
            message.ClearField(name)
            applied.append(f"remove:{name}")
    # Fields the policy does not know (a newer car schema) never leave.
    message.DiscardUnknownFields()
    return applied, new_anchor


def _locate(
    ctx: DecisionContext,
    stream: CompiledStream,
    message: Message,
    vin: str,
    mode: LocationMode,
    anchor: LocationAnchor | None,
    now: float,
    applied: list[str],
) -> LocationAnchor | None:
    """Location mode on every GeoPoint field (contract rules 4, 5, 13).

    Under approximate, every field that says where the car is or was shows
    the vehicle's one anchored coarse value: "position" fields the current
    anchor (refreshed by this message when the interval is over on the gateway
    clock), "place" fields the anchor that held before this message, so no
    field ever publishes a fresher value than the anchor. A "destination" is
    coarsened on the same grid and leaves the anchor alone.
    """
    present: list[tuple[str, list[common_pb2.GeoPoint]]] = []
    for geo in stream.geo_fields:
        if geo.repeated:
            points = getattr(message, geo.name)
            if not points:
                continue
            if mode is _OFF:
                message.ClearField(geo.name)
                applied.append(f"clear:{geo.name}")
                continue
            invalid = [i for i, point in enumerate(points) if not valid_position(point)]
            if invalid:
                for i in reversed(invalid):
                    del points[i]
                applied.append(f"invalid_position:{geo.name}")
            if points:
                present.append((geo.role, list(points)))
                if mode is _APPROXIMATE:
                    applied.append(f"coarsen:{geo.name}")
            continue
        if not message.HasField(geo.name):
            continue
        if mode is _OFF:
            message.ClearField(geo.name)
            applied.append(f"clear:{geo.name}")
            continue
        point = getattr(message, geo.name)
        if not valid_position(point):
            # No fix: nothing to report, and never a refresh of the anchor.
            message.ClearField(geo.name)
            applied.append(f"invalid_position:{geo.name}")
        else:
            present.append((geo.role, [point]))
            if mode is _APPROXIMATE:
                applied.append(f"coarsen:{geo.name}")
    if mode is not _APPROXIMATE or not present:
        return None
    policy = ctx.policy
    cell = policy.cell_size_m
    new_anchor: LocationAnchor | None = None
    if anchor is None or anchor.due(now, policy.refresh_interval_ms / 1000.0):
        # The freshest point the message has: a current position before a past place.
        source = next((pts[-1] for role, pts in present if role == "position"), None)
        if source is None:
            source = next((pts[-1] for role, pts in present if role == "place"), None)
        if source is not None:
            offset = grid_offset(ctx.stable_key, ctx.identity.placement(vin))
            lat, lon = coarsen_position(source.latitude, source.longitude, cell, offset)
            odometer = _odometer_reading(message, stream.odometer_fields)
            if odometer is None and anchor is not None:
                odometer = anchor.odometer_km
            new_anchor = LocationAnchor(now, lat, lon, odometer)
    current = new_anchor if new_anchor is not None else anchor
    before = anchor if anchor is not None else new_anchor
    for role, points in present:
        for point in points:
            if role == "destination":
                coarsen_geopoint(
                    point, cell, destination_offset(ctx.stable_key, ctx.identity.placement(vin))
                )
                continue
            value = current if role == "position" else before
            assert value is not None  # a valid point of the car always anchors
            point.Clear()
            point.latitude = value.latitude
            point.longitude = value.longitude
            point.horizontal_accuracy_m = cell
    return new_anchor


def _odometer_reading(message: Message, names: tuple[str, ...]) -> float | None:
    for name in names:
        value = float(getattr(message, name))
        if value and math.isfinite(value):
            return value
    return None


def _side_odometer(
    message: Message,
    name: str,
    mode: LocationMode,
    anchor: LocationAnchor | None,
    applied: list[str],
) -> None:
    """An odometer moves only with the coarse position (contract rule 14):
    under approximate it shows the reading stored with the anchor, so its
    steps coincide with the anchor's and time no grid crossing; under off
    it is removed; precise keeps it."""
    if mode is _PRECISE:
        return
    value = getattr(message, name)
    if not value:
        return
    frozen = anchor.odometer_km if anchor is not None else None
    if mode is _APPROXIMATE and frozen is not None:
        if value != frozen:
            setattr(message, name, frozen)
        applied.append(f"anchor:{name}")
    else:
        message.ClearField(name)
        applied.append(f"remove:{name}")


def _has_presence(message: Message, name: str) -> bool:
    fd = message.DESCRIPTOR.fields_by_name[name]
    return bool(fd.has_presence)


# --------------------------------------------------------------------------
# Privacy settings


def _decide_settings(
    ctx: DecisionContext, vin: str, payload: bytes, current: VehicleState | None, now: float
) -> Decision:
    settings = privacy_pb2.PrivacySettings()
    try:
        settings.ParseFromString(payload)
    except DecodeError:
        return Drop(DropReason.UNDECODABLE, SETTINGS_TOPIC, vin=vin)
    if settings.header.vin != vin:
        return Drop(
            DropReason.VIN_MISMATCH, SETTINGS_TOPIC, vin=vin, detail=settings.header.vin[:32]
        )
    if settings.revision > MAX_REVISION:
        # Not storable as a signed 64-bit integer: the durable write would fail
        # forever, stalling the pipeline (a car counting by one never gets there).
        return Drop(DropReason.UNDECODABLE, SETTINGS_TOPIC, vin=vin, detail="revision out of range")
    applied_revision = current.revision if current is not None else 0
    erased = ctx.identity.row(ctx.stable_key, vin) if current is None else None
    if erased is not None and settings.revision <= erased.revision_floor:
        # Settings from before an erasure are void: ask for the screen again.
        return Drop(
            DropReason.STALE_REVISION,
            SETTINGS_TOPIC,
            vin=vin,
            detail=f"{settings.revision}<={erased.revision_floor} (erased)",
            reannounce=applied_message(ctx, vin, erased.revision_floor, reprompt=True),
        )
    if settings.revision <= applied_revision:
        reannounce = None
        if current is not None and settings.revision == applied_revision:
            reannounce = applied_message(ctx, vin, applied_revision)
        return Drop(
            DropReason.STALE_REVISION,
            SETTINGS_TOPIC,
            vin=vin,
            detail=f"{settings.revision}<={applied_revision}",
            reannounce=reannounce,
        )
    features = kept_features(ctx.policy, settings.features)
    # The version the consent was given under: the one the car says it showed
    # when the gateway stored it (or it is the active one), else the active one.
    stated = settings.policy_version
    known = stated == ctx.policy.version or stated in ctx.consent_scopes
    snapshot = SettingsSnapshot(
        vin=vin,
        revision=settings.revision,
        privacy_mode=settings.privacy_mode,
        location=LocationMode.parse(settings.location),
        features=features,
        applied_at=now,
        policy_version=stated if stated and known else ctx.policy.version,
    )
    state = state_from_snapshot(ctx.policy, snapshot, current.window_until if current else 0.0)
    if (current is not None and current.restricted) or (erased is not None and erased.restricted):
        state = dataclasses.replace(state, restricted=True)
    if current is not None and current.find_my_car:
        # New settings neither reset the commands-per-hour cap nor spent fixes.
        state = with_find_my_car(state, findmycar.live_commands(current, now, ctx.policy.window_s))
    # Consent given under an older version that the active one widened: the
    # car is asked to show its privacy screen again (for the active version).
    outdated = bool(ctx.consent_scopes.get(snapshot.policy_version)) and (
        snapshot.policy_version != ctx.policy.version
    )
    topic, body = applied_message(ctx, vin, settings.revision, reprompt=outdated)
    return ApplySettings(snapshot, state, topic, body, len(settings.features) - len(features))


def kept_features(policy: CompiledPolicy, features: Mapping[str, bool]) -> dict[str, bool]:
    """The part of a snapshot's feature map worth enforcing and storing: the
    policy's features (on or off: an explicit off of a default-on feature
    matters), at most MAX_APP_CONSENTS per-app consents that are on, and at
    most MAX_UNKNOWN_OFFS explicit offs of ids the policy does not know (a
    later policy may add that feature on by default: the driver's no must
    still hold then)."""
    kept: dict[str, bool] = {}
    apps: list[str] = []
    offs: list[str] = []
    for name, on in features.items():
        if name in policy.features:
            kept[name] = on
        elif len(name) > MAX_FEATURE_ID:
            continue
        elif policy.feature_is_known(name):
            if on:  # a per-app consent; an absent one is off already
                apps.append(name)
        elif not on and FEATURE_ID_PATTERN.fullmatch(name):
            offs.append(name)
    for name in sorted(apps)[:MAX_APP_CONSENTS]:
        kept[name] = True
    for name in sorted(offs)[:MAX_UNKNOWN_OFFS]:
        kept[name] = False
    return kept


def state_from_snapshot(
    policy: CompiledPolicy, snapshot: SettingsSnapshot, window_until: float = 0.0
) -> VehicleState:
    """The enforceable state of a snapshot under a policy.

    Features the snapshot does not mention take the policy default (never on
    for consent); unknown feature ids are ignored. The snapshot's feature map
    is read, not copied, and remembered by identity: it must not change
    afterwards (the store and the settings decision build one per snapshot).

    States are immutable, and a fleet shares a few thousand distinct ones:
    identical states are one object (what makes a million vehicles cheap to
    hold and fast to load).
    """
    enabled = _enabled_for_map(policy, snapshot.features)
    key = (
        snapshot.revision,
        snapshot.privacy_mode,
        snapshot.location,
        enabled,
        window_until,
        snapshot.policy_version,
    )
    state = _STATE_CACHE.get(key)
    if state is None:
        state = _STATE_CACHE.put(
            key,
            VehicleState(
                revision=snapshot.revision,
                privacy_mode=snapshot.privacy_mode,
                location=snapshot.location,
                enabled=enabled,
                window_until=window_until,
                consent_version=snapshot.policy_version,
            ),
        )
    return state


def with_find_my_car(state: VehicleState, commands: tuple[FindMyCarCommand, ...]) -> VehicleState:
    """`state` holding `commands` (contract rule 17). A car with none left
    shares its state with the other cars of the same settings again."""
    if commands:
        return dataclasses.replace(
            state, find_my_car=commands, window_until=max(c.until for c in commands)
        )
    if not state.find_my_car and state.window_until == 0.0:
        return state
    bare = dataclasses.replace(state, find_my_car=(), window_until=0.0)
    if bare.restricted or bare.objected:  # per car: never shared
        return bare
    key = (bare.revision, bare.privacy_mode, bare.location, bare.enabled, 0.0, bare.consent_version)
    return _STATE_CACHE.put(key, bare)


def expire_find_my_car(state: VehicleState, now: float, window_s: float = 0.0) -> VehicleState:
    """`state` without the find-my-car commands that no longer matter at `now`
    (window closed and the cap's hour over): shared again when none is left."""
    if not state.find_my_car:
        return state
    live = findmycar.live_commands(state, now, window_s)
    return state if live == state.find_my_car else with_find_my_car(state, live)


# The enabled set is shared (charged to _SET_CACHE), so a state costs a constant.
_STATE_CACHE: ByteBoundedMemo[tuple[object, ...], VehicleState] = ByteBoundedMemo(
    64 << 20, lambda key: 2 * ENTRY_OVERHEAD
)
# Per policy object (identity, kept alive by the entry): feature items -> enabled set.
_ENABLED_CACHE: dict[
    int,
    tuple[CompiledPolicy, ByteBoundedMemo[tuple[tuple[str, bool], ...], frozenset[str]]],
] = {}


def _enabled_features(
    policy: CompiledPolicy, features: tuple[tuple[str, bool], ...]
) -> frozenset[str]:
    entry = _ENABLED_CACHE.get(id(policy))
    if entry is None or entry[0] is not policy:
        if len(_ENABLED_CACHE) > 8:  # policies are replaced rarely
            _ENABLED_CACHE.clear()
        entry = _ENABLED_CACHE[id(policy)] = (policy, ByteBoundedMemo(16 << 20, strings_size))
    cache = entry[1]
    enabled_set = cache.get(features)
    if enabled_set is None:
        names = {name for name, _ in features}
        enabled = set(policy.default_on - names)
        for feature_id, on in features:
            if on and policy.feature_is_known(feature_id):
                enabled.add(sys.intern(feature_id))
        enabled_set = cache.put(features, _intern_set(frozenset(enabled)))
    return enabled_set


# Feature maps by identity (the map kept alive by its entry, so an id is never
# reused while remembered): a store decodes each distinct JSON text once and
# hands every car of it the same map, so a restart of a million cars skips
# building and hashing the items of each. Bounded by entries: a map holds at
# most the policy's features and the consent caps.
_ENABLED_BY_MAP: dict[int, tuple[CompiledPolicy, Mapping[str, bool], frozenset[str]]] = {}
_MAPS_REMEMBERED: Final = 1024


def _enabled_for_map(policy: CompiledPolicy, features: Mapping[str, bool]) -> frozenset[str]:
    hit = _ENABLED_BY_MAP.get(id(features))
    if hit is not None and hit[1] is features and hit[0] is policy:
        return hit[2]
    enabled = _enabled_features(policy, tuple(features.items()))
    if len(_ENABLED_BY_MAP) >= _MAPS_REMEMBERED:
        _ENABLED_BY_MAP.clear()
    _ENABLED_BY_MAP[id(features)] = (policy, features, enabled)
    return enabled


_SET_CACHE: ByteBoundedMemo[frozenset[str], frozenset[str]] = ByteBoundedMemo(
    16 << 20, strings_size
)


def _intern_set(value: frozenset[str]) -> frozenset[str]:
    # Fleets share a few hundred distinct feature combinations: keep one copy each.
    return _SET_CACHE.put(value, value)


def applied_message(
    ctx: DecisionContext, vin: str, revision: int, *, reprompt: bool = False
) -> tuple[str, bytes]:
    """PrivacyApplied for the car; with `reprompt`, the gateway holds no
    settings for it (erased): show the privacy screen again and send a
    snapshot newer than `revision`."""
    body = privacy_pb2.PrivacyApplied(
        vin=vin, revision=revision, policy_version=ctx.policy.version, reprompt=reprompt
    )
    return f"{ctx.vehicle_prefix}/{vin}/{APPLIED_TOPIC}", body.SerializeToString()


# --------------------------------------------------------------------------
# Backend -> vehicle commands


def split_command_topic(prefix: str, topic: str, kind: str = "cmd") -> tuple[str, str] | None:
    """'tsp/{vin}/cmd/{command}' -> ('{vin}', '{command}'); with `kind` "msg",
    a message-centre topic 'tsp/{vin}/msg/{category}'."""
    parts = topic.split("/")
    head = prefix.split("/")
    if len(parts) != len(head) + 3 or parts[: len(head)] != head or parts[len(head) + 1] != kind:
        return None
    return parts[len(head)], parts[len(head) + 2]


def decide_message(
    ctx: DecisionContext,
    topic: str,
    payload: bytes,
    states: Mapping[str, VehicleState],
    now: float,
) -> CommandDecision | None:
    """A message-centre message (backend -> car): forwarded to
    'vehicle/{vin}/avn/msg/{category}' when the car is known and its feature
    is on (an objection turns it off); every message gets a result. None when
    the topic is not a message-centre topic."""
    parts = split_command_topic(ctx.backend_prefix, topic, "msg")
    if parts is None:
        return None
    vin, category = parts
    return _decide_request(
        ctx,
        vin,
        category,
        payload,
        ctx.policy.messages.get(category),
        states,
        now,
        f"{ctx.backend_prefix}/{vin}/msg/{category}/result",
        f"{ctx.vehicle_prefix}/{vin}/avn/msg/{category}",
        "unknown_category",
    )


def decide_command(
    ctx: DecisionContext,
    topic: str,
    payload: bytes,
    states: Mapping[str, VehicleState],
    now: float,
) -> CommandDecision | None:
    """Decide one backend command. None when the topic is not a command topic."""
    parts = split_command_topic(ctx.backend_prefix, topic)
    if parts is None:
        return None
    vin, name = parts
    return _decide_request(
        ctx,
        vin,
        name,
        payload,
        ctx.policy.commands.get(name),
        states,
        now,
        f"{ctx.backend_prefix}/{vin}/cmd/{name}/result",
        f"{ctx.vehicle_prefix}/{vin}/cmd/{name}",
        "unknown_command",
    )


def _decide_request(
    ctx: DecisionContext,
    vin: str,
    name: str,
    payload: bytes,
    rule: CompiledCommand | None,
    states: Mapping[str, VehicleState],
    now: float,
    result_topic: str,
    forward_topic: str,
    unknown: str,
) -> CommandDecision:
    """A backend -> car request (a command or a message-centre message)."""
    command = command_pb2.Command()
    try:
        command.ParseFromString(payload)
    except DecodeError:
        return _refuse(vin, name, "", result_topic, "undecodable")
    request_id = command.request_id

    def refuse(reason: str) -> CommandDecision:
        return _refuse(vin, name, request_id, result_topic, reason)

    if not is_valid_vin(vin):
        return refuse("invalid_vin")
    if command.command and command.command != name:
        return refuse("command_mismatch")
    if rule is None:
        return refuse(unknown)
    state = states.get(vin)
    if state is None:
        return refuse("unknown_vehicle")
    if state.restricted:
        return refuse("restricted")
    if state.privacy_mode:
        return refuse("privacy_mode")
    if rule.feature in state.objected:
        return refuse(f"objected:{rule.feature}")
    if rule.feature not in state.enabled:
        return refuse(f"feature_disabled:{rule.feature}")
    new_state = None
    if rule.opens_window:
        if len(request_id) > findmycar.MAX_REQUEST_ID:
            return refuse("invalid_request_id")
        # Contract rule 17: a car answers at most this many commands an hour.
        commands = findmycar.live_commands(state, now, ctx.policy.window_s)
        if findmycar.rate_limited(commands, now, ctx.policy.max_commands_per_hour):
            return refuse("rate_limited")
        new_state = with_find_my_car(
            state, findmycar.accept(commands, request_id, now, ctx.policy.window_s)
        )
    result = command_pb2.CommandResult(
        request_id=request_id, command=name, accepted=True, reason="forwarded"
    )
    if not command.command:
        command.command = name
    return CommandDecision(
        vin=vin,
        command=name,
        accepted=True,
        reason="forwarded",
        result_topic=result_topic,
        result_payload=result.SerializeToString(),
        forward_topic=forward_topic,
        forward_payload=command.SerializeToString(),
        state=new_state,
    )


def refused_result(decision: CommandDecision, reason: str) -> tuple[str, bytes]:
    """(topic, CommandResult) refusing a command that was decided, e.g. because
    it could not be delivered to the car."""
    return decision.result_topic, _refuse(
        decision.vin, decision.command, _request_id(decision), decision.result_topic, reason
    ).result_payload


def _request_id(decision: CommandDecision) -> str:
    return command_pb2.CommandResult.FromString(decision.result_payload).request_id


def _refuse(
    vin: str, name: str, request_id: str, result_topic: str, reason: str
) -> CommandDecision:
    result = command_pb2.CommandResult(
        request_id=request_id, command=name, accepted=False, reason=reason
    )
    return CommandDecision(
        vin=vin,
        command=name,
        accepted=False,
        reason=reason,
        result_topic=result_topic,
        result_payload=result.SerializeToString(),
    )
