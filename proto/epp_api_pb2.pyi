from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListEndpointsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints", "synced", "next_page_token")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointInfo]
    synced: bool
    next_page_token: str
    def __init__(self, endpoints: _Optional[_Iterable[_Union[EndpointInfo, _Mapping]]] = ..., synced: _Optional[bool] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class EndpointInfo(_message.Message):
    __slots__ = ("name", "address", "port", "labels", "namespace", "pod_name", "metrics", "in_flight_requests", "in_flight_tokens", "truncated", "status")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class StatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    port: int
    labels: _containers.ScalarMap[str, str]
    namespace: str
    pod_name: str
    metrics: EndpointMetrics
    in_flight_requests: int
    in_flight_tokens: int
    truncated: bool
    status: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., namespace: _Optional[str] = ..., pod_name: _Optional[str] = ..., metrics: _Optional[_Union[EndpointMetrics, _Mapping]] = ..., in_flight_requests: _Optional[int] = ..., in_flight_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., status: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EndpointMetrics(_message.Message):
    __slots__ = ("waiting_queue_size", "running_requests_size", "kv_cache_usage", "running_lora_adapters", "waiting_lora_adapters", "max_lora", "block_size", "num_gpu_blocks", "age_seconds", "ok")
    WAITING_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    waiting_queue_size: int
    running_requests_size: int
    kv_cache_usage: float
    running_lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    waiting_lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    max_lora: int
    block_size: int
    num_gpu_blocks: int
    age_seconds: float
    ok: bool
    def __init__(self, waiting_queue_size: _Optional[int] = ..., running_requests_size: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., running_lora_adapters: _Optional[_Iterable[str]] = ..., waiting_lora_adapters: _Optional[_Iterable[str]] = ..., max_lora: _Optional[int] = ..., block_size: _Optional[int] = ..., num_gpu_blocks: _Optional[int] = ..., age_seconds: _Optional[float] = ..., ok: _Optional[bool] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("body", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BODY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    headers: _containers.ScalarMap[str, str]
    def __init__(self, body: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request", "candidates", "profiles", "primary_profile", "targets", "headers", "error_code", "error_message", "http_status", "truncated", "prefix_matches", "latency_predictions", "slo_ttft_ms", "slo_tpot_ms")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_PROFILE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MATCHES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    SLO_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    request: ParsedRequest
    candidates: _containers.RepeatedScalarFieldContainer[str]
    profiles: _containers.RepeatedCompositeFieldContainer[ProfileTrace]
    primary_profile: str
    targets: _containers.RepeatedScalarFieldContainer[str]
    headers: _containers.ScalarMap[str, str]
    error_code: str
    error_message: str
    http_status: int
    truncated: bool
    prefix_matches: _containers.RepeatedCompositeFieldContainer[PrefixMatch]
    latency_predictions: _containers.RepeatedCompositeFieldContainer[LatencyPrediction]
    slo_ttft_ms: float
    slo_tpot_ms: float
    def __init__(self, request: _Optional[_Union[ParsedRequest, _Mapping]] = ..., candidates: _Optional[_Iterable[str]] = ..., profiles: _Optional[_Iterable[_Union[ProfileTrace, _Mapping]]] = ..., primary_profile: _Optional[str] = ..., targets: _Optional[_Iterable[str]] = ..., headers: _Optional[_Mapping[str, str]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., http_status: _Optional[int] = ..., truncated: _Optional[bool] = ..., prefix_matches: _Optional[_Iterable[_Union[PrefixMatch, _Mapping]]] = ..., latency_predictions: _Optional[_Iterable[_Union[LatencyPrediction, _Mapping]]] = ..., slo_ttft_ms: _Optional[float] = ..., slo_tpot_ms: _Optional[float] = ...) -> None: ...

class LatencyPrediction(_message.Message):
    __slots__ = ("producer", "endpoint", "ttft_ms", "tpot_ms", "ttft_headroom_ms", "tpot_headroom_ms", "meets_slo", "dispatched_requests")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_HEADROOM_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_HEADROOM_MS_FIELD_NUMBER: _ClassVar[int]
    MEETS_SLO_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    producer: str
    endpoint: str
    ttft_ms: float
    tpot_ms: float
    ttft_headroom_ms: float
    tpot_headroom_ms: float
    meets_slo: bool
    dispatched_requests: int
    def __init__(self, producer: _Optional[str] = ..., endpoint: _Optional[str] = ..., ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ..., ttft_headroom_ms: _Optional[float] = ..., tpot_headroom_ms: _Optional[float] = ..., meets_slo: _Optional[bool] = ..., dispatched_requests: _Optional[int] = ...) -> None: ...

class PrefixMatch(_message.Message):
    __slots__ = ("producer", "endpoint", "matched_blocks", "total_blocks", "block_size_tokens", "blocks_by_medium")
    class BlocksByMediumEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_BY_MEDIUM_FIELD_NUMBER: _ClassVar[int]
    producer: str
    endpoint: str
    matched_blocks: int
    total_blocks: int
    block_size_tokens: int
    blocks_by_medium: _containers.ScalarMap[str, int]
    def __init__(self, producer: _Optional[str] = ..., endpoint: _Optional[str] = ..., matched_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., block_size_tokens: _Optional[int] = ..., blocks_by_medium: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ParsedRequest(_message.Message):
    __slots__ = ("incoming_model", "target_model", "kind", "objective", "priority", "stream", "prompt_chars")
    INCOMING_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    incoming_model: str
    target_model: str
    kind: str
    objective: str
    priority: int
    stream: bool
    prompt_chars: int
    def __init__(self, incoming_model: _Optional[str] = ..., target_model: _Optional[str] = ..., kind: _Optional[str] = ..., objective: _Optional[str] = ..., priority: _Optional[int] = ..., stream: _Optional[bool] = ..., prompt_chars: _Optional[int] = ...) -> None: ...

class ProfileTrace(_message.Message):
    __slots__ = ("name", "filters", "scorers", "totals", "picked", "error", "picker", "candidates")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    PICKED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PICKER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    filters: _containers.RepeatedCompositeFieldContainer[FilterTrace]
    scorers: _containers.RepeatedCompositeFieldContainer[ScorerTrace]
    totals: _containers.RepeatedCompositeFieldContainer[EndpointScore]
    picked: _containers.RepeatedScalarFieldContainer[str]
    error: str
    picker: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., filters: _Optional[_Iterable[_Union[FilterTrace, _Mapping]]] = ..., scorers: _Optional[_Iterable[_Union[ScorerTrace, _Mapping]]] = ..., totals: _Optional[_Iterable[_Union[EndpointScore, _Mapping]]] = ..., picked: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., picker: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ...) -> None: ...

class FilterTrace(_message.Message):
    __slots__ = ("name", "type", "kept")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    kept: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., kept: _Optional[_Iterable[str]] = ...) -> None: ...

class ScorerTrace(_message.Message):
    __slots__ = ("name", "type", "weight", "scores")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    weight: float
    scores: _containers.RepeatedCompositeFieldContainer[EndpointScore]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., weight: _Optional[float] = ..., scores: _Optional[_Iterable[_Union[EndpointScore, _Mapping]]] = ...) -> None: ...

class EndpointScore(_message.Message):
    __slots__ = ("endpoint", "score")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    score: float
    def __init__(self, endpoint: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...
