"""Parameters of precise-prefix-cache-producer (and its deprecated scorer alias), in the
reference's shape: llm-d-router requestcontrol/dataproducer/preciseprefixcache PluginConfig,
whose nested configs are llm-d-kv-cache's kvblock.TokenProcessorConfig, kvcache.Config and
kvevents.Config. Defaults are theirs (DefaultTokenProcessorConfig, NewDefaultConfig,
kvevents.DefaultConfig); what this picker does not build is refused by name."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.framework import bounded
from epp.labelselector import LabelSelector
from epp.units import UnitError, parse_duration

DEFAULT_BLOCK_SIZE_TOKENS = 16  # kvblock defaultBlockSize
DEFAULT_SPECULATIVE_TTL = 2.0  # seconds, preciseprefixcache defaultSpeculativeTTL
DEFAULT_SOCKET_PORT = 5557  # kvevents DefaultPodReconcilerConfig
REFERENCE_INDEX_SIZE = 100_000_000  # kvblock defaultInMemoryIndexSize (keys)
# This picker's bound when the config leaves `size` at the reference's default: 1e8 keys
# would be about 20 GB here (bench/kvindex_cost.py: ~200 bytes per block).
DEFAULT_MAX_BLOCKS = 2_000_000
DEFAULT_MEDIUM_WEIGHTS = {"gpu": 1.0, "cpu": 0.8}  # kvcache DefaultKVCacheBackendConfig


@dataclass(slots=True)
class TokenProcessorConfig:
    blockSize: int = bounded(0, ge=0)  # deprecated in the reference: blockSizeTokens
    blockSizeTokens: int = bounded(0, ge=0)  # 0 = the default, 16
    hashSeed: str = ""

    def block_size_tokens(self) -> int:
        return self.blockSizeTokens or self.blockSize or DEFAULT_BLOCK_SIZE_TOKENS


@dataclass(slots=True)
class InMemoryIndexConfig:
    size: int = bounded(REFERENCE_INDEX_SIZE, gt=0)
    podCacheSize: int = bounded(10, gt=0)  # (endpoint, tier) entries per key, least recently stored dropped

    def max_blocks(self) -> int:
        return DEFAULT_MAX_BLOCKS if self.size == REFERENCE_INDEX_SIZE else self.size


@dataclass(slots=True)
class KVBlockIndexConfig:
    inMemoryConfig: InMemoryIndexConfig = field(default_factory=InMemoryIndexConfig)
    redisConfig: dict | None = None
    costAwareMemoryConfig: dict | None = None
    enableMetrics: bool = False  # the llm_d_epp_kv_cache_index_* families (and kvcache_index_* aliases)
    metricsLoggingInterval: int | str = 0  # nanoseconds or a Go duration; > 0 with enableMetrics: a log line each

    def validate(self) -> None:
        for key in ("redisConfig", "costAwareMemoryConfig"):
            if getattr(self, key) is not None:
                raise ValueError(f"{key}: only the in-memory block index (inMemoryConfig) is built here")
        self.logging_interval()

    def logging_interval(self) -> float:
        """Seconds between metric log lines; 0: none (as time.Duration, a bare number is nanoseconds)."""
        v = self.metricsLoggingInterval
        if isinstance(v, bool) or (isinstance(v, int) and v < 0):
            raise ValueError(f"metricsLoggingInterval: expected nanoseconds or a duration, got {v!r}")
        try:
            seconds = v / 1e9 if isinstance(v, int) else parse_duration(v)
        except UnitError as e:
            raise ValueError(f"metricsLoggingInterval: {e}") from None
        return max(seconds, 0.0)


@dataclass(slots=True)
class BackendConfig:
    name: str = ""
    weight: float = bounded(1.0, ge=0)


@dataclass(slots=True)
class IndexerConfig:
    kvBlockIndexConfig: KVBlockIndexConfig = field(default_factory=KVBlockIndexConfig)
    kvCacheBackendConfigs: list[BackendConfig] | None = None
    tokenizersPoolConfig: dict | None = None

    def validate(self) -> None:
        if self.tokenizersPoolConfig is not None:  # the reference's own refusal
            raise ValueError("tokenizersPoolConfig: not supported; configure a token-producer plugin instead")

    def medium_weights(self) -> dict[str, float]:
        if self.kvCacheBackendConfigs is None:
            return dict(DEFAULT_MEDIUM_WEIGHTS)
        return {b.name.lower(): b.weight for b in self.kvCacheBackendConfigs}


@dataclass(slots=True)
class PodDiscoveryConfig:
    # Set: only endpoints whose labels match (and, with podNamespace, in that namespace) are
    # subscribed, as llm-d-kv-cache's pod reconciler filters pods. Unset (""): every endpoint
    # the notification source reports, as the reference picker, which never reads its
    # default "llm-d.ai/inference-serving=true" (its endpoints are the pool's already).
    podLabelSelector: str = ""
    podNamespace: str = ""
    socketPort: int = bounded(DEFAULT_SOCKET_PORT, ge=1, le=65535)
    replaySocketPort: int = 0  # <= 0: no replay socket

    def validate(self) -> None:
        if self.replaySocketPort > 65535:  # socketPort: its bounds
            raise ValueError("replaySocketPort: must be <= 65535")
        try:
            self.selector()
        except ValueError as e:
            raise ValueError(f"podLabelSelector: {e}") from None

    def selector(self) -> LabelSelector:
        return LabelSelector.parse(self.podLabelSelector)


@dataclass(slots=True)
class KVEventsConfig:
    zmqEndpoint: str = ""  # set: bind one SUB socket there; publishers connect to it (global socket mode)
    topicFilter: str = "kv@"
    concurrency: int = bounded(4, gt=0)  # Go's worker shards; no effect in one event loop (logged at start-up)
    engineType: str = "vllm"
    discoverPods: bool = True
    podDiscoveryConfig: PodDiscoveryConfig | None = field(default_factory=PodDiscoveryConfig)

    def validate(self) -> None:
        if self.engineType not in ("", "vllm"):
            raise ValueError(f"engineType: only vllm's KV events are decoded here, got {self.engineType!r}")
        if self.zmqEndpoint and not self.zmqEndpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"zmqEndpoint: expected tcp://host:port, got {self.zmqEndpoint!r}")
        if len(self.topicFilter) > 1024:
            raise ValueError("topicFilter: longer than 1024 characters")


@dataclass(slots=True)
class PrecisePrefixParams:
    tokenProcessorConfig: TokenProcessorConfig | None = None
    indexerConfig: IndexerConfig = field(default_factory=IndexerConfig)
    kvEventsConfig: KVEventsConfig = field(default_factory=KVEventsConfig)
    speculativeIndexing: bool = False
    speculativeTTL: str = ""  # Go duration; "" or <= 0: 2s

    def validate(self) -> None:
        if self.speculativeTTL:
            try:
                parse_duration(self.speculativeTTL)
            except UnitError as e:
                raise ValueError(f"speculativeTTL: {e}") from None

    def speculative_ttl(self) -> float:
        ttl = parse_duration(self.speculativeTTL) if self.speculativeTTL else 0.0
        return ttl if ttl > 0 else DEFAULT_SPECULATIVE_TTL

    def block_size_tokens(self) -> int:
        return (self.tokenProcessorConfig or TokenProcessorConfig()).block_size_tokens()

    def hash_seed(self) -> str:
        return (self.tokenProcessorConfig or TokenProcessorConfig()).hashSeed
