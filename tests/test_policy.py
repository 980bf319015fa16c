"""Policy loading, validation (errors name file, path and problem) and compilation."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor

from gateway.core import (
    DecisionContext,
    Drop,
    Forward,
    LocationMode,
    SettingsSnapshot,
    decide,
    state_from_snapshot,
)
from gateway.core.transforms import coarsen_position, grid_offset
from gateway.policy import (
    CompiledPolicy,
    PolicyDocument,
    PolicyError,
    StreamSpec,
    check_fields,
    compile_policy,
    load_policy,
    parse_policy,
    summary_rows,
    unclassified_fields,
    widened_streams,
)
from telematics.v1 import common_pb2, streams_pb2

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "config" / "policy.yaml"
VIN = "WVWZZZ1JZXW000001"
KEY = b"\x07" * 32

Doc = dict[str, Any]


def default_doc() -> Doc:
    return copy.deepcopy(yaml.safe_load(DEFAULT.read_text()))


def write(tmp_path: Path, doc: Doc | str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


# -------------------------------------------------------------- default policy


def test_default_policy_loads() -> None:
    policy = load_policy(DEFAULT)
    assert policy.version == "2026.12.1"
    assert policy.digest == hashlib.sha256(DEFAULT.read_bytes()).hexdigest()
    assert policy.cell_size_m == 2000.0
    assert policy.refresh_interval_ms == 900_000
    assert policy.window_s == 120.0
    assert set(policy.exact_routes) == {
        "tbox/status",
        "tbox/alarm",
        "tbox/location",
        "tbox/battery",
        "tbox/trip",
        "tbox/digital_key",
        "tbox/connectivity",
        "tbox/ecall",
        "avn/nav",
        "avn/search",
        "avn/voice",
    }
    assert [r.stream.key for r in policy.template_routes] == ["avn/app/{app_id}"]
    assert set(policy.commands) == {"find_my_car", "lock", "unlock", "climate", "horn_lights"}
    assert policy.commands["find_my_car"].opens_window
    assert not any(c.opens_window for n, c in policy.commands.items() if n != "find_my_car")
    assert policy.legal_obligation_features == {"ecall"}
    assert policy.per_app_features == {"third_party"}
    # Privacy by default: nothing that sends the car's data is on for a snapshot
    # that does not mention it; only the message centre (backend -> car, the
    # service and, under legitimate interest with an objection, its adverts).
    assert policy.default_on == {"message_centre", "service_adverts"}
    assert not any(policy.route(s.key) and s.feature in policy.default_on for s in policy.streams)
    assert {m.feature for m in policy.messages.values()} == policy.default_on


def test_default_policy_compiled_fields() -> None:
    policy = load_policy(DEFAULT)
    status = policy.exact_routes["tbox/status"]
    assert [(g.name, g.is_position) for g in status.geo_fields] == [("position", True)]
    trip = policy.exact_routes["tbox/trip"]
    # Energy statistics carry no location (the notice lists none for them).
    assert trip.geo_fields == () and {"start", "end"} <= set(trip.remove_fields)
    assert trip.odometer_fields == ("odometer_km",)
    assert dict(trip.generalize_fields) == {
        "distance_km": 5,
        "energy_kwh": 1,
        "average_speed_kmh": 10,
        "duration_s": 600,
    }
    nav = policy.exact_routes["avn/nav"]
    assert [(g.name, g.role) for g in nav.geo_fields] == [
        ("position", "position"),
        ("destination", "destination"),
    ]
    assert policy.exact_routes["avn/search"].place_text_fields == ("text",)
    ((name, allowed),) = policy.exact_routes["tbox/alarm"].enum_fields
    assert name == "detail" and "engine started" in allowed
    ecall = policy.exact_routes["tbox/ecall"]
    assert ecall.legal_obligation and ecall.geo_fields == ()
    conn = policy.exact_routes["tbox/connectivity"]
    assert conn.remove_fields == ("iccid", "imsi") and conn.truncate_ip_fields == ("ip_address",)
    assert policy.exact_routes["tbox/battery"].place_id_fields == ("evse_id",)
    app = policy.template_routes[0].stream
    assert app.pseudonymize_vin and app.per_app_placeholder == "app_id"


def test_routing() -> None:
    policy = load_policy(DEFAULT)
    route = policy.route("avn/app/music")
    assert route is not None and route[0].key == "avn/app/{app_id}" and route[1] == "music"
    status = policy.route("tbox/status")
    assert status is not None and status[1] is None
    for topic in ("avn/app", "avn/app/a/b", "avn/app/a.b", "tbox/nope", "avn/privacy"):
        assert policy.route(topic) is None
    assert policy.feature_is_known("third_party.music")
    assert policy.feature_is_known("remote_control")
    assert not policy.feature_is_known("remote_control.x")
    assert not policy.feature_is_known("third_party.")
    assert not policy.feature_is_known("telepathy")


def test_summary_rows_describe_decisions() -> None:
    rows = {r["stream"]: r for r in summary_rows(load_policy(DEFAULT))}
    assert len(rows) == 12
    assert rows["tbox/ecall"]["unknown_or_privacy_mode"] == "forward untouched"
    assert rows["tbox/status"]["unknown_or_privacy_mode"] == "drop"
    assert rows["avn/nav"]["location_off"].startswith("drop")
    assert "coarsen position" in rows["tbox/status"]["approximate"]
    assert rows["avn/app/{app_id}"]["feature"] == "third_party.{app_id}"


# ---------------------------------------------------------------- broken ones

Mutation = Callable[[Doc], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split("|")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


BROKEN: list[tuple[str, Mutation, str, str]] = [
    ("unknown top-level key", _set("retention", 5), "retention", "Extra inputs are not permitted"),
    (
        "consent feature on by default",
        _set("features|online_search|default", True),
        "features.online_search.default",
        "privacy by default",
    ),
    ("cell too small", _set("location|cell_size_m", 199), "location.cell_size_m", "at least 200"),
    (
        "unknown message type",
        _set("streams|tbox/status|message", "VehicleStatusV2"),
        "streams.tbox/status.message",
        "unknown message 'VehicleStatusV2'",
    ),
    (
        "unknown field",
        _set("streams|tbox/status|fields|gps", "position"),
        "streams.tbox/status.fields.gps",
        "VehicleStatus has no field 'gps'",
    ),
    (
        "position on a non-GeoPoint",
        _set("streams|tbox/status|fields|odometer_km", "position"),
        "streams.tbox/status.fields.odometer_km",
        "'position' applies to GeoPoint fields",
    ),
    (
        "place on a string",
        _set("streams|avn/search|fields|text", "place"),
        "streams.avn/search.fields.text",
        "'place' applies to GeoPoint fields",
    ),
    (
        "GeoPoint kept",
        _set("streams|tbox/status|fields|position", "keep"),
        "streams.tbox/status.fields.position",
        "GeoPoint fields take 'position', 'place', 'destination' or 'remove'",
    ),
    (
        "truncate_ip on an int",
        _set("streams|tbox/connectivity|fields|signal_dbm", "truncate_ip"),
        "streams.tbox/connectivity.fields.signal_dbm",
        "'truncate_ip' applies to single string fields",
    ),
    (
        "pseudonymize on bytes",
        _set("streams|avn/voice|fields|audio", "pseudonymize"),
        "streams.avn/voice.fields.audio",
        "'pseudonymize' applies to single string fields",
    ),
    (
        "header action",
        _set("streams|tbox/status|fields|header", "remove"),
        "streams.tbox/status.fields.header",
        "the header is managed by the gateway",
    ),
    (
        "unknown field action",
        _set("streams|tbox/status|fields|position", "blur"),
        "streams.tbox/status.fields.position",
        "Input should be",
    ),
    (
        "stream with unknown feature",
        _set("streams|tbox/status|feature", "teleport"),
        "streams.tbox/status.feature",
        "unknown feature 'teleport'",
    ),
    (
        "per-app feature without placeholder",
        _set(
            "streams|avn/radio",
            {"message": "AppTraffic", "feature": "third_party", "retention_days": 1},
        ),
        "streams.avn/radio.feature",
        "feature 'third_party' is per app",
    ),
    (
        "placeholder stream with a plain feature",
        _set("streams|avn/app/{app_id}|feature", "online_search"),
        "streams.avn/app/{app_id}.feature",
        "needs a per-app feature",
    ),
    (
        "legal obligation with transforms",
        _set("streams|tbox/ecall|fields", {"position": "place"}),
        "streams.tbox/ecall.fields",
        "legal-obligation streams are forwarded untouched",
    ),
    (
        "legal obligation behind a window",
        _set("streams|tbox/ecall|requires_window", True),
        "streams.tbox/ecall",
        "forwarded untouched and unconditionally",
    ),
    (
        "command with unknown feature",
        _set("commands|lock|feature", "nope"),
        "commands.lock.feature",
        "unknown feature 'nope'",
    ),
    (
        "command on a per-app feature",
        _set("commands|play", {"feature": "third_party"}),
        "commands.play.feature",
        "commands cannot depend on a per-app feature",
    ),
    (
        "window stream without a window command",
        _set("commands|find_my_car|opens_window", False),
        "commands",
        "no command opens one",
    ),
    (
        "stream outside tbox/avn",
        _set(
            "streams|gps/raw",
            {"message": "Location", "feature": "find_my_car", "retention_days": 1},
        ),
        "streams.gps/raw",
        "start with 'tbox/' or 'avn/'",
    ),
    (
        "negative retention",
        _set("streams|tbox/status|retention_days", -1),
        "streams.tbox/status.retention_days",
        "greater than or equal to 0",
    ),
    (
        "bad legal basis",
        _set("features|charging|legal_basis", "because"),
        "features.charging.legal_basis",
        "Input should be",
    ),
    (
        "legal obligation per app",
        _set("features|ecall|per_app", True),
        "features.ecall.per_app",
        "a legal obligation cannot be per app",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "where", "problem"),
    [pytest.param(m, w, p, id=name) for name, m, w, p in BROKEN],
)
def test_broken_policy_names_file_path_and_problem(
    tmp_path: Path, mutate: Mutation, where: str, problem: str
) -> None:
    doc = default_doc()
    mutate(doc)
    path = write(tmp_path, doc)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert f"{path}: {where}: " in message
    assert problem in message
    assert info.value.source == str(path)
    assert any(p == where and problem in m for p, m in info.value.problems)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    lines = DEFAULT.read_text().splitlines()
    index = lines.index("streams:")
    lines.insert(index + 1, "  tbox/broken: {message: [unclosed")
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message and "not valid YAML" in message
    ((where, _),) = info.value.problems
    line = int(where.split(",")[0].removeprefix("line "))
    assert index + 2 <= line <= index + 3  # the broken line or the one after


def test_tab_indentation_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "version: x\nfeatures: {}\n\tstreams: {}\n")
    with pytest.raises(PolicyError, match=r"line 3, column 1: not valid YAML"):
        load_policy(path)


@pytest.mark.parametrize("text", ["", "- a list\n", "just a string\n"])
def test_non_mapping_document(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError, match="must be a YAML mapping") as info:
        load_policy(path)
    assert str(path) in str(info.value)


def test_missing_required_key(tmp_path: Path) -> None:
    doc = default_doc()
    del doc["streams"]
    path = write(tmp_path, doc)
    with pytest.raises(PolicyError, match=r": streams: Field required"):
        load_policy(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert f"{path}: <root>: cannot read file" in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    doc = default_doc()
    doc["location"]["cell_size_m"] = 50
    doc["streams"]["tbox/status"]["feature"] = "teleport"
    doc["commands"]["lock"]["feature"] = "nope"
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, doc))
    paths = {p for p, _ in info.value.problems}
    assert {"location.cell_size_m", "streams.tbox/status.feature", "commands.lock.feature"} <= paths


def test_minimum_cell_size_is_accepted(tmp_path: Path) -> None:
    doc = default_doc()
    doc["location"]["cell_size_m"] = 200
    assert load_policy(write(tmp_path, doc)).cell_size_m == 200.0


# ------------------------------------- undeclared GeoPoints are never leaked


def _compiled_without_status_fields() -> CompiledPolicy:
    """Compiled without the validation that refuses it: the last line of
    defence for an undeclared GeoPoint (compile_policy called directly)."""
    doc = default_doc()
    del doc["streams"]["tbox/status"]["fields"]
    return compile_policy(PolicyDocument.model_validate(doc))


def test_undeclared_fields_refuse_the_policy() -> None:
    doc = default_doc()
    del doc["streams"]["tbox/status"]["fields"]
    with pytest.raises(PolicyError) as info:
        parse_policy(yaml.safe_dump(doc), source="test")
    paths = {path for path, _ in info.value.problems}
    assert "streams.tbox/status.fields.position" in paths
    assert "streams.tbox/status.fields.odometer_km" in paths
    assert "streams.tbox/status.fields.header" not in paths


def _status_decision(policy: CompiledPolicy, mode: LocationMode) -> Forward | Drop:
    snapshot = SettingsSnapshot(VIN, 1, False, mode, {"remote_control": True}, 0.0, "t")
    state = state_from_snapshot(policy, snapshot)
    msg = streams_pb2.VehicleStatus(fuel_level_pct=40.0)
    msg.header.vin = VIN
    msg.header.timestamp_ms = 1_000
    msg.position.CopyFrom(common_pb2.GeoPoint(latitude=52.52, longitude=13.405, altitude_m=34))
    d = decide(
        DecisionContext(policy, KEY),
        f"vehicle/{VIN}/tbox/status",
        msg.SerializeToString(),
        {VIN: state},
        {},
        1.0,
    )
    assert isinstance(d, Forward | Drop)
    return d


def test_undeclared_geopoint_is_treated_as_place() -> None:
    policy = _compiled_without_status_fields()
    status = policy.exact_routes["tbox/status"]
    assert [(g.name, g.is_position) for g in status.geo_fields] == [("position", False)]


def test_undeclared_geopoint_cleared_when_location_off() -> None:
    d = _status_decision(_compiled_without_status_fields(), LocationMode.OFF)
    assert isinstance(d, Forward)
    out = streams_pb2.VehicleStatus.FromString(d.payload)
    assert not out.HasField("position")
    assert out.fuel_level_pct == 40.0


def test_undeclared_geopoint_coarsened_when_approximate() -> None:
    d = _status_decision(_compiled_without_status_fields(), LocationMode.APPROXIMATE)
    assert isinstance(d, Forward)
    point = streams_pb2.VehicleStatus.FromString(d.payload).position
    expected = coarsen_position(52.52, 13.405, 2000.0, grid_offset(KEY, VIN))
    assert (point.latitude, point.longitude) == expected
    assert point.altitude_m == 0 and point.horizontal_accuracy_m == 2000.0
    # A place where the car was, with no anchor yet: the value it anchors.
    assert d.anchor is not None and (d.anchor.latitude, d.anchor.longitude) == expected


@pytest.mark.parametrize("mode", [LocationMode.OFF, LocationMode.APPROXIMATE, LocationMode.PRECISE])
def test_removed_geopoint_is_gone_in_every_mode(mode: LocationMode) -> None:
    doc = default_doc()
    doc["streams"]["tbox/status"]["fields"]["position"] = "remove"
    policy = parse_policy(yaml.safe_dump(doc), source="test")
    d = _status_decision(policy, mode)
    assert isinstance(d, Forward)
    assert not streams_pb2.VehicleStatus.FromString(d.payload).HasField("position")
    assert d.transforms == ("remove:position",)


def test_non_consent_default_on_feature(tmp_path: Path) -> None:
    doc = default_doc()
    doc["features"]["remote_control"]["default"] = True
    policy = load_policy(write(tmp_path, doc))
    assert policy.default_on == {"remote_control", "message_centre", "service_adverts"}
    snapshot = SettingsSnapshot(VIN, 1, False, LocationMode.OFF, {}, 0.0, "t")
    assert state_from_snapshot(policy, snapshot).enabled == policy.default_on
    # An explicit "off" in the snapshot wins over the default.
    snapshot = SettingsSnapshot(
        VIN, 1, False, LocationMode.OFF, {"remote_control": False}, 0.0, "t"
    )
    assert state_from_snapshot(policy, snapshot).enabled == {"message_centre", "service_adverts"}
    assert isinstance(_status_decision(policy, LocationMode.OFF), Forward)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(DEFAULT.read_bytes().replace(b"Emergency call", b"Notruf \xfc"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert f"{path}: <root>: not UTF-8" in str(info.value)


def test_nested_geopoints_are_detected_so_validation_can_refuse_them() -> None:
    """A GeoPoint inside a sub-message would escape the location rules: the
    policy check reports it (the default streams have none)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    from gateway.policy import _nested_geopoints
    from telematics.v1 import common_pb2, streams_pb2

    pool = descriptor_pool.DescriptorPool()
    common = descriptor_pb2.FileDescriptorProto()
    common_pb2.DESCRIPTOR.CopyToProto(common)
    pool.Add(common)
    file = descriptor_pb2.FileDescriptorProto(
        name="nested_test.proto", package="t", dependency=["telematics/v1/common.proto"]
    )
    wrap = file.message_type.add(name="Wrap")
    wrap.field.add(name="where", number=1, type=11, type_name=".telematics.v1.GeoPoint", label=1)
    outer = file.message_type.add(name="Outer")
    outer.field.add(name="wrap", number=1, type=11, type_name=".t.Wrap", label=1)
    pool.Add(file)
    assert _nested_geopoints(pool.FindMessageTypeByName("t.Outer")) == ["wrap.where"]
    for name in streams_pb2.DESCRIPTOR.message_types_by_name:
        assert _nested_geopoints(streams_pb2.DESCRIPTOR.message_types_by_name[name]) == []


