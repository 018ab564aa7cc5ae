"""Precise prefix-cache data: model servers' KV-cache events and the block index they build.

- wire: decoding of vLLM's event batches (`decode_batch`, `parse_frames`, `WireError`)
- keys: the picker's block keys from token ids (`BlockKeyer`), shared by prompts and events
- index: block key -> endpoints holding it, by medium; longest-prefix match; speculation
- intake: one ZMQ SUB per endpoint, sequence checks, replay or staleness, health

Wired by precise-prefix-cache-producer (epp/requestcontrol/producers/precise_prefix.py):
it owns one `BlockIndex(BlockKeyer(blockSizeTokens, hashSeed), speculative_ttl=...)` and
one `KVEventIntake(index, topic_filter=...)`, subscribes each endpoint as it appears
(`tcp://<address>:<socketPort>`) and/or binds the global socket (`intake.bind(zmqEndpoint)`),
and per request matches `keyer.keys(token_ids, model)` with `index.match_keys`, using the
approximate guess for endpoints where `intake.is_precise(name)` is false.
"""

from epp.datalayer.kvevents.index import BlockIndex, IndexStats, PrefixMatch
from epp.datalayer.kvevents.intake import EndpointStream, KVEventIntake
from epp.datalayer.kvevents.keys import ALGORITHMS, BlockKeyer
from epp.datalayer.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    Limits,
    WireError,
    decode_batch,
    parse_frames,
)

__all__ = [
    "ALGORITHMS",
    "AllBlocksCleared",
    "BlockIndex",
    "BlockKeyer",
    "BlockRemoved",
    "BlockStored",
    "EndpointStream",
    "EventBatch",
    "IndexStats",
    "KVEvent",
    "KVEventIntake",
    "Limits",
    "PrefixMatch",
    "WireError",
    "decode_batch",
    "parse_frames",
]
