from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferRequest(_message.Message):
    __slots__ = ("request_id", "model_id", "fingerprint", "latent_shape", "hyper_shape", "stream", "index_checksum", "top_k", "tag", "client_id", "label")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    HYPER_SHAPE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    INDEX_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_id: str
    fingerprint: str
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    hyper_shape: _containers.RepeatedScalarFieldContainer[int]
    stream: bytes
    index_checksum: int
    top_k: int
    tag: str
    client_id: str
    label: int
    def __init__(self, request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., latent_shape: _Optional[_Iterable[int]] = ..., hyper_shape: _Optional[_Iterable[int]] = ..., stream: _Optional[bytes] = ..., index_checksum: _Optional[int] = ..., top_k: _Optional[int] = ..., tag: _Optional[str] = ..., client_id: _Optional[str] = ..., label: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "name", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: int
    name: str
    probability: float
    def __init__(self, label: _Optional[int] = ..., name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("request_id", "top_k", "decode_ms", "queue_ms", "tail_ms", "server_ms", "stream_bytes", "batch_size", "error_code", "error_message", "retry_after_ms", "flagged")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TAIL_MS_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    STREAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    top_k: _containers.RepeatedCompositeFieldContainer[Prediction]
    decode_ms: float
    queue_ms: float
    tail_ms: float
    server_ms: float
    stream_bytes: int
    batch_size: int
    error_code: int
    error_message: str
    retry_after_ms: int
    flagged: bool
    def __init__(self, request_id: _Optional[str] = ..., top_k: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., tail_ms: _Optional[float] = ..., server_ms: _Optional[float] = ..., stream_bytes: _Optional[int] = ..., batch_size: _Optional[int] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., flagged: _Optional[bool] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "fingerprint", "arch", "prior", "input_size", "latent_shape", "hyper_shape", "classes", "max_stream_bytes", "max_batch")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    HYPER_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    fingerprint: str
    arch: str
    prior: str
    input_size: int
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    hyper_shape: _containers.RepeatedScalarFieldContainer[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    max_stream_bytes: int
    max_batch: int
    def __init__(self, model_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., arch: _Optional[str] = ..., prior: _Optional[str] = ..., input_size: _Optional[int] = ..., latent_shape: _Optional[_Iterable[int]] = ..., hyper_shape: _Optional[_Iterable[int]] = ..., classes: _Optional[_Iterable[str]] = ..., max_stream_bytes: _Optional[int] = ..., max_batch: _Optional[int] = ...) -> None: ...
