"""Precise prefix-cache data: model servers' KV-cache events and the block index they build.

- wire: decoding of vLLM's event batches (`decode_batch`, `parse_frames`, `WireError`)
- keys: the picker's block keys from token ids (`BlockKeyer`), shared by prompts and events
- index: block key -> endpoints holding it, by medium; longest-prefix match; speculation
- intake: one ZMQ SUB per endpoint, sequence checks, replay or staleness, health

Not wired into configuration or scheduling yet. A precise-prefix-cache producer would own
one `BlockIndex(BlockKeyer(blockSizeTokens, hashSeed), speculative_ttl=...)` and one
`KVEventIntake(index, topic_filter=...)`; subscribe each endpoint as it appears
(`tcp://<address>:<socketPort>`) and unsubscribe it when it goes; per request, compute
`keyer.keys(token_ids, model)` and call `index.match_keys(keys, candidates)` (or
`index.match` for lazy keys), using the approximate guess for endpoints where
`intake.is_precise(name)` is false; after routing, `index.speculate(name, keys)` and
`intake.note_routed(name)`.
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