def test_duplicate_keys_are_refused_with_their_line(tmp_path: Path) -> None:
    text = DEFAULT.read_text()
    duplicated = text.replace(
        "  tbox/alarm:",
        "  tbox/status:\n    message: VehicleStatus\n    feature: remote_control\n"
        "    retention_days: 1\n  tbox/alarm:",
        1,
    )
    path = tmp_path / "dup.yaml"
    path.write_text(duplicated)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert str(path) in message and "duplicate key 'tbox/status'" in message and "line" in message


# ------------------------------------------------ rule 14: every field classified


def _nested_descriptor() -> Descriptor:
    """A message nesting a sub-message (the default streams do not): Outer {
    Header header; GeoPoint where; Inner inner; string note } with Inner {
    string city; int32 code; Deeper deeper } and Deeper { string street }."""
    pool = descriptor_pool.DescriptorPool()
    common = descriptor_pb2.FileDescriptorProto()
    common_pb2.DESCRIPTOR.CopyToProto(common)
    pool.Add(common)
    f = descriptor_pb2.FileDescriptorProto(
        name="test/nested.proto", package="test", dependency=[common.name], syntax="proto3"
    )
    t = descriptor_pb2.FieldDescriptorProto
    deeper = f.message_type.add(name="Deeper")
    deeper.field.add(name="street", number=1, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    inner = f.message_type.add(name="Inner")
    inner.field.add(name="city", number=1, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    inner.field.add(name="code", number=2, type=t.TYPE_INT32, label=t.LABEL_OPTIONAL)
    inner.field.add(
        name="deeper",
        number=3,
        type=t.TYPE_MESSAGE,
        label=t.LABEL_REPEATED,
        type_name=".test.Deeper",
    )
    outer = f.message_type.add(name="Outer")
    outer.field.add(
        name="header",
        number=1,
        type=t.TYPE_MESSAGE,
        label=t.LABEL_OPTIONAL,
        type_name=".telematics.v1.Header",
    )
    outer.field.add(
        name="where",
        number=2,
        type=t.TYPE_MESSAGE,
        label=t.LABEL_OPTIONAL,
        type_name=".telematics.v1.GeoPoint",
    )
    outer.field.add(
        name="inner", number=3, type=t.TYPE_MESSAGE, label=t.LABEL_OPTIONAL, type_name=".test.Inner"
    )
    outer.field.add(name="note", number=4, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    pool.Add(f)
    return pool.FindMessageTypeByName("test.Outer")


def _problems(fields: dict[str, Any]) -> dict[str, str]:
    spec = StreamSpec.model_validate(
        {"message": "Outer", "feature": "f", "retention_days": 1, "fields": fields}
    )
    return dict(check_fields(_nested_descriptor(), spec.fields, "fields"))


def test_unclassified_field_is_refused() -> None:
    problems = _problems({"where": "position", "inner": "remove"})
    assert list(problems) == ["fields.note"]
    assert "not classified" in problems["fields.note"]


def test_nested_unclassified_field_is_refused() -> None:
    problems = _problems(
        {"where": "position", "note": "keep", "inner.city": "keep", "inner.deeper.street": "keep"}
    )
    assert list(problems) == ["fields.inner.code"]
    # Every nested field listed: accepted.
    assert (
        _problems(
            {
                "where": "position",
                "note": "keep",
                "inner.city": "keep",
                "inner.code": "keep",
                "inner.deeper.street": "keep",
            }
        )
        == {}
    )


def test_sub_message_is_removed_whole_or_classified_field_by_field() -> None:
    problems = _problems({"where": "position", "note": "keep", "inner": "keep"})
    assert "removed as a whole" in problems["fields.inner"]
    problems = _problems(
        {
            "where": "position",
            "note": "keep",
            "inner.city": "place_text",
            "inner.code": "keep",
            "inner.deeper": "remove",
        }
    )
    assert "take 'keep'" in problems["fields.inner.city"]


def test_geopoint_is_classified_as_a_whole() -> None:
    problems = _problems({"where.latitude": "keep", "note": "keep", "inner": "remove"})
    assert "fields.where" in problems


def test_every_default_stream_classifies_every_field() -> None:
    for stream in load_policy(DEFAULT).streams:
        spec = load_policy(DEFAULT).document.streams[stream.key]
        assert unclassified_fields(stream.message_cls.DESCRIPTOR, spec.fields) == [], stream.key


@pytest.mark.parametrize(
    ("field", "action", "problem"),
    [
        ("tbox/trip|fields|trip_id", {"generalize": 5}, "single numeric fields"),
        ("tbox/trip|fields|duration_s", {"generalize": 0.5}, "step must be whole"),
        ("tbox/status|fields|odometer_km", "place_text", "single string fields"),
        ("tbox/alarm|fields|type", {"enum": ["x"]}, "single string fields"),
        ("avn/nav|fields|destination", "keep", "GeoPoint fields take"),
        ("avn/search|fields|text", "destination", "applies to GeoPoint fields"),
    ],
)
def test_side_field_actions_checked(field: str, action: Any, problem: str) -> None:
    doc = default_doc()
    stream, _, name = field.split("|")
    doc["streams"][stream]["fields"][name] = action
    with pytest.raises(PolicyError) as info:
        parse_policy(yaml.safe_dump(doc), source="test")
    assert any(problem in msg for _, msg in info.value.problems), info.value.problems


def test_widened_streams_are_what_a_consent_given_under_an_older_version_misses(
    tmp_path: Path,
) -> None:
    older = load_policy(DEFAULT)
    doc = default_doc()
    doc["streams"]["avn/search"]["fields"]["text"] = "keep"  # place_text -> keep: wider
    doc["streams"]["avn/nav"]["fields"]["route_id"] = "remove"  # narrower: covered
    doc["streams"]["tbox/status"]["fields"]["fuel_level_pct"] = "keep"  # contract: not judged
    wider = parse_policy(yaml.safe_dump(doc), source="test")
    assert widened_streams(wider, older) == {"avn/search"}
    # Back to the older version: search narrows again, the route id it hid widens.
    assert widened_streams(older, wider) == {"avn/nav"}
    del doc["streams"]["avn/voice"]
    without_voice = parse_policy(yaml.safe_dump(doc), source="test")
    assert "avn/voice" in widened_streams(older, without_voice)  # new under its feature
