from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class LocationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOCATION_MODE_UNSPECIFIED: _ClassVar[LocationMode]
    LOCATION_OFF: _ClassVar[LocationMode]
    LOCATION_APPROXIMATE: _ClassVar[LocationMode]
    LOCATION_PRECISE: _ClassVar[LocationMode]
LOCATION_MODE_UNSPECIFIED: LocationMode
LOCATION_OFF: LocationMode
LOCATION_APPROXIMATE: LocationMode
LOCATION_PRECISE: LocationMode

class Header(_message.Message):
    __slots__ = ("vin", "seq", "timestamp_ms", "settings_revision")
    VIN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_REVISION_FIELD_NUMBER: _ClassVar[int]
    vin: str
    seq: int
    timestamp_ms: int
    settings_revision: int
    def __init__(self, vin: _Optional[str] = ..., seq: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., settings_revision: _Optional[int] = ...) -> None: ...

class GeoPoint(_message.Message):
    __slots__ = ("latitude", "longitude", "altitude_m", "heading_deg", "speed_kmh", "horizontal_accuracy_m")
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    ALTITUDE_M_FIELD_NUMBER: _ClassVar[int]
    HEADING_DEG_FIELD_NUMBER: _ClassVar[int]
    SPEED_KMH_FIELD_NUMBER: _ClassVar[int]
    HORIZONTAL_ACCURACY_M_FIELD_NUMBER: _ClassVar[int]
    latitude: float
    longitude: float
    altitude_m: float
    heading_deg: float
    speed_kmh: float
    horizontal_accuracy_m: float
    def __init__(self, latitude: _Optional[float] = ..., longitude: _Optional[float] = ..., altitude_m: _Optional[float] = ..., heading_deg: _Optional[float] = ..., speed_kmh: _Optional[float] = ..., horizontal_accuracy_m: _Optional[float] = ...) -> None: ...
