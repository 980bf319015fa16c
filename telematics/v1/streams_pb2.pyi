from telematics.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AlarmType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALARM_TYPE_UNSPECIFIED: _ClassVar[AlarmType]
    ALARM_LOW_BATTERY: _ClassVar[AlarmType]
    ALARM_SECURITY: _ClassVar[AlarmType]
    ALARM_GEOFENCE: _ClassVar[AlarmType]
    ALARM_SPEED: _ClassVar[AlarmType]
    ALARM_ENGINE_START: _ClassVar[AlarmType]
    ALARM_ILLEGAL_UNLOCK: _ClassVar[AlarmType]
    ALARM_SHOCK: _ClassVar[AlarmType]

class DigitalKeyAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIGITAL_KEY_ACTION_UNSPECIFIED: _ClassVar[DigitalKeyAction]
    DIGITAL_KEY_UNLOCK: _ClassVar[DigitalKeyAction]
    DIGITAL_KEY_LOCK: _ClassVar[DigitalKeyAction]
    DIGITAL_KEY_START: _ClassVar[DigitalKeyAction]
    DIGITAL_KEY_PAIR: _ClassVar[DigitalKeyAction]

class ECallTrigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ECALL_TRIGGER_UNSPECIFIED: _ClassVar[ECallTrigger]
    ECALL_MANUAL: _ClassVar[ECallTrigger]
    ECALL_AUTOMATIC: _ClassVar[ECallTrigger]
ALARM_TYPE_UNSPECIFIED: AlarmType
ALARM_LOW_BATTERY: AlarmType
ALARM_SECURITY: AlarmType
ALARM_GEOFENCE: AlarmType
ALARM_SPEED: AlarmType
ALARM_ENGINE_START: AlarmType
ALARM_ILLEGAL_UNLOCK: AlarmType
ALARM_SHOCK: AlarmType
DIGITAL_KEY_ACTION_UNSPECIFIED: DigitalKeyAction
DIGITAL_KEY_UNLOCK: DigitalKeyAction
DIGITAL_KEY_LOCK: DigitalKeyAction
DIGITAL_KEY_START: DigitalKeyAction
DIGITAL_KEY_PAIR: DigitalKeyAction
ECALL_TRIGGER_UNSPECIFIED: ECallTrigger
ECALL_MANUAL: ECallTrigger
ECALL_AUTOMATIC: ECallTrigger

class VehicleStatus(_message.Message):
    __slots__ = ("header", "fuel_level_pct", "charge_level_pct", "range_km", "tyre_pressure_kpa", "battery_voltage_v", "engine_on", "eps_ok", "handbrake_on", "cabin_temp_c", "outside_temp_c", "windows_closed", "sunroof_closed", "doors_locked", "clutch_pressed", "odometer_km", "position")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FUEL_LEVEL_PCT_FIELD_NUMBER: _ClassVar[int]
    CHARGE_LEVEL_PCT_FIELD_NUMBER: _ClassVar[int]
    RANGE_KM_FIELD_NUMBER: _ClassVar[int]
    TYRE_PRESSURE_KPA_FIELD_NUMBER: _ClassVar[int]
    BATTERY_VOLTAGE_V_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ON_FIELD_NUMBER: _ClassVar[int]
    EPS_OK_FIELD_NUMBER: _ClassVar[int]
    HANDBRAKE_ON_FIELD_NUMBER: _ClassVar[int]
    CABIN_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_TEMP_C_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    SUNROOF_CLOSED_FIELD_NUMBER: _ClassVar[int]
    DOORS_LOCKED_FIELD_NUMBER: _ClassVar[int]
    CLUTCH_PRESSED_FIELD_NUMBER: _ClassVar[int]
    ODOMETER_KM_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    fuel_level_pct: float
    charge_level_pct: float
    range_km: float
    tyre_pressure_kpa: _containers.RepeatedScalarFieldContainer[float]
    battery_voltage_v: float
    engine_on: bool
    eps_ok: bool
    handbrake_on: bool
    cabin_temp_c: float
    outside_temp_c: float
    windows_closed: bool
    sunroof_closed: bool
    doors_locked: bool
    clutch_pressed: bool
    odometer_km: float
    position: _common_pb2.GeoPoint
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., fuel_level_pct: _Optional[float] = ..., charge_level_pct: _Optional[float] = ..., range_km: _Optional[float] = ..., tyre_pressure_kpa: _Optional[_Iterable[float]] = ..., battery_voltage_v: _Optional[float] = ..., engine_on: _Optional[bool] = ..., eps_ok: _Optional[bool] = ..., handbrake_on: _Optional[bool] = ..., cabin_temp_c: _Optional[float] = ..., outside_temp_c: _Optional[float] = ..., windows_closed: _Optional[bool] = ..., sunroof_closed: _Optional[bool] = ..., doors_locked: _Optional[bool] = ..., clutch_pressed: _Optional[bool] = ..., odometer_km: _Optional[float] = ..., position: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ...) -> None: ...

