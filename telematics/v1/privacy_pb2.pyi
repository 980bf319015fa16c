from telematics.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrivacySettings(_message.Message):
    __slots__ = ("header", "revision", "privacy_mode", "location", "features", "policy_version")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_MODE_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.Header
    revision: int
    privacy_mode: bool
    location: _common_pb2.LocationMode
    features: _containers.ScalarMap[str, bool]
    policy_version: str
    def __init__(self, header: _Optional[_Union[_common_pb2.Header, _Mapping]] = ..., revision: _Optional[int] = ..., privacy_mode: _Optional[bool] = ..., location: _Optional[_Union[_common_pb2.LocationMode, str]] = ..., features: _Optional[_Mapping[str, bool]] = ..., policy_version: _Optional[str] = ...) -> None: ...

class PrivacyApplied(_message.Message):
    __slots__ = ("vin", "revision", "policy_version", "reprompt")
    VIN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPROMPT_FIELD_NUMBER: _ClassVar[int]
    vin: str
    revision: int
    policy_version: str
    reprompt: bool
    def __init__(self, vin: _Optional[str] = ..., revision: _Optional[int] = ..., policy_version: _Optional[str] = ..., reprompt: _Optional[bool] = ...) -> None: ...

class ErasureEvent(_message.Message):
    __slots__ = ("vin", "refs", "erased_at_ms", "reason")
    VIN_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    ERASED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    vin: str
    refs: _containers.RepeatedScalarFieldContainer[str]
    erased_at_ms: int
    reason: str
    def __init__(self, vin: _Optional[str] = ..., refs: _Optional[_Iterable[str]] = ..., erased_at_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RestrictionEvent(_message.Message):
    __slots__ = ("vin", "restricted", "at_ms")
    VIN_FIELD_NUMBER: _ClassVar[int]
    RESTRICTED_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    vin: str
    restricted: bool
    at_ms: int
    def __init__(self, vin: _Optional[str] = ..., restricted: _Optional[bool] = ..., at_ms: _Optional[int] = ...) -> None: ...

class OwnershipEvent(_message.Message):
    __slots__ = ("vin", "at_ms")
    VIN_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    vin: str
    at_ms: int
    def __init__(self, vin: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...
