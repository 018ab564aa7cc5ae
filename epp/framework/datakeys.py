"""Typed keys for data a producer publishes and consumers read, so neither imports the
other (the reference's data keys): a producer writes `cycle.write(key, value)` in
PrepareData; a filter, scorer or decider reads `cycle.read(key)` and gets a value of
the key's type, or None when no producer ran.

A key names its producer instance: `PREFIX_MATCH_INFO.of(name)`, so two producers of
the same kind can run side by side and a consumer says which one it reads (its
`...ProducerName` parameter, defaulting to the producer type's name, which is also the
default instance name)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from epp.framework.types import Endpoint

T = TypeVar("T")


class DataKey(str, Generic[T]):
    """A cycle-state slot name that carries its value's type. A string itself, so reading
    the cycle state by key is one dict lookup in C (the hot path)."""

    type: type[T]

    def __new__(cls, name: str, value_type: type[T]) -> DataKey[T]:
        key = super().__new__(cls, name)
        key.type = value_type
        return key

    def __repr__(self) -> str:
        return f"DataKey({str(self)!r}, {self.type.__name__})"

    def of(self, producer: str) -> DataKey[T]:
        """The same kind of data, as published by the producer instance `producer`."""
        return DataKey(f"{self.partition('/')[0]}/{producer}", self.type)


@dataclass(frozen=True, slots=True)
class ProducerParam:
    """A consumer's parameter that names the producer instance it reads from, declared
    on the plugin class as `consumes = (ProducerParam(...),)` so the config loader can
    resolve it without knowing the plugin:
    - `legacy_ref`: an older parameter naming the plugin that used to publish the data;
      the loader rewrites it to the producer that publishes it now;
    - `moved_params`: parameters older configs set on this consumer, which used to do
      the producing itself; when the producer it reads is not configured, the loader
      adds one (implicit) carrying them."""

    param: str
    producer_type: str  # also the default producer instance name
    legacy_ref: str = ""
    moved_params: tuple[str, ...] = ()
    # the reference's Required dependency: when the producer it reads is not configured,
    # the loader adds the default one (its type, no parameters), as the reference does
    required: bool = False
    # parameters the loader sets (under the moved ones) on an implicit producer made from
    # `moved_params`, e.g. the older generation's semantics those parameters had
    moved_defaults: tuple[tuple[str, object], ...] = ()


# --------------------------------------------------------------------------- prefix match
APPROX_PREFIX_PRODUCER = "approx-prefix-cache-producer"


@dataclass(slots=True)
class PrefixCacheMatchInfo:
    """How much of the request's prefix each endpoint likely holds (the reference's
    PrefixCacheMatchInfo): `matches` maps an endpoint to the number of leading blocks it
    holds (endpoints with none are absent); `total_blocks` is the request's whole blocks
    of `block_size_tokens` tokens each; `longest` is the largest count in `matches`.
    `by_medium` (optional, the reference's CachedBlocksByTier): per matched endpoint, its
    matched blocks by medium ("gpu", "cpu", "speculative"; "approximate" for a guess)."""

    matches: dict[Endpoint, int] = field(default_factory=dict)
    total_blocks: int = 0
    block_size_tokens: int = 0
    longest: int = 0
    by_medium: dict[Endpoint, dict[str, int]] = field(default_factory=dict)

    @property
    def any_hit(self) -> bool:
        """Some endpoint holds at least the first block."""
        return self.longest > 0

    @property
    def total(self) -> int:
        return self.total_blocks

    def score(self, endpoint: Endpoint) -> float:
        """Fraction of the request's blocks the endpoint holds, in [0, 1]."""
        return self.matches.get(endpoint, 0) / self.total_blocks if self.total_blocks else 0.0

    def scores(self, endpoints: Sequence[Endpoint]) -> list[float]:
        total = self.total_blocks
        if not total or not self.matches:
            return [0.0] * len(endpoints)
        get = self.matches.get
        return [get(e, 0) / total for e in endpoints]

    def cached_tokens(self, endpoint: Endpoint) -> int:
        return self.matches.get(endpoint, 0) * self.block_size_tokens


PREFIX_MATCH_PRODUCER = ProducerParam("prefixMatchInfoProducerName", APPROX_PREFIX_PRODUCER,
                                      legacy_ref="prefixPluginName")
# ... for the consumers the reference declares it Required for (the default producer is added)
PREFIX_MATCH_CONSUMER = ProducerParam("prefixMatchInfoProducerName", APPROX_PREFIX_PRODUCER,
                                      legacy_ref="prefixPluginName", required=True)
PREFIX_MATCH_INFO: DataKey[PrefixCacheMatchInfo] = DataKey("prefix-cache-match-info", PrefixCacheMatchInfo).of(
    APPROX_PREFIX_PRODUCER)


# --------------------------------------------------------------------------- in-flight load
INFLIGHT_LOAD_PRODUCER = "inflight-load-producer"


@dataclass(slots=True)
class InFlightLoadInfo:
    """What an in-flight load producer publishes per request (the reference's InFlightLoad
    and UncachedRequestTokens attributes): per endpoint, the requests and tokens routed
    there and not yet done (absent = 0), and the tokens this request would add there
    (its prompt minus the prefix the endpoint likely holds)."""

    requests: dict[Endpoint, int] = field(default_factory=dict)
    tokens: dict[Endpoint, int] = field(default_factory=dict)
    uncached: dict[Endpoint, int] = field(default_factory=dict)


INFLIGHT_LOAD_CONSUMER = ProducerParam("inFlightLoadProducerName", INFLIGHT_LOAD_PRODUCER, required=True)
INFLIGHT_LOAD: DataKey[InFlightLoadInfo] = DataKey("inflight-load", InFlightLoadInfo).of(INFLIGHT_LOAD_PRODUCER)

# --------------------------------------------------------------------------- tokenized prompt
TOKEN_PRODUCER = "token-producer"
TOKENIZED_PROMPT: DataKey[int] = DataKey("tokenized-prompt", int).of(TOKEN_PRODUCER)  # the prompt's token count
TOKENS_CONSUMER = ProducerParam("", TOKEN_PRODUCER, required=True)  # no parameter: always the default instance
# the prompt's token ids as the model server's tokenizer makes them (chat template applied), published by
# token-producer when a real tokenizer backend ran (vllm render service or in-process tokenizers), and by
# every backend when the client sent token ids (client_token_ids); absent when only the estimate ran
TOKEN_IDS: DataKey[tuple] = DataKey("token-ids", tuple).of(TOKEN_PRODUCER)


def client_token_ids(body: Mapping[str, Any] | None) -> Sequence[int] | None:
    """The prompt as the client sent it when it is token ids (completions' prompt, embeddings'
    input, generate's token_ids; prompt_token_ids too): a non-empty list of integers, exactly
    what the server will cache. None otherwise."""
    if not isinstance(body, Mapping):
        return None
    for key in ("prompt", "input", "token_ids", "prompt_token_ids"):
        v = body.get(key)
        if isinstance(v, list) and v and all(type(t) is int for t in v):
            return v
    return None


# --------------------------------------------------------------------------- session id
SESSION_ID_PRODUCER = "session-id-producer"
# the reference's attribute name, which a session-affinity source names ({attribute, producer})
SESSION_ID: DataKey[str] = DataKey("SessionIDDataKey", str).of(SESSION_ID_PRODUCER)

# --------------------------------------------------------------------------- predicted latency
PREDICTED_LATENCY_PRODUCER = "predicted-latency-producer"


@dataclass(frozen=True, slots=True)
class LatencyPredictionInfo:
    """One endpoint's predicted latency for the request (the reference's LatencyPredictionInfo):
    predicted TTFT and TPOT in ms, headroom = SLO - predicted (negative: the SLO is missed; with
    no SLO the SLO counts 0, so headroom = -predicted), validity = predicted < SLO, and the
    requests this picker has dispatched there and not seen complete."""

    ttft_ms: float
    tpot_ms: float
    ttft_headroom_ms: float
    tpot_headroom_ms: float
    ttft_valid: bool
    tpot_valid: bool
    dispatched_requests: int = 0

    @property
    def valid(self) -> bool:
        return self.ttft_valid and self.tpot_valid

    @property
    def positive_headroom(self) -> bool:
        """TTFT and TPOT headroom both >= 0: the positive tier of latency-scorer and
        slo-headroom-tier-filter."""
        return self.ttft_headroom_ms >= 0 and self.tpot_headroom_ms >= 0


@dataclass(slots=True)
class LatencyPredictions:
    """What a predicted-latency producer publishes per request: a prediction per endpoint it
    could predict for (absent: no prediction), and the request's SLOs in ms (0 = none)."""

    endpoints: dict[Endpoint, LatencyPredictionInfo] = field(default_factory=dict)
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0

    @property
    def has_slo(self) -> bool:
        return self.ttft_slo_ms > 0 or self.tpot_slo_ms > 0


PREDICTED_LATENCY_CONSUMER = ProducerParam("latencyPredictionInfoProducerName", PREDICTED_LATENCY_PRODUCER,
                                           required=True)


@dataclass(slots=True)
class PredictionConsumerParams:
    """The parameter of every plugin reading LATENCY_PREDICTIONS: the producer instance it
    reads ("": predicted-latency-producer)."""

    latencyPredictionInfoProducerName: str = ""

LATENCY_PREDICTIONS: DataKey[LatencyPredictions] = DataKey("LatencyPredictionInfoDataKey", LatencyPredictions).of(
    PREDICTED_LATENCY_PRODUCER)