class Alarm(_message.Message):
    __slots__ = ("header", "type", "detail", "position")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    type: AlarmType
    detail: str
    position: _common_pb2.GeoPoint
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., type: _Optional[_Union[AlarmType, str]] = ..., detail: _Optional[str] = ..., position: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("header", "position", "request_id")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    position: _common_pb2.GeoPoint
    request_id: str
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., position: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BatteryStatus(_message.Message):
    __slots__ = ("header", "state_of_charge_pct", "time_to_full_min", "current_a", "voltage_v", "range_km", "charging", "charging_location", "evse_id")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STATE_OF_CHARGE_PCT_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FULL_MIN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_A_FIELD_NUMBER: _ClassVar[int]
    VOLTAGE_V_FIELD_NUMBER: _ClassVar[int]
    RANGE_KM_FIELD_NUMBER: _ClassVar[int]
    CHARGING_FIELD_NUMBER: _ClassVar[int]
    CHARGING_LOCATION_FIELD_NUMBER: _ClassVar[int]
    EVSE_ID_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    state_of_charge_pct: float
    time_to_full_min: int
    current_a: float
    voltage_v: float
    range_km: float
    charging: bool
    charging_location: _common_pb2.GeoPoint
    evse_id: str
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., state_of_charge_pct: _Optional[float] = ..., time_to_full_min: _Optional[int] = ..., current_a: _Optional[float] = ..., voltage_v: _Optional[float] = ..., range_km: _Optional[float] = ..., charging: _Optional[bool] = ..., charging_location: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ..., evse_id: _Optional[str] = ...) -> None: ...

class Trip(_message.Message):
    __slots__ = ("header", "trip_id", "start", "end", "distance_km", "energy_kwh", "average_speed_kmh", "duration_s", "odometer_km")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TRIP_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_KM_FIELD_NUMBER: _ClassVar[int]
    ENERGY_KWH_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_SPEED_KMH_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ODOMETER_KM_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    trip_id: str
    start: _common_pb2.GeoPoint
    end: _common_pb2.GeoPoint
    distance_km: float
    energy_kwh: float
    average_speed_kmh: float
    duration_s: int
    odometer_km: float
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., trip_id: _Optional[str] = ..., start: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ..., end: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ..., distance_km: _Optional[float] = ..., energy_kwh: _Optional[float] = ..., average_speed_kmh: _Optional[float] = ..., duration_s: _Optional[int] = ..., odometer_km: _Optional[float] = ...) -> None: ...

class DigitalKeyEvent(_message.Message):
    __slots__ = ("header", "key_id", "action", "bluetooth_mac")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    BLUETOOTH_MAC_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    key_id: str
    action: DigitalKeyAction
    bluetooth_mac: str
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., key_id: _Optional[str] = ..., action: _Optional[_Union[DigitalKeyAction, str]] = ..., bluetooth_mac: _Optional[str] = ...) -> None: ...

class Connectivity(_message.Message):
    __slots__ = ("header", "ip_address", "iccid", "imsi", "network_type", "signal_dbm", "os_version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ICCID_FIELD_NUMBER: _ClassVar[int]
    IMSI_FIELD_NUMBER: _ClassVar[int]
    NETWORK_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_DBM_FIELD_NUMBER: _ClassVar[int]
    OS_VERSION_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    ip_address: str
    iccid: str
    imsi: str
    network_type: str
    signal_dbm: int
    os_version: str
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., ip_address: _Optional[str] = ..., iccid: _Optional[str] = ..., imsi: _Optional[str] = ..., network_type: _Optional[str] = ..., signal_dbm: _Optional[int] = ..., os_version: _Optional[str] = ...) -> None: ...

class ECall(_message.Message):
    __slots__ = ("header", "trigger", "position", "recent_positions", "passengers", "vehicle_type", "propulsion")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RECENT_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PASSENGERS_FIELD_NUMBER: _ClassVar[int]
    VEHICLE_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROPULSION_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    trigger: ECallTrigger
    position: _common_pb2.GeoPoint
    recent_positions: _containers.RepeatedCompositeFieldContainer[_common_pb2.GeoPoint]
    passengers: int
    vehicle_type: str
    propulsion: str
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., trigger: _Optional[_Union[ECallTrigger, str]] = ..., position: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ..., recent_positions: _Optional[_Iterable[_Union[_common_pb2.GeoPoint, _Mapping]]] = ..., passengers: _Optional[int] = ..., vehicle_type: _Optional[str] = ..., propulsion: _Optional[str] = ...) -> None: ...

class NavRequest(_message.Message):
    __slots__ = ("header", "position", "destination", "route_id", "traffic_requested")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_ID_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    position: _common_pb2.GeoPoint
    destination: _common_pb2.GeoPoint
    route_id: str
    traffic_requested: bool
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., position: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ..., destination: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ..., route_id: _Optional[str] = ..., traffic_requested: _Optional[bool] = ...) -> None: ...

class SearchQuery(_message.Message):
    __slots__ = ("header", "text", "position", "category")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    text: str
    position: _common_pb2.GeoPoint
    category: str
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., text: _Optional[str] = ..., position: _Optional[_Union[_common_pb2.GeoPoint, _Mapping]] = ..., category: _Optional[str] = ...) -> None: ...

class VoiceChunk(_message.Message):
    __slots__ = ("header", "session_id", "chunk_index", "audio", "final", "language")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    session_id: str
    chunk_index: int
    audio: bytes
    final: bool
    language: str
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., session_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., audio: _Optional[bytes] = ..., final: _Optional[bool] = ..., language: _Optional[str] = ...) -> None: ...

class AppTraffic(_message.Message):
    __slots__ = ("header", "app_id", "content_type", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    app_id: str
    content_type: str
    payload: bytes
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., app_id: _Optional[str] = ..., content_type: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...
