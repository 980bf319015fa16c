"""The operator's policy: YAML document -> validated model -> compiled lookup tables.

Validation happens once, at load time, and names the file, the path inside it
and what is wrong. The compiled form (`CompiledPolicy`) is immutable and is
what the decision core reads on every message: dictionary lookups only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from telematics.v1 import streams_pb2

LegalBasis = Literal["consent", "contract", "legal_obligation", "legitimate_interest"]
SimpleAction = Literal[
    "position",
    "place",
    "destination",
    "place_id",
    "place_text",
    "odometer",
    "pseudonymize",
    "truncate_ip",
    "remove",
    "keep",
]
GEO_ACTIONS = frozenset({"position", "place", "destination"})
STRING_ACTIONS = frozenset({"place_id", "place_text", "pseudonymize", "truncate_ip"})
_NUMERIC_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
GEOPOINT_TYPE = "telematics.v1.GeoPoint"
IMPLICIT_RECIPIENT_ID = "backend"
HEADER_TYPE = "telematics.v1.Header"
MIN_CELL_SIZE_M = 200.0
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PLACEHOLDER = re.compile(r"^\{([a-z][a-z0-9_]*)\}$")
# No '.', so feature ids stay unambiguous; \Z because `$` allows a trailing newline.
_PLACEHOLDER_VALUE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")


class PolicyError(Exception):
    """A policy that cannot be used. `problems` are (path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("invalid policy\n  " + "\n  ".join(lines))


DEFAULT_MAX_PAYLOAD = 64 * 1024
MAX_PAYLOAD_LIMIT = 16 * 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocationSpec(_Strict):
    cell_size_m: float = Field(2000.0, description="approximate-location grid cell")
    refresh_interval_s: float = Field(900.0, ge=0)


# Contract rule 17 (find-my-car is not a tracker). More than a few fixes per
# command is a track of the walk to the car; a command every five minutes
# (12 an hour) is already a usable track of a driving car, and the commands
# a car remembers for the cap must stay few.
MAX_FIXES_PER_COMMAND = 10
MAX_COMMANDS_PER_HOUR = 12


class FindMyCarSpec(_Strict):
    window_s: float = Field(120.0, gt=0, le=3600)
    fixes_per_command: int = Field(1, ge=1, le=MAX_FIXES_PER_COMMAND)
    max_commands_per_hour: int = Field(4, ge=1, le=MAX_COMMANDS_PER_HOUR)


class IdentitySpec(_Strict):
    # Capture times of pseudonymized streams are rounded down to this step, so
    # they match no timestamp of the car's VIN-keyed streams (contract rule 15).
    pseudonymized_timestamp_step_s: int = Field(60, ge=1, le=86400)
    # Optional: an app's pseudonyms change every this many days, for every car
    # at the same instant (UTC day boundaries); "*" applies to every app. Off
    # by default: a rotated pseudonym is a new user to the app's backend.
    app_pseudonym_rotation_days: dict[str, int] = Field(default_factory=dict)

    @field_validator("app_pseudonym_rotation_days")
    @classmethod
    def _positive(cls, value: dict[str, int]) -> dict[str, int]:
        for app, days in value.items():
            if days < 1 or days > 3650:
                raise ValueError(f"{app}: rotation period must be 1..3650 days, got {days}")
        return value

    def rotation_days(self, app_id: str) -> int:
        """The app's rotation period in days; 0 when its pseudonyms do not rotate."""
        rotation = self.app_pseudonym_rotation_days
        return rotation.get(app_id, rotation.get("*", 0)) if rotation else 0


class FeatureSpec(_Strict):
    legal_basis: LegalBasis
    description: str = ""
    default: bool = False
    per_app: bool = False


class GeneralizeAction(_Strict):
    """`{generalize: STEP}`: a number that with a known start would rebuild a
    track (trip distance, duration, average speed) is rounded to the nearest
    multiple of STEP under approximate location, removed under off, kept under
    precise."""

    generalize: float = Field(gt=0)


class EnumAction(_Strict):
    """`{enum: [...]}`: free text passes only as one of the listed exact values
    (in every location mode); anything else, which may name a place, is removed."""

    enum: list[str] = Field(max_length=256)


FieldAction = SimpleAction | GeneralizeAction | EnumAction


def action_name(action: FieldAction) -> str:
    """'generalize', 'enum' or the simple action itself."""
    if isinstance(action, GeneralizeAction):
        return "generalize"
    if isinstance(action, EnumAction):
        return "enum"
    return action


TransferBasis = Literal["none", "adequacy", "scc", "bcr", "explicit_consent"]
# Countries of the EEA (GDPR applies: sending there is no transfer).
_EEA_CODES = (
    "AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE IS LI NO"
)
EEA = frozenset(_EEA_CODES.split())
# Third countries with an adequacy decision of the European Commission (Art. 45).
# US: only organisations certified under the EU-US Data Privacy Framework.
_ADEQUATE_CODES = "AD AR CA FO GG IL IM JP JE NZ KR CH GB UY US"
ADEQUATE = frozenset(_ADEQUATE_CODES.split())
OPERATOR = "operator"  # the controller running the gateway (whose own recipients are processors)


class RecipientSpec(_Strict):
    """Who receives a stream (GDPR Art. 13(1)(e)-(f), Art. 44-49)."""

    # The legal entity as the notice names it: what the data subject's export shows.
    name: str = Field(min_length=1, max_length=200)
    role: Literal["controller", "processor"]
    # A processor acts for a controller: the operator, or a declared controller recipient.
    controller: str = OPERATOR
    # ISO 3166-1 alpha-2 country, "EEA", or "unknown" (a third country not known in advance).
    region: str = Field(pattern=r"^([A-Z]{2}|EEA|unknown)$")
    transfer_basis: TransferBasis = "none"
    # Streams without their own `recipients` go to every default recipient.
    default: bool = False
    # Topic prefix on the backend broker (its ACL gives the recipient only this
    # prefix, or a bridge carries it to the recipient's broker); none: the
    # gateway's backend prefix.
    egress_prefix: str | None = Field(None, pattern=r"^[a-z][a-z0-9_-]{0,63}$")

    @property
    def third_country(self) -> bool:
        return self.region not in EEA and self.region not in ("EEA", "")


class RouteSpec(_Strict):
    """What one recipient of a stream gets, when it is less than the stream's rules."""

    # Top-level fields this recipient does not get (besides what the rules remove).
    remove: list[str] = Field(default_factory=list, max_length=64)
    # The VIN becomes a pseudonym of this recipient (topic and header).
    pseudonymize_vin: bool = False


class StreamSpec(_Strict):
    message: str
    feature: str
    retention_days: int = Field(ge=0, le=3650)
    location_purpose: bool = False
    requires_window: bool = False
    pseudonymize_vin: bool = False
    fields: dict[str, FieldAction] = Field(default_factory=dict)
    max_payload_bytes: int | None = Field(
        None, ge=64, le=MAX_PAYLOAD_LIMIT, description="default: the policy's max_payload_bytes"
    )
    # Recipient id -> what it gets (`{}`: the stream as the rules make it);
    # none: the policy's default recipients.
    recipients: dict[str, RouteSpec] | None = None


class CommandSpec(_Strict):
    feature: str
    opens_window: bool = False


class MessageSpec(_Strict):
    """A message-centre category: backend -> car messages (alerts, operating
    information, service adverts) gated by `feature`."""

    feature: str


class PolicyDocument(_Strict):
    # Dotted numbers ("2026.11.1"): pushes must carry a strictly newer version.
    version: str = Field(min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")
    location: LocationSpec = LocationSpec()
    find_my_car: FindMyCarSpec = FindMyCarSpec()
    identity: IdentitySpec = IdentitySpec()
    features: dict[str, FeatureSpec]
    # Who receives data (none declared: one default recipient, `backend`, on
    # the gateway's backend prefix, as before recipients existed).
    recipients: dict[str, RecipientSpec] = Field(default_factory=dict)
    streams: dict[str, StreamSpec]
    commands: dict[str, CommandSpec] = Field(default_factory=dict)
    # Message centre: tsp/{vin}/msg/{category} -> vehicle/{vin}/avn/msg/{category}.
    messages: dict[str, MessageSpec] = Field(default_factory=dict)
    # Bigger payloads are dropped (counted as `oversized`); eCall is trimmed instead.
    max_payload_bytes: int = Field(DEFAULT_MAX_PAYLOAD, ge=64, le=MAX_PAYLOAD_LIMIT)


# --------------------------------------------------------------------------
# Compiled form


@dataclass(frozen=True, slots=True)
class GeoField:
    """A GeoPoint field and what it says about the car, which decides how an
    approximate value relates to the vehicle's location anchor:

    - "position": where the car is (current position, charger it stands at,
      trip end): publishes the anchor, refreshes it when the interval is over;
    - "place": where the car was (trip start): publishes the anchor that held
      before the message, never a fresher value;
    - "destination": where the car is not: coarsened on the same grid, the
      anchor is neither used nor moved.
    """

    name: str
    repeated: bool
    role: str = "place"

    @property
    def is_position(self) -> bool:
        return self.role == "position"


@dataclass(frozen=True, slots=True)
class CompiledStream:
    key: str  # policy key, e.g. "tbox/status" or "avn/app/{app_id}"
    unit: str
    message_name: str
    message_cls: type[Message]
    feature: str  # base feature id ("third_party" for per-app streams)
    per_app_placeholder: str | None  # "app_id" when the feature is per app
    legal_basis: str
    legal_obligation: bool
    retention_days: int
    location_purpose: bool
    requires_window: bool
    pseudonymize_vin: bool
    geo_fields: tuple[GeoField, ...]
    place_id_fields: tuple[str, ...]
    pseudonymize_fields: tuple[str, ...]
    truncate_ip_fields: tuple[str, ...]
    remove_fields: tuple[str, ...]
    keep_fields: tuple[str, ...]
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    odometer_fields: tuple[str, ...] = ()
    generalize_fields: tuple[tuple[str, float], ...] = ()  # (name, step)
    enum_fields: tuple[tuple[str, frozenset[str]], ...] = ()  # (name, allowed values)
    place_text_fields: tuple[str, ...] = ()
    # Who gets the stream, first the one whose pseudonyms predate recipients.
    routes: tuple[CompiledRoute, ...] = ()
    # The one route when the stream has one getting exactly what the rules
    # make (no removals, no pseudonym of its own): decided without copies.
    plain_route: CompiledRoute | None = None


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One recipient of a stream and what it gets beyond the stream's rules."""

    recipient: str
    prefix: str | None  # topic prefix; None: the gateway's backend prefix
    pseudonymize_vin: bool
    remove_fields: tuple[str, ...]
    # Part of the pseudonym scope of a pseudonymized route, so two recipients
    # never share a pseudonym ("" for the implicit `backend`: as before recipients).
    scope_suffix: str
    properties: tuple[tuple[str, str], ...]  # MQTT v5 `recipient`, `transfer-basis`


@dataclass(frozen=True, slots=True)
class CompiledCommand:
    name: str
    feature: str
    opens_window: bool


@dataclass(frozen=True, slots=True)
class _TemplateRoute:
    parts: tuple[str | None, ...]  # literal segment, or None for a placeholder
    placeholder_index: int
    stream: CompiledStream


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    version: str
    digest: str
    cell_size_m: float
    refresh_interval_ms: int
    window_s: float
    features: Mapping[str, FeatureSpec]
    per_app_features: frozenset[str]
    default_on: frozenset[str]  # non-consent features on when a snapshot omits them
    legal_obligation_features: frozenset[str]
    exact_routes: Mapping[str, CompiledStream]
    template_routes: tuple[_TemplateRoute, ...]
    commands: Mapping[str, CompiledCommand]
    document: PolicyDocument
    text: str = ""  # the YAML as loaded, so it can be stored and rolled back to
    fixes_per_command: int = 1  # find-my-car fixes forwarded per accepted command
    max_commands_per_hour: int = 4  # accepted find-my-car commands per car per hour
    # Message-centre categories (backend -> car), each gated by a feature.
    messages: Mapping[str, CompiledCommand] = dataclasses.field(default_factory=dict)

    def route(self, relative_topic: str) -> tuple[CompiledStream, str | None] | None:
        """Stream rule for a topic relative to vehicle/{vin}/, plus the app id if any."""
        stream = self.exact_routes.get(relative_topic)
        if stream is not None:
            return stream, None
        parts = relative_topic.split("/")
        for route in self.template_routes:
            if len(parts) != len(route.parts):
                continue
            if all(lit is None or lit == seg for lit, seg in zip(route.parts, parts, strict=True)):
                value = parts[route.placeholder_index]
                return (route.stream, value) if _PLACEHOLDER_VALUE.fullmatch(value) else None
        return None

    @property
    def max_payload_bytes_default(self) -> int:
        return self.document.max_payload_bytes

    @property
    def streams(self) -> tuple[CompiledStream, ...]:
        return (*self.exact_routes.values(), *(r.stream for r in self.template_routes))

    @property
    def legal_obligation_streams(self) -> frozenset[str]:
        """Keys of the streams forwarded by legal obligation (eCall)."""
        return frozenset(s.key for s in self.streams if s.legal_obligation)

    def feature_is_known(self, feature_id: str) -> bool:
        if feature_id in self.features:
            return True
        base, _, app = feature_id.partition(".")
        return bool(app) and base in self.per_app_features


# --------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys: in a policy, a second
    `tbox/status:` silently replacing the first would be an invisible change."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def version_key(version: str) -> tuple[int, ...]:
    """Order of policy versions: "2026.11.10" > "2026.11.9"."""
    return tuple(int(part) for part in version.split("."))


class VersionConflict(Exception):
    """A policy version refused by the version rules (HTTP 409)."""


def check_new_version(
    version: str, digest: str, stored: Mapping[str, str], active: str | None = None
) -> None:
    """The rule for storing a policy: its version must be newer than every version
    ever stored (`stored`: version -> digest), so a number names exactly one text
    for good and a stored version comes back only by an explicit rollback.

    Raises VersionConflict saying which part of the rule the push breaks.
    """
    key = version_key(version)
    same = next((v for v in stored if version_key(v) == key), None)
    highest = max(stored, key=version_key, default=None)
    if same is not None and stored[same] != digest:
        raise VersionConflict(
            f"version {version} is already stored with a different text"
            f" (sha256 {stored[same][:16]}...): a version number names one policy for good;"
            " sign the change as a newer version"
        )
    if same is not None and same == active:
        raise VersionConflict(f"version {version} is already active (not newer than itself)")
    if same is not None:
        raise VersionConflict(
            f"version {version} was pushed before: a replay is not newer than {highest}, the"
            f" highest stored version; use POST /v1/policy/rollback to re-activate {same}"
        )
    if highest is not None and key <= version_key(highest):
        raise VersionConflict(
            f"version {version} is not newer than {highest}, the highest stored version"
            " (use POST /v1/policy/rollback to return to a stored version)"
        )


def load_policy(path: str | Path) -> CompiledPolicy:
    """Read, validate and compile a policy file; raises PolicyError naming the problem."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(source, [("", f"cannot read file: {exc.strerror or exc}")]) from exc
    return parse_policy(raw, source=source)


def parse_policy(raw: bytes | str, *, source: str = "<policy>") -> CompiledPolicy:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        # Callers handle PolicyError only: a stray byte must not crash startup.
        raise PolicyError(source, [("", f"not UTF-8 text (byte {exc.start})")]) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, [(where, f"not valid YAML: {problem}")]) from exc
    if not isinstance(data, dict):
        raise PolicyError(source, [("", "the policy must be a YAML mapping")])
    try:
        document = PolicyDocument.model_validate(data)
    except ValidationError as exc:
        problems = _validation_problems(exc)
        raise PolicyError(source, problems) from exc
    problems = check_document(document)
    if problems:
        raise PolicyError(source, problems)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return dataclasses.replace(compile_policy(document, digest=digest), text=text)


_UNION_BRANCH = re.compile(r"^(literal\[.*\]|GeneralizeAction|EnumAction)$")


def _validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as (path, message). A field action matching none of
    its forms is reported against the form closest to what was written: the
    word list for text, the form with the fewest complaints for a mapping."""
    plain: list[tuple[str, str]] = []
    unions: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        cut = next((i for i, p in enumerate(loc) if _UNION_BRANCH.match(p)), None)
        if cut is None:
            plain.append((".".join(loc), err["msg"]))
            continue
        if loc[cut].startswith("literal[") and isinstance(err.get("input"), dict):
            continue  # written as a mapping: the word list is not what was meant
        path = ".".join(loc[:cut] + loc[cut + 1 :])
        branches = unions.setdefault(".".join(loc[:cut]), {})
        branches.setdefault(loc[cut], []).append((path, err["msg"]))
    for branches in unions.values():
        literal = next((v for k, v in branches.items() if k.startswith("literal[")), None)
        if literal is not None:
            plain += literal  # written as a word
            continue
        fewest = min(len(v) for v in branches.values())
        for problems in branches.values():
            if len(problems) == fewest:
                plain += problems
    return plain


def _message_descriptor(name: str) -> Descriptor | None:
    desc = streams_pb2.DESCRIPTOR.message_types_by_name.get(name)
    return desc


def _feature_ref(feature: str, placeholders: set[str]) -> tuple[str, str | None]:
    """Split "third_party.{app_id}" into ("third_party", "app_id")."""
    base, dot, rest = feature.partition(".")
    if not dot:
        return feature, None
    m = _PLACEHOLDER.match(rest)
    if m and m.group(1) in placeholders:
        return base, m.group(1)
    return feature, None


# A policy without a `recipients` section: everything goes to the gateway's
# backend prefix, as before recipients could be declared.
IMPLICIT_RECIPIENT = RecipientSpec.model_construct(
    name="the operator's telematics backend",
    role="controller",
    controller=OPERATOR,
    region="",
    transfer_basis="none",
    default=True,
    egress_prefix=None,
)


def declared_recipients(doc: PolicyDocument) -> dict[str, RecipientSpec]:
    return dict(doc.recipients) or {IMPLICIT_RECIPIENT_ID: IMPLICIT_RECIPIENT}


def stream_routes(doc: PolicyDocument, spec: StreamSpec) -> dict[str, RouteSpec]:
    """Recipient id -> route of one stream (the default recipients when it names none)."""
    if spec.recipients is not None:
        return dict(spec.recipients)
    return {n: RouteSpec() for n, r in declared_recipients(doc).items() if r.default}


def controller_of(recipients: Mapping[str, RecipientSpec], recipient: str) -> str:
    """The controller a recipient's data belongs to: itself, or the one its processor serves."""
    spec = recipients[recipient]
    return recipient if spec.role == "controller" else spec.controller


def _check_recipients(doc: PolicyDocument) -> list[tuple[str, str]]:
    """Recipients and transfers (GDPR Art. 44-49) and the routes of each stream."""
    problems: list[tuple[str, str]] = []
    # Per recipient: streams it gets by VIN, and pseudonymized streams that
    # still say where the car is (the two views would pair on position and time).
    by_vin: dict[str, list[str]] = {}
    located: dict[str, list[str]] = {}
    recipients = declared_recipients(doc)
    prefixes: dict[str | None, str] = {}
    for rid, r in doc.recipients.items():
        path = f"recipients.{rid}"
        if not _NAME.match(rid):
            problems.append((path, "recipient ids are lower_snake_case"))
        if r.egress_prefix in prefixes:
            where = r.egress_prefix or "the backend prefix"
            problems.append(
                (f"{path}.egress_prefix", f"{where} is also {prefixes[r.egress_prefix]}'s")
            )
        prefixes.setdefault(r.egress_prefix, rid)
        if r.role == "processor":
            if r.controller != OPERATOR and (
                r.controller not in doc.recipients
                or doc.recipients[r.controller].role != "controller"
            ):
                problems.append(
                    (
                        f"{path}.controller",
                        f"{r.controller!r} is neither '{OPERATOR}' nor a declared controller",
                    )
                )
        elif r.controller != OPERATOR:
            problems.append((f"{path}.controller", "a controller acts for itself"))
        if not r.third_country and r.transfer_basis != "none":
            problems.append(
                (
                    f"{path}.transfer_basis",
                    f"{r.region} is in the EEA: not a transfer, the basis is 'none'",
                )
            )
        if r.third_country and r.transfer_basis == "none":
            problems.append(
                (
                    f"{path}.transfer_basis",
                    f"{r.region} is a third country: declare the transfer basis (adequacy,"
                    " scc, bcr, or explicit_consent under Art. 49(1)(a))",
                )
            )
        if r.transfer_basis == "adequacy" and r.region not in ADEQUATE:
            problems.append(
                (
                    f"{path}.transfer_basis",
                    f"no adequacy decision covers {r.region}"
                    f" (decisions: {', '.join(sorted(ADEQUATE))})",
                )
            )
    for key, stream in doc.streams.items():
        path = f"streams.{key}.recipients"
        routes = stream_routes(doc, stream)
        if not routes:
            problems.append((path, "no recipient: name one, or mark a recipient `default: true`"))
            continue
        feature = doc.features.get(stream.feature.partition(".")[0])
        basis = feature.legal_basis if feature is not None else ""
        desc = _message_descriptor(stream.message)
        for rid, route in routes.items():
            rpath = f"{path}.{rid}"
            target = recipients.get(rid)
            if target is None:
                problems.append((rpath, f"unknown recipient {rid!r}"))
                continue
            if target.transfer_basis == "explicit_consent" and basis != "consent":
                problems.append(
                    (
                        rpath,
                        f"{rid} relies on explicit consent (Art. 49(1)(a)) but the stream's"
                        f" legal basis is {basis}",
                    )
                )
            if basis == "legal_obligation" and (route.remove or route.pseudonymize_vin):
                problems.append((rpath, "legal-obligation streams are forwarded untouched"))
            for name in route.remove:
                if desc is not None and name not in desc.fields_by_name:
                    problems.append((f"{rpath}.remove", f"{stream.message} has no field {name!r}"))
                elif name == "header":
                    problems.append((f"{rpath}.remove", "the header is managed by the gateway"))
        if basis == "legal_obligation" and len(routes) > 1:
            problems.append((path, "a legal-obligation stream goes to exactly one recipient"))
        for rid, route in routes.items():
            if not (stream.pseudonymize_vin or route.pseudonymize_vin):
                by_vin.setdefault(rid, []).append(key)
            elif any(
                action_name(a) in GEO_ACTIONS and n not in route.remove
                for n, a in stream.fields.items()
            ):
                located.setdefault(rid, []).append(key)
        # Rules 15-16: the same values at the same moment, VIN-keyed for one
        # recipient and pseudonymized for another, pair the pseudonym with the
        # VIN wherever the two views meet: only separate controllers may.
        keyed = {
            rid: stream.pseudonymize_vin or route.pseudonymize_vin
            for rid, route in routes.items()
            if rid in recipients
        }
        for a in keyed:
            for b in keyed:
                if a < b and keyed[a] != keyed[b]:
                    ca, cb = controller_of(recipients, a), controller_of(recipients, b)
                    if ca == cb:
                        problems.append(
                            (
                                path,
                                f"{a} gets the VIN {'' if not keyed[a] else 'pseudonymized '}and"
                                f" {b} {'pseudonymized' if keyed[b] else 'the VIN'}: both serve"
                                f" controller {ca!r}, who could pair the two; only separate"
                                " controllers may be keyed differently",
                            )
                        )
    for rid in sorted(set(by_vin) & set(located)):
        problems.append(
            (
                f"recipients.{rid}",
                f"gets {', '.join(by_vin[rid])} by VIN and {', '.join(located[rid])} under a"
                " pseudonym with the car's location: the same coarse position at the same"
                " time pairs the pseudonym with the VIN (rule 15); remove the location from"
                " the pseudonymized streams or key both the same way",
            )
        )
    return problems


def vin_prefixes(policy: CompiledPolicy, backend_prefix: str) -> tuple[str, ...]:
    """Topic prefixes of the recipients that get some stream by VIN: where the
    gateway's VIN-keyed events (erasure, restriction, ownership) go."""
    found: list[str] = []
    for stream in policy.streams:
        for route in stream.routes:
            prefix = route.prefix or backend_prefix
            if not route.pseudonymize_vin and prefix not in found:
                found.append(prefix)
    return tuple(found) or (backend_prefix,)


def check_egress(
    policy: CompiledPolicy, vehicle_prefix: str, backend_prefix: str
) -> list[tuple[str, str]]:
    """Recipient prefixes against the gateway's own topics: a recipient on the
    vehicle prefix would publish to cars, one on the backend prefix would mix
    with the default recipient's topics (and its commands)."""
    problems = []
    heads = {vehicle_prefix.split("/")[0]: "vehicle", backend_prefix.split("/")[0]: "backend"}
    for rid, r in policy.document.recipients.items():
        prefix = r.egress_prefix
        if prefix is not None and prefix in heads:
            # Also a first segment of theirs: a filter on it (an ACL `tsp/#`)
            # would cover the recipient's topics.
            side = heads[prefix]
            problems.append(
                (
                    f"recipients.{rid}.egress_prefix",
                    f"{prefix!r} is (the start of) the gateway's {side} prefix; leave"
                    " egress_prefix out to use the backend prefix",
                )
            )
    return problems


def check_document(doc: PolicyDocument) -> list[tuple[str, str]]:
    """Semantic checks pydantic cannot express. Returns (path, problem) pairs."""
    problems: list[tuple[str, str]] = _check_recipients(doc)
    if doc.location.cell_size_m < MIN_CELL_SIZE_M:
        problems.append(
            (
                "location.cell_size_m",
                f"must be at least {MIN_CELL_SIZE_M:g} m, got {doc.location.cell_size_m:g}",
            )
        )
    for name, spec in doc.features.items():
        path = f"features.{name}"
        if not _NAME.match(name):
            problems.append((path, "feature ids are lower_snake_case"))
        if spec.legal_basis == "consent" and spec.default:
            problems.append(
                (
                    f"{path}.default",
                    "a consent-based feature cannot default to on (privacy by default)",
                )
            )
        if spec.per_app and spec.legal_basis == "legal_obligation":
            problems.append((f"{path}.per_app", "a legal obligation cannot be per app"))
    for key, stream in doc.streams.items():
        path = f"streams.{key}"
        segments = key.split("/")
        placeholders = set()
        if len(segments) < 2 or segments[0] not in ("tbox", "avn"):
            problems.append((path, "stream topics start with 'tbox/' or 'avn/' and name a stream"))
        for seg in segments[1:]:
            m = _PLACEHOLDER.match(seg)
            if m:
                placeholders.add(m.group(1))
            elif not _NAME.match(seg):
                problems.append(
                    (path, f"topic segment {seg!r} must be lower_snake_case or {{placeholder}}")
                )
        if len(placeholders) > 1:
            problems.append((path, "at most one {placeholder} per stream topic"))
        base_feature, per_app = _feature_ref(stream.feature, placeholders)
        feat: FeatureSpec | None = doc.features.get(base_feature)
        if feat is None:
            problems.append((f"{path}.feature", f"unknown feature {stream.feature!r}"))
        elif feat.per_app and per_app is None:
            problems.append(
                (
                    f"{path}.feature",
                    f"feature {base_feature!r} is per app: use '{base_feature}.{{placeholder}}'",
                )
            )
        elif per_app is not None and not feat.per_app:
            problems.append(
                (f"{path}.feature", f"feature {base_feature!r} is not declared per_app")
            )
        if placeholders and per_app is None and feat is not None:
            problems.append(
                (f"{path}.feature", "a stream with a {placeholder} needs a per-app feature")
            )
        desc = _message_descriptor(stream.message)
        if desc is None:
            known = ", ".join(sorted(streams_pb2.DESCRIPTOR.message_types_by_name))
            problems.append(
                (f"{path}.message", f"unknown message {stream.message!r} (known: {known})")
            )
            continue
        nested = _nested_geopoints(desc)
        if nested:
            # Location rules act on top-level GeoPoint fields; one buried in a
            # sub-message would leave untouched, so refuse rather than leak.
            problems.append(
                (
                    f"{path}.message",
                    f"{stream.message} nests GeoPoints the gateway cannot reach: {nested}",
                )
            )
        header = desc.fields_by_name.get("header")
        if (
            header is None
            or header.message_type is None
            or header.message_type.full_name != HEADER_TYPE
        ):
            problems.append(
                (f"{path}.message", f"{stream.message} has no 'header' field of type Header")
            )
        legal = feat is not None and feat.legal_basis == "legal_obligation"
        if legal and any(a != "keep" for a in stream.fields.values()):
            problems.append((f"{path}.fields", "legal-obligation streams are forwarded untouched"))
        if legal and (stream.pseudonymize_vin or stream.requires_window):
            problems.append(
                (path, "legal-obligation streams are forwarded untouched and unconditionally")
            )
        problems += check_fields(desc, stream.fields, f"{path}.fields", legal=legal)
    for name, message in doc.messages.items():
        path = f"messages.{name}"
        if not _NAME.match(name):
            problems.append((path, "message categories are lower_snake_case"))
        msg_feat = doc.features.get(message.feature)
        if msg_feat is None:
            problems.append((f"{path}.feature", f"unknown feature {message.feature!r}"))
        elif msg_feat.per_app or msg_feat.legal_basis == "legal_obligation":
            problems.append(
                (f"{path}.feature", "message categories need a per-car, non-legal feature")
            )
    for name, cmd in doc.commands.items():
        path = f"commands.{name}"
        if not _NAME.match(name):
            problems.append((path, "command names are lower_snake_case"))
        cmd_feat = doc.features.get(cmd.feature)
        if cmd_feat is None:
            problems.append((f"{path}.feature", f"unknown feature {cmd.feature!r}"))
        elif cmd_feat.per_app:
            problems.append((f"{path}.feature", "commands cannot depend on a per-app feature"))
    if any(s.requires_window for s in doc.streams.values()) and not any(
        c.opens_window for c in doc.commands.values()
    ):
        problems.append(
            ("commands", "a stream requires a find-my-car window but no command opens one")
        )
    return problems


def check_fields(
    desc: Descriptor, fields: Mapping[str, FieldAction], path: str, *, legal: bool = False
) -> list[tuple[str, str]]:
    """The field rules of one stream against its message (contract rule 14).

    Every field must be classified, nested ones included: a sub-message other
    than a GeoPoint (which is handled as a whole) is either removed as a whole
    or has each of its fields listed by dotted path (`outer.inner: keep`). A
    field nobody considered is refused, so a new field of a newer schema can
    never reach the backend by omission. `header` is the gateway's.
    """
    problems: list[tuple[str, str]] = []
    for field_name, action in fields.items():
        fpath = f"{path}.{field_name}"
        fd, parent_repeated = _resolve(desc, field_name)
        if fd is None:
            names = ", ".join(f.name for f in desc.fields)
            problems.append((fpath, f"{desc.name} has no field {field_name!r} (fields: {names})"))
            continue
        if field_name == "header" or field_name.startswith("header."):
            problems.append((fpath, "the header is managed by the gateway"))
            continue
        name = action_name(action)
        nested = "." in field_name
        if nested and name != "keep":
            problems.append(
                (fpath, f"fields of sub-messages take 'keep' (or remove the whole), not '{name}'")
            )
            continue
        is_geo = fd.message_type is not None and fd.message_type.full_name == GEOPOINT_TYPE
        is_sub = fd.message_type is not None and not is_geo
        if is_sub and name != "remove" and not (name == "keep" and _is_map(fd)):
            problems.append(
                (
                    fpath,
                    f"a sub-message is removed as a whole or its fields are classified one by"
                    f" one ('{field_name}.<field>: keep'), not '{name}'",
                )
            )
        if name in GEO_ACTIONS and not is_geo:
            problems.append(
                (fpath, f"'{name}' applies to GeoPoint fields; {field_name} is not one")
            )
        if (
            is_geo
            and name not in GEO_ACTIONS
            and name != "remove"
            and not (legal and name == "keep")
        ):
            problems.append(
                (
                    fpath,
                    "GeoPoint fields take 'position', 'place', 'destination' or 'remove',"
                    f" not '{name}'",
                )
            )
        repeated = _is_repeated(fd) or parent_repeated
        if (name in STRING_ACTIONS or name == "enum") and (
            fd.type != FieldDescriptor.TYPE_STRING or repeated
        ):
            problems.append((fpath, f"'{name}' applies to single string fields"))
        if name in ("odometer", "generalize") and (fd.type not in _NUMERIC_TYPES or repeated):
            problems.append((fpath, f"'{name}' applies to single numeric fields"))
        if (
            isinstance(action, GeneralizeAction)
            and fd.type not in _FLOAT_TYPES
            and action.generalize != int(action.generalize)
        ):
            problems.append((fpath, f"{field_name} is an integer: its step must be whole"))
        if name == "position" and _is_repeated(fd):
            problems.append((fpath, "'position' is a single current position; use 'place'"))
    for missing in unclassified_fields(desc, fields):
        problems.append(
            (
                f"{path}.{missing}",
                "not classified: give every field an action ('keep' when it was considered"
                " and may pass as is)",
            )
        )
    return problems


def unclassified_fields(
    desc: Descriptor, fields: Mapping[str, object], prefix: str = ""
) -> list[str]:
    """Dotted paths of the fields of `desc` no rule classifies (header excepted)."""
    missing: list[str] = []
    for fd in desc.fields:
        path = prefix + fd.name
        if path == "header" or path in fields:
            continue
        sub = fd.message_type
        if (
            sub is not None
            and sub.full_name != GEOPOINT_TYPE
            and not _is_map(fd)
            and path.count(".") < 8
            and any(key.startswith(path + ".") for key in fields)
        ):
            missing += unclassified_fields(sub, fields, path + ".")
            continue
        missing.append(path)
    return missing


def _resolve(desc: Descriptor, dotted: str) -> tuple[FieldDescriptor | None, bool]:
    """The field a dotted path names, and whether a message on the way is repeated."""
    fd: FieldDescriptor | None = None
    repeated = False
    current: Descriptor | None = desc
    for part in dotted.split("."):
        if current is None:
            return None, repeated
        if fd is not None:
            repeated = repeated or _is_repeated(fd)
        fd = current.fields_by_name.get(part)
        if fd is None:
            return None, repeated
        current = fd.message_type
    return fd, repeated


def _is_map(fd: FieldDescriptor) -> bool:
    sub = fd.message_type
    return sub is not None and bool(sub.GetOptions().map_entry)


def _nested_geopoints(desc: Descriptor, prefix: str = "", depth: int = 0) -> list[str]:
    """GeoPoint fields below the top level of `desc` (dotted paths)."""
    found: list[str] = []
    for fd in desc.fields:
        sub = fd.message_type
        if sub is None or sub.full_name in (GEOPOINT_TYPE, HEADER_TYPE) or depth > 8:
            continue
        for inner in sub.fields:
            if inner.message_type is not None and inner.message_type.full_name == GEOPOINT_TYPE:
                found.append(f"{prefix}{fd.name}.{inner.name}")
        found += _nested_geopoints(sub, f"{prefix}{fd.name}.", depth + 1)
    return found


def _is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def compile_policy(doc: PolicyDocument, *, digest: str = "") -> CompiledPolicy:
    exact: dict[str, CompiledStream] = {}
    templates: list[_TemplateRoute] = []
    for key, spec in doc.streams.items():
        segments = key.split("/")
        placeholders = {m.group(1) for s in segments if (m := _PLACEHOLDER.match(s))}
        base_feature, per_app = _feature_ref(spec.feature, placeholders)
        feat = doc.features[base_feature]
        desc = _message_descriptor(spec.message)
        assert desc is not None  # checked
        message_cls = getattr(streams_pb2, spec.message)
        geo: list[GeoField] = []
        removes = [n for n, a in spec.fields.items() if a == "remove"]
        legal = feat.legal_basis == "legal_obligation"
        for fd in desc.fields:
            if fd.message_type is None or fd.message_type.full_name != GEOPOINT_TYPE:
                continue
            # An undeclared GeoPoint (only in a compiled document that skipped
            # validation) is a place: anchored, never fresher than the anchor.
            action = action_name(spec.fields.get(fd.name, "place"))
            if action == "remove":
                continue
            role = action if action in GEO_ACTIONS else "place"
            geo.append(GeoField(fd.name, _is_repeated(fd), role))

        def named(action: str, spec: StreamSpec = spec) -> tuple[str, ...]:
            return tuple(n for n, a in spec.fields.items() if a == action)

        generalize = tuple(
            (n, a.generalize) for n, a in spec.fields.items() if isinstance(a, GeneralizeAction)
        )
        enums = tuple(
            (n, frozenset(a.enum)) for n, a in spec.fields.items() if isinstance(a, EnumAction)
        )

        recipients = declared_recipients(doc)
        routes = tuple(
            CompiledRoute(
                recipient=rid,
                prefix=recipients[rid].egress_prefix,
                pseudonymize_vin=spec.pseudonymize_vin or route.pseudonymize_vin,
                remove_fields=tuple(n for n in route.remove if n not in removes),
                # Never shared between recipients, whatever their order; the
                # implicit recipient keeps the pseudonyms of earlier releases.
                scope_suffix="" if rid == IMPLICIT_RECIPIENT_ID else f"|{rid}",
                properties=(
                    ("recipient", rid),
                    ("transfer-basis", recipients[rid].transfer_basis),
                ),
            )
            for rid, route in stream_routes(doc, spec).items()
        )
        stream = CompiledStream(
            key=key,
            unit=segments[0],
            message_name=spec.message,
            message_cls=message_cls,
            feature=base_feature,
            per_app_placeholder=per_app,
            legal_basis=feat.legal_basis,
            legal_obligation=legal,
            retention_days=spec.retention_days,
            location_purpose=spec.location_purpose,
            requires_window=spec.requires_window,
            pseudonymize_vin=spec.pseudonymize_vin,
            geo_fields=() if legal else tuple(geo),
            place_id_fields=named("place_id"),
            pseudonymize_fields=named("pseudonymize"),
            truncate_ip_fields=named("truncate_ip"),
            remove_fields=tuple(removes),
            keep_fields=named("keep"),
            max_payload_bytes=spec.max_payload_bytes or doc.max_payload_bytes,
            odometer_fields=() if legal else named("odometer"),
            generalize_fields=() if legal else generalize,
            enum_fields=() if legal else enums,
            place_text_fields=() if legal else named("place_text"),
            routes=routes,
            plain_route=(
                routes[0]
                if len(routes) == 1
                and not routes[0].remove_fields
                and not routes[0].pseudonymize_vin
                else None
            ),
        )
        if placeholders:
            parts = tuple(None if _PLACEHOLDER.match(s) else s for s in segments)
            index = parts.index(None)
            templates.append(_TemplateRoute(parts, index, stream))
        else:
            exact[key] = stream
    return CompiledPolicy(
        version=doc.version,
        digest=digest,
        cell_size_m=doc.location.cell_size_m,
        refresh_interval_ms=int(doc.location.refresh_interval_s * 1000),
        window_s=doc.find_my_car.window_s,
        fixes_per_command=doc.find_my_car.fixes_per_command,
        max_commands_per_hour=doc.find_my_car.max_commands_per_hour,
        features=dict(doc.features),
        per_app_features=frozenset(n for n, f in doc.features.items() if f.per_app),
        default_on=frozenset(
            n for n, f in doc.features.items() if f.default and f.legal_basis != "consent"
        ),
        legal_obligation_features=frozenset(
            n for n, f in doc.features.items() if f.legal_basis == "legal_obligation"
        ),
        exact_routes=exact,
        template_routes=tuple(templates),
        commands={
            n: CompiledCommand(n, c.feature, c.opens_window) for n, c in doc.commands.items()
        },
        messages={n: CompiledCommand(n, m.feature, False) for n, m in doc.messages.items()},
        document=doc,
    )


def summary_rows(policy: CompiledPolicy) -> list[dict[str, Any]]:
    """One row per stream for `check-policy`: what each privacy state does to it."""
    rows = []
    streams = list(policy.exact_routes.values()) + [r.stream for r in policy.template_routes]
    for s in streams:
        feature = s.feature + (f".{{{s.per_app_placeholder}}}" if s.per_app_placeholder else "")
        rows.append(
            {
                "stream": s.key,
                "message": s.message_name,
                "feature": feature,
                "legal_basis": s.legal_basis,
                "retention_days": s.retention_days,
                "unknown_or_privacy_mode": "forward untouched" if s.legal_obligation else "drop",
                "feature_off": "forward untouched" if s.legal_obligation else "drop",
                "location_off": _describe(s, "off"),
                "approximate": _describe(s, "approximate"),
                "precise": _describe(s, "precise"),
            }
        )
    return rows


def _describe(s: CompiledStream, mode: str) -> str:
    if s.legal_obligation:
        return "forward untouched"
    if mode == "off" and s.location_purpose:
        return "drop (location is its purpose)"
    steps: list[str] = []
    if s.requires_window:
        steps.append("only in find-my-car window")
    geo = ", ".join(g.name for g in s.geo_fields)
    if geo and mode == "off":
        steps.append(f"clear {geo}")
    elif geo and mode == "approximate":
        anchored = [g.name for g in s.geo_fields if g.role != "destination"]
        free = [g.name for g in s.geo_fields if g.role == "destination"]
        if anchored:
            steps.append("coarsen " + ", ".join(anchored) + " (refresh-limited anchor)")
        if free:
            steps.append("coarsen " + ", ".join(free))
    if s.place_id_fields and mode != "precise":
        steps.append("clear " + ", ".join(s.place_id_fields))
    if s.place_text_fields and mode != "precise":
        steps.append("clear " + ", ".join(s.place_text_fields))
    if s.odometer_fields and mode == "off":
        steps.append("clear " + ", ".join(s.odometer_fields))
    elif s.odometer_fields and mode == "approximate":
        steps.append("freeze " + ", ".join(s.odometer_fields) + " at the anchor")
    if s.generalize_fields and mode == "off":
        steps.append("clear " + ", ".join(n for n, _ in s.generalize_fields))
    elif s.generalize_fields and mode == "approximate":
        steps.append("round " + ", ".join(f"{n} to {step:g}" for n, step in s.generalize_fields))
    if s.enum_fields:
        steps.append("only listed values of " + ", ".join(n for n, _ in s.enum_fields))
    if s.pseudonymize_fields:
        steps.append("hmac " + ", ".join(s.pseudonymize_fields))
    if s.truncate_ip_fields:
        steps.append("truncate " + ", ".join(s.truncate_ip_fields))
    if s.remove_fields:
        steps.append("remove " + ", ".join(s.remove_fields))
    if s.pseudonymize_vin:
        steps.append("pseudonymize VIN, header seq and time")
        by_name = s.message_cls.DESCRIPTOR.fields_by_name
        opaque = [
            name
            for name in s.keep_fields
            if name in by_name and by_name[name].type == by_name[name].TYPE_BYTES
        ]
        if opaque:
            # Kept opaque bytes are searched for the VIN, but encryption defeats that.
            steps.append("keep " + ", ".join(opaque) + " (VIN search: best effort)")
    return "; ".join(steps) or "forward"


# How much a field action lets through, least first (for "did a new policy
# version widen what a consent covers").
_ACTION_RANK = {
    "remove": 0,
    "enum": 1,
    "generalize": 2,
    "pseudonymize": 2,
    "truncate_ip": 2,
    "odometer": 2,
    "place_id": 3,
    "place_text": 3,
    "position": 3,
    "place": 3,
    "destination": 3,
    "keep": 4,
}


def widened_streams(current: CompiledPolicy, older: CompiledPolicy) -> frozenset[str]:
    """Stream keys of consent-based features that `current` lets more through
    than `older` did: a stream new under its feature, a field whose action is
    more permissive (a finer generalize step included), pseudonymization of
    the VIN dropped. A consent given under `older` does not cover them."""
    widened = set()
    for key, spec in current.document.streams.items():
        feature = current.document.features.get(spec.feature.partition(".")[0])
        if feature is None or feature.legal_basis != "consent":
            continue
        before = older.document.streams.get(key)
        if before is None or before.feature != spec.feature:
            widened.add(key)
            continue
        if before.pseudonymize_vin and not spec.pseudonymize_vin:
            widened.add(key)
            continue
        if _routes_widened(current.document, spec, older.document, before):
            widened.add(key)
            continue
        for name, action in spec.fields.items():
            old = before.fields.get(name, "remove")
            new_rank = _ACTION_RANK.get(action_name(action), 4)
            old_rank = _ACTION_RANK.get(action_name(old), 4)
            finer = (
                isinstance(action, GeneralizeAction)
                and isinstance(old, GeneralizeAction)
                and action.generalize < old.generalize
            )
            if new_rank > old_rank or finer:
                widened.add(key)
                break
    return frozenset(widened)


def _routes_widened(
    doc: PolicyDocument, spec: StreamSpec, older: PolicyDocument, before: StreamSpec
) -> bool:
    """A recipient the stream did not reach under `older`, one that now gets a
    field it did not, or its VIN where it got a pseudonym."""
    old_routes = stream_routes(older, before)
    old_recipients = declared_recipients(older)
    new_recipients = declared_recipients(doc)
    for rid, route in stream_routes(doc, spec).items():
        was = old_routes.get(rid)
        if was is None:
            return True
        if old_recipients.get(rid) != new_recipients.get(rid):
            return True  # the same id now names another entity, place, role or prefix
        if set(was.remove) - set(route.remove):
            return True
        if was.pseudonymize_vin and not route.pseudonymize_vin and not spec.pseudonymize_vin:
            return True
    return False
