from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TwinSummary(_message.Message):
    __slots__ = ("name", "version", "modality", "images", "size_bytes", "epsilon_max", "delta", "audit_verdict", "published_at", "key_fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_MAX_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    AUDIT_VERDICT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    modality: str
    images: int
    size_bytes: int
    epsilon_max: float
    delta: float
    audit_verdict: str
    published_at: str
    key_fingerprint: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., modality: _Optional[str] = ..., images: _Optional[int] = ..., size_bytes: _Optional[int] = ..., epsilon_max: _Optional[float] = ..., delta: _Optional[float] = ..., audit_verdict: _Optional[str] = ..., published_at: _Optional[str] = ..., key_fingerprint: _Optional[str] = ...) -> None: ...

class ListTwinsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTwinsResponse(_message.Message):
    __slots__ = ("twins",)
    TWINS_FIELD_NUMBER: _ClassVar[int]
    twins: _containers.RepeatedCompositeFieldContainer[TwinSummary]
    def __init__(self, twins: _Optional[_Iterable[_Union[TwinSummary, _Mapping]]] = ...) -> None: ...

class TwinRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("twin",)
    TWIN_FIELD_NUMBER: _ClassVar[int]
    twin: TwinRef
    def __init__(self, twin: _Optional[_Union[TwinRef, _Mapping]] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetManifestResponse(_message.Message):
    __slots__ = ("summary", "manifest", "signature", "files")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    summary: TwinSummary
    manifest: bytes
    signature: bytes
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, summary: _Optional[_Union[TwinSummary, _Mapping]] = ..., manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class PullTwinRequest(_message.Message):
    __slots__ = ("twin", "offset")
    TWIN_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    twin: TwinRef
    offset: int
    def __init__(self, twin: _Optional[_Union[TwinRef, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class TwinChunk(_message.Message):
    __slots__ = ("offset", "path", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    path: str
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PublishHeader(_message.Message):
    __slots__ = ("name", "version", "modality", "manifest", "signature")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    modality: str
    manifest: bytes
    signature: bytes
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., modality: _Optional[str] = ..., manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PublishData(_message.Message):
    __slots__ = ("path", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PublishHeader
    data: PublishData
    def __init__(self, header: _Optional[_Union[PublishHeader, _Mapping]] = ..., data: _Optional[_Union[PublishData, _Mapping]] = ...) -> None: ...

class PublishTwinResponse(_message.Message):
    __slots__ = ("summary",)
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    summary: TwinSummary
    def __init__(self, summary: _Optional[_Union[TwinSummary, _Mapping]] = ...) -> None: ...
