"""Data the extension points hand plugins: endpoints and their metrics, the parsed
request, the per-cycle state, scheduling results and response information."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from epp.framework.datakeys import DataKey
from epp.netaddr import join_hostport

T = TypeVar("T")

# Endpoint label keys read by built-in plugins.
ENGINE_TYPE_LABEL = "inference.networking.k8s.io/engine-type"
ROLE_LABEL = "llm-d.ai/role"
CONTEXT_LENGTH_RANGE_LABEL = "llm-d.ai/context-length-range"
# Upstream headers profile handlers set for the decode side's routing sidecar (reference
# pkg/common/routing/common.go): host:port, IPv6 bracketed; the encoders' a comma list.
PREFILLER_HEADER = "x-prefiller-host-port"
ENCODERS_HEADER = "x-encoder-hosts-ports"
DATA_PARALLEL_HEADER = "x-data-parallel-host-port"


# --------------------------------------------------------------------------- endpoints
@dataclass(frozen=True, slots=True)
class Metrics:
    """One scrape of a model server, normalised across engines. Immutable: the scraper
    publishes a new snapshot, readers never see a half-written one."""

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0  # fraction 0..1, despite the reference's name
    running_lora_adapters: frozenset[str] = frozenset()
    waiting_lora_adapters: frozenset[str] = frozenset()
    max_active_models: int = 0  # vLLM max_lora; 0 = unknown
    block_size: int | None = None  # tokens per KV block, from cache config info
    num_gpu_blocks: int | None = None
    update_time: float = 0.0  # time.monotonic() of the scrape; 0.0 = never scraped
    ok: bool = False  # last scrape succeeded
    # custom scalar metrics (the metrics extractor's engineConfigs[].customMetrics): attribute key -> value,
    # scalar endpoint attributes a filter or scorer may read. Not compared or hashed.
    custom: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)

    def age(self, now: float) -> float:
        return now - self.update_time if self.update_time else float("inf")


@dataclass(frozen=True, slots=True)
class ServedModels:
    """An endpoint's /v1/models answer (models-data-source + models-data-extractor):
    base models, and LoRA adapters (entries with a `parent`) with their base model."""

    models: frozenset[str] = frozenset()
    adapters: Mapping[str, str] = field(default_factory=dict)  # adapter -> parent (base) model
    update_time: float = 0.0  # time.monotonic() of the poll; 0.0 = never polled
    ok: bool = False  # last poll succeeded

    def names(self) -> frozenset[str]:
        return self.models | frozenset(self.adapters)


@dataclass(eq=False, slots=True)
class Endpoint:
    """One model-server endpoint (a pod's target port). Identity is the object itself:
    the datastore keeps one object per endpoint for its whole life, so plugins may key
    dicts by it. `metrics` is replaced wholesale by the scraper."""

    name: str  # e.g. "<pod>-rank-<i>"; unique in the pool
    address: str  # IP, v4 or v6, no brackets
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "default"
    pod_name: str = ""
    metrics: Metrics = field(default_factory=Metrics)
    served: ServedModels = field(default_factory=ServedModels)  # replaced wholesale by the models source
    in_flight: int = 0  # requests this picker routed here and that have not completed
    in_flight_tokens: int = 0  # estimated prompt+output tokens of those requests
    hostport: str = ""  # "ip:port", IPv6 bracketed; derived

    def __post_init__(self) -> None:
        host = f"[{self.address}]" if ":" in self.address else self.address
        self.hostport = f"{host}:{self.port}"
        if not self.pod_name:
            self.pod_name = self.name

    def __repr__(self) -> str:
        return f"Endpoint({self.name} {self.hostport})"


# --------------------------------------------------------------------------- request
@dataclass(slots=True)
class InferenceRequest:
    """A parsed OpenAI request as the scheduler sees it (the reference's LLMRequest)."""

    request_id: str
    target_model: str  # after model rewrite: what the model server is asked for
    incoming_model: str  # what the client asked for
    # the API, as the parser named it: "completions" | "chat" | "responses" | "embeddings" | "conversations"
    # | "images" | "messages" | "count_tokens" | "generate" | "passthrough" | "none" (bodiless)
    kind: str
    prompt_text: str  # text used for prefix matching (see reference scheduling.md)
    headers: Mapping[str, str]  # lowercased keys
    body: Mapping[str, Any] | None = None  # parsed JSON body
    stream: bool = False
    objective: str = ""  # InferenceObjective name from x-llm-d-inference-objective (or the old x-gateway-*)
    priority: int = 0  # negative = sheddable
    fairness_id: str = "default-flow"
    cache_salt: str = ""
    max_tokens: int | None = None
    size_bytes: int = 0
    # the request's latency SLOs in ms from x-llm-d-slo-ttft-ms / x-llm-d-slo-tpot-ms (or the older x-slo-*);
    # 0 = none (absent, not a number, negative or not finite)
    slo_ttft_ms: float = 0.0
    slo_tpot_ms: float = 0.0

    @property
    def estimated_prompt_tokens(self) -> int:
        return max(1, len(self.prompt_text) // 4)


# --------------------------------------------------------------------------- cycle
class CycleState(dict[str, Any]):
    """Per-request data shared by the plugins of one cycle: a producer writes under a
    typed key in PrepareData (e.g. the prefix match), consumers read it by the same key.
    A dict underneath, so a read costs one lookup."""

    __slots__ = ()

    if TYPE_CHECKING:
        def read(self, key: DataKey[T]) -> T | None: ...

        def write(self, key: DataKey[T], value: T) -> None: ...
    else:  # keys are strings: the dict's own methods, no Python frame per access
        read = dict.get
        write = dict.__setitem__


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


@dataclass(slots=True)
class ProfileRunResult:
    """What a profile's picker chose: primary first, the rest are fallbacks."""

    targets: list[Endpoint]
    # "ip:port" -> weighted total of every endpoint the profile scored, picked or not (the
    # reference's ScoredCandidates); filled by the scheduler only with --emit-endpoint-scores
    scores: dict[str, float] | None = None


@dataclass(slots=True)
class SchedulingResult:
    profile_results: dict[str, ProfileRunResult | None]
    primary_profile: str
    headers: dict[str, str] = field(default_factory=dict)  # headers to set upstream (e.g. x-prefiller-host-port)
    # Send Envoy to this port of the targets' hosts instead of their own (the data-parallel primary
    # port); the targets stay the picked endpoints, so what is keyed by them counts there. None: their port.
    destination_port: int | None = None

    @property
    def targets(self) -> list[Endpoint]:
        r = self.profile_results.get(self.primary_profile)
        return r.targets if r else []

    def destination(self) -> str:
        """The comma-joined host:port list Envoy is told, primary first."""
        targets, port = self.targets, self.destination_port
        if port is None:
            return targets[0].hostport if len(targets) == 1 else ",".join(t.hostport for t in targets)
        return ",".join(join_hostport(t.address, port) for t in targets)


@dataclass(slots=True)
class ResponseInfo:
    """What the response hooks see."""

    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    served_endpoint: str = ""  # "ip:port" that actually served (upstream.address)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    end_of_stream: bool = False
    set_headers: dict[str, str] = field(default_factory=dict)  # response headers a plugin wants to add


