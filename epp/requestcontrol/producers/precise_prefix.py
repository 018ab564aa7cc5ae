"""precise-prefix-cache-producer: which prefix blocks each endpoint really holds, from the
model servers' own KV-cache events, published per request as PrefixCacheMatchInfo under
PREFIX_MATCH_INFO.of(<its name>) (the reference's requestcontrol/dataproducer/
preciseprefixcache), for prefix-cache-scorer, prefix-cache-affinity-filter and
inflight-load-producer (`prefixMatchInfoProducerName`).

PrepareData turns the prompt's token ids (TOKEN_IDS, published by token-producer when a
real tokenizer ran or the client sent ids; read from the body when no token-producer ran)
into block keys (kvevents.keys) and looks them up in the block index (kvevents.index). An endpoint's match is the
reference's longest-prefix score: the leading blocks it holds, each at the highest weight
among the tiers holding it (indexerConfig.kvCacheBackendConfigs, default gpu 1.0, cpu
0.8; a speculative entry has no medium, so 1.0 unless a backend is named ""), summed and
truncated to an integer. inMemoryConfig.podCacheSize bounds the (endpoint, tier) entries
per block key (kvevents.index).

Fallback to the approximate guess: the producer also keeps the approximate index
(prefix_index.PrefixIndex over prefix_blocks' text blocks, recorded on every routing
decision, as approx-prefix-cache-producer does). Without token ids the whole match is
the approximate one; an endpoint whose event stream is not `precise` (no batch yet,
disconnected, broken, stale after lost batches, silent after being routed to; see
kvevents.intake) gets its approximate match scaled to the precise block count. A server's
AllBlocksCleared (or its publisher restarting) drops its approximate guess as well.

Events reach the index three ways:
- per endpoint (kvEventsConfig.discoverPods with podDiscoveryConfig, the default): bound
  as an extractor of endpoint-notification-source under dataLayer, each endpoint that
  appears (and matches podLabelSelector and podNamespace when they are set) is
  subscribed at tcp://<address>:<socketPort + data-parallel rank> (and its replay socket
  at replaySocketPort when set) and unsubscribed when it goes;
- global socket (kvEventsConfig.zmqEndpoint): one SUB socket bound there, publishers
  connect to it, and each message's topic kv@<endpoint>@<model> names the endpoint (its
  ip:port, its address, or its name), looked up among the pool's endpoints
  (PluginHandle.endpoints), so events count from the first, before any request;
  with both configured (discoverPods defaults to true, so a zmqEndpoint plus an
  endpoint-notification-source binding), both run side by side as in the reference: an
  endpoint's events count from either, each stream checked on its own (kvevents.intake),
  and its own subscription neither replaces nor clears what the global socket delivered;
- in process, with no ZMQ (the cluster simulation): `feed(endpoint_name, events, model)`
  applies decoded events (kvevents.wire types) and counts that endpoint as precise.

PreRequest records the approximate blocks on each profile's chosen endpoint, tells the
intake that events should follow (silence detection) when the request brings blocks the
endpoint lacks, and with speculativeIndexing marks the request's keys as held by the
primary (and a "prefill" profile's) endpoint for speculativeTTL.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from epp.datalayer.kinds import ENDPOINT_EVENTS
from epp.datalayer.kvevents.index import BlockIndex, PrefixMatch
from epp.datalayer.kvevents.keys import BlockKeyer
from epp.datalayer.kvevents.wire import KVEvent
from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, SchedulingResult
from epp.framework.datakeys import (
    PREFIX_MATCH_INFO,
    TOKEN_IDS,
    TOKENS_CONSUMER,
    PrefixCacheMatchInfo,
    client_token_ids,
)
from epp.framework.metrics import HistogramRecorder
from epp.framework.plugins import ConfiguredPlugin
from epp.labelselector import LabelSelector
from epp.netaddr import bracket
from epp.requestcontrol.producers.precise_prefix_params import PrecisePrefixParams
from epp.requestcontrol.producers.prefix_blocks import (
    CHARS_PER_TOKEN,
    DEFAULT_MAX_PREFIX_BLOCKS,
    block_hashes,
)
from epp.requestcontrol.producers.prefix_index import DEFAULT_LRU_CAPACITY, PrefixIndex

log = logging.getLogger(__name__)

__all__ = ["PrecisePrefixCacheProducer", "PrecisePrefixCacheScorer"]

PREFILL_PROFILE = "prefill"  # the reference's experimentalPrefillProfile: seeded speculatively too
_RANK = re.compile(r"-rank-(\d+)$")


def _rank(endpoint: Endpoint) -> int:
    m = _RANK.search(endpoint.name)
    return int(m.group(1)) if m else 0


def _name_pods(pods: dict[str, str], endpoint: Endpoint) -> None:
    """Record the names a topic may give the endpoint: ip:port, its name, its address
    (for data-parallel rank 0, whose address the other ranks share)."""
    pods[endpoint.hostport] = pods[endpoint.name] = endpoint.name
    if _rank(endpoint) == 0:
        pods.setdefault(endpoint.address, endpoint.name)


class PrecisePrefixCacheProducer(ConfiguredPlugin[PrecisePrefixParams]):
    type_name = "precise-prefix-cache-producer"
    Params = PrecisePrefixParams
    consumes = (TOKENS_CONSUMER,)
    input_kind = ENDPOINT_EVENTS  # an extractor of endpoint-notification-source (dataLayer)

    def configure(self, p: PrecisePrefixParams, handle: PluginHandle) -> None:
        self.params = p
        self.block_size = p.block_size_tokens()
        self.clock = handle.clock
        self.keyer = BlockKeyer(self.block_size, p.hash_seed())
        memory = p.indexerConfig.kvBlockIndexConfig.inMemoryConfig
        self.index = BlockIndex(self.keyer, max_blocks=memory.max_blocks(), max_holders_per_key=memory.podCacheSize,
                                speculative_ttl=p.speculative_ttl(), clock=handle.clock)
        self.index.on_server_cleared = self._drop_guess
        weights = p.indexerConfig.medium_weights()
        # a speculative entry's tier is "" in the reference: weight 1 unless a backend has that name
        self._weights = (weights.get("gpu", 1.0), weights.get("cpu", 1.0), weights.get("", 1.0))
        pods = p.kvEventsConfig.podDiscoveryConfig
        self._selector = pods.selector() if pods is not None else LabelSelector()  # empty: every endpoint
        self._pool = handle.endpoints
        self._pool_seen: Sequence[Endpoint] | None = None
        self._pool_pods: dict[str, str] = {}  # the pool's endpoints as topics name them -> endpoint name
        kb = p.indexerConfig.kvBlockIndexConfig
        self.index_metrics = handle.metrics.shared(_IndexMetrics) if kb.enableMetrics else None
        if self.index_metrics is not None:
            self.index_metrics.producers.append(self)
        self._beat: asyncio.Task | None = None  # metricsLoggingInterval's task
        log.info("%s: kvEventsConfig.concurrency=%d has no effect here: the reference's Go workers apply events "
                 "in parallel shards, while this picker applies each endpoint's stream in order in one event loop, "
                 "where more workers would not run at once", self.name, p.kvEventsConfig.concurrency)
        self.approx = PrefixIndex()
        self.key = PREFIX_MATCH_INFO.of(self.name)
        self._keys = self.own_key("keys", list)
        self._approx_hashes = self.own_key("approx", list)
        self.intake: Any = None  # kvevents.KVEventIntake, made in the event loop at the first subscription
        self._fed: set[str] = set()  # endpoints fed in process (feed): precise without a stream
        self._pods: dict[str, str] = {}  # a global-socket topic's pod part (ip:port, address, name) -> name
        handle.metrics.add_collector(_StreamMetrics(self))

    # ------------------------------------------------------------------ events
    def feed(self, endpoint: str, events: Iterable[KVEvent], model: str = "") -> None:
        """Apply an endpoint's decoded events in process (no ZMQ); it counts as precise."""
        self._fed.add(endpoint)
        self.index.apply(endpoint, events, model)

    def _drop_guess(self, endpoint: str) -> None:
        """The server cleared its cache (AllBlocksCleared, or restarted): the approximate
        guess of what it holds goes too, so a fallback to it (the stream stale or silent
        later) does not score prefixes the server dropped."""
        for ep in self.approx.endpoints():
            if ep.name == endpoint:
                self.approx.purge(ep)

    def is_precise(self, endpoint: str) -> bool:
        return endpoint in self._fed or (self.intake is not None and self.intake.is_precise(endpoint))

    def stream_status(self, endpoint: str) -> tuple[str, float | None]:
        """(status, seconds of lag of its last batch) of an endpoint's event stream."""
        if endpoint in self._fed:
            return "precise", 0.0
        if self.intake is None:
            return "unsubscribed", None
        s, status = self.intake.judged(endpoint)
        return status, None if s is None else s.lag

    def _ensure_intake(self) -> Any:
        if self.intake is None:
            from epp.datalayer.kvevents.intake import KVEventIntake  # pyzmq only when events are subscribed

            cfg = self.params.kvEventsConfig
            self.intake = KVEventIntake(self.index, topic_filter=cfg.topicFilter, clock=self.clock,
                                        resolve=self._resolve_topic)
            if cfg.zmqEndpoint:
                self.intake.bind(cfg.zmqEndpoint)
        return self.intake

    def _resolve_topic(self, pod: str) -> str | None:
        """The endpoint a global-socket topic's pod part names (ip:port, address or name):
        one the data layer told of, else one of the pool's (re-read when the set changes)."""
        name = self._pods.get(pod)
        if name is None:
            pool = self._pool()
            if pool is not self._pool_seen:
                self._pool_seen, self._pool_pods = pool, {}
                for ep in pool:
                    _name_pods(self._pool_pods, ep)
            name = self._pool_pods.get(pod)
        return name

    def _admits(self, endpoint: Endpoint) -> bool:
        """podDiscoveryConfig's podNamespace and podLabelSelector, when set."""
        namespace = self.params.kvEventsConfig.podDiscoveryConfig.podNamespace
        return (not namespace or endpoint.namespace == namespace) and self._selector.matches(endpoint.labels)

    async def start_background(self) -> None:
        """Open the global socket (kvEventsConfig.zmqEndpoint), if configured; log the index
        metrics every metricsLoggingInterval (with enableMetrics)."""
        if self.params.kvEventsConfig.zmqEndpoint:
            self._ensure_intake()
        interval = self.params.indexerConfig.kvBlockIndexConfig.logging_interval()
        if self.index_metrics is not None and interval > 0:
            self._beat = asyncio.create_task(self.index_metrics.log_every(interval), name=f"{self.name} metrics log")

    async def stop_background(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
            self._beat = None
        if self.intake is not None:
            await self.intake.close()
            self.intake = None

    # EndpointExtractor (dataLayer: endpoint-notification-source)
    def extract_endpoint(self, event: str, endpoint: Endpoint) -> None:
        cfg = self.params.kvEventsConfig
        if event == "delete":
            self._forget(endpoint)
            return
        _name_pods(self._pods, endpoint)
        pods = cfg.podDiscoveryConfig
        if cfg.zmqEndpoint:
            self._ensure_intake()
        if not cfg.discoverPods or pods is None or not endpoint.address:
            return
        host = bracket(endpoint.address)
        rank = _rank(endpoint)
        address = f"tcp://{host}:{pods.socketPort + rank}"
        if not self._admits(endpoint):  # relabelled out of the selector: its own subscription ends
            if self.intake is not None and endpoint.name in self.intake.subscribed:
                self.intake.unsubscribe(endpoint.name)
            return
        replay = f"tcp://{host}:{pods.replaySocketPort + rank}" if pods.replaySocketPort > 0 else None
        self._ensure_intake().subscribe(endpoint.name, address, replay_address=replay)

    def _forget(self, endpoint: Endpoint) -> None:
        for pod in (endpoint.hostport, endpoint.name, endpoint.address):
            if self._pods.get(pod) == endpoint.name:
                del self._pods[pod]
        self._fed.discard(endpoint.name)
        if self.intake is not None:
            self.intake.forget(endpoint.name)
        self.index.remove_endpoint(endpoint.name)
        self.approx.purge(endpoint)

    # EndpointsChanged
    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for e in endpoints:
            self._forget(e)

    # ------------------------------------------------------------------ per request
    def match(self, cycle: CycleState, request: InferenceRequest,
              endpoints: Sequence[Endpoint]) -> tuple[list[int], list[int], PrefixCacheMatchInfo]:
        """(block keys when speculativeIndexing needs them, approximate block hashes, the
        match to publish)."""
        bs = self.block_size
        approx_hashes = block_hashes(request.prompt_text, request.target_model, request.cache_salt,
                                     bs * CHARS_PER_TOKEN, DEFAULT_MAX_PREFIX_BLOCKS, partial=True)
        guess = self.approx.match(approx_hashes)[0] if approx_hashes else {}
        # token-producer publishes the client's ids too; read from the body only when none ran
        tokens = cycle.read(TOKEN_IDS) or client_token_ids(request.body)
        if not tokens:
            return [], approx_hashes, PrefixCacheMatchInfo(guess, len(approx_hashes), bs, max(guess.values(), default=0),
                                                           {ep: {"approximate": n} for ep, n in guess.items()})
        total = len(tokens) // bs
        keys: list[int] = []
        try:
            if self.params.speculativeIndexing:  # every key: PreRequest marks them
                keys = self.keyer.keys(tokens, request.target_model)
            # else lazily: the lookup stops at the first block no candidate holds
            started = time.perf_counter()
            found = self.index.match_keys(keys or self.keyer.iter_keys(tokens, request.target_model),
                                          [e.name for e in endpoints]) if total else {}
            if self.index_metrics is not None and total:
                self.index_metrics.lookup(found, time.perf_counter() - started)
        except ValueError:  # a token id outside 32 bits: nothing a server would have cached
            keys, found, total = [], {}, 0
        matches: dict[Endpoint, int] = {}
        media: dict[Endpoint, dict[str, int]] = {}
        for ep in endpoints:
            if self.is_precise(ep.name):
                m = found.get(ep.name)
                if m is None:
                    continue
                n = int(m.weighted(*self._weights))  # the reference's LongestPrefixScorer, truncated
                media[ep] = m.by_tier()
            else:
                n = guess.get(ep, 0) * total // len(approx_hashes) if approx_hashes else 0
                media[ep] = {"approximate": n}
            if n:
                matches[ep] = n
            else:
                del media[ep]
        return keys, approx_hashes, PrefixCacheMatchInfo(matches, total, bs, max(matches.values(), default=0), media)

    # PrepareData
    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest,
                             endpoints: Sequence[Endpoint]) -> None:
        keys, approx_hashes, info = self.match(cycle, request, endpoints)
        cycle.write(self.key, info)
        cycle.write(self._keys, keys)
        cycle.write(self._approx_hashes, approx_hashes)

    # PreRequest
    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes = cycle.read(self._approx_hashes)
        keys = cycle.read(self._keys)
        info = cycle.read(self.key)
        seen: set[int] = set()
        for profile, r in result.profile_results.items():
            if r is None or not r.targets or id(r.targets[0]) in seen:
                continue
            ep = r.targets[0]
            seen.add(id(ep))
            if hashes:
                self.approx.record(ep, hashes, ep.metrics.num_gpu_blocks or DEFAULT_LRU_CAPACITY)
            if self.intake is not None and info is not None and info.matches.get(ep, 0) < info.total_blocks:
                self.intake.note_routed(ep.name)  # new blocks to store: events should follow
            if keys and profile in (result.primary_profile, PREFILL_PROFILE):  # keys: speculativeIndexing
                self.index.speculate(ep.name, keys)

    # ------------------------------------------------------------------ introspection
    def endpoint_status(self, endpoint: Endpoint) -> dict[str, str]:
        """The endpoint's event stream and the lag of its last batch (`epp endpoints`)."""
        if self.intake is None and not self._fed:
            return {}
        status, lag = self.stream_status(endpoint.name)
        return {"kv-events": status} | ({"kv-events-lag": f"{lag:.3f}s"} if lag is not None else {})


class PrecisePrefixCacheScorer(PrecisePrefixCacheProducer):
    """The reference's deprecated precise-prefix-cache-scorer: a precise-prefix-cache-producer
    and a prefix-cache-scorer (default parameters) behind one type. When a
    precise-prefix-cache-producer is already configured, it only scores from that one's
    match and ignores its own parameters, as the reference does."""

    type_name = "precise-prefix-cache-scorer"

    def __init__(self, name: str, params: PrecisePrefixParams | None, handle: PluginHandle) -> None:
        peer = next((p for p in handle.plugins.values() if type(p) is PrecisePrefixCacheProducer), None)
        log.warning("%s: precise-prefix-cache-scorer is deprecated; configure precise-prefix-cache-producer "
                    "and prefix-cache-scorer with prefixMatchInfoProducerName", name)
        if peer is not None:
            log.warning("%s: scoring from the configured %s; its own parameters are ignored", name, peer.name)
            self.name = name
            self.peer = peer
            self.key = peer.key
            return
        self.peer = None
        super().__init__(name, params, handle)

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        m = cycle.read(self.key)
        return m.scores(endpoints) if m is not None else [0.0] * len(endpoints)

    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest,
                             endpoints: Sequence[Endpoint]) -> None:
        if self.peer is None:
            super().prepare_request_data(cycle, request, endpoints)

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if self.peer is None:
            super().pre_request(cycle, request, result)

    def extract_endpoint(self, event: str, endpoint: Endpoint) -> None:
        if self.peer is None:
            super().extract_endpoint(event, endpoint)

    def endpoint_status(self, endpoint: Endpoint) -> dict[str, str]:
        return super().endpoint_status(endpoint) if self.peer is None else {}

    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        if self.peer is None:
            super().endpoints_removed(endpoints)

    async def start_background(self) -> None:
        if self.peer is None:
            await super().start_background()

    async def stop_background(self) -> None:
        if self.peer is None:
            await super().stop_background()


class _StreamMetrics:
    """Per-endpoint event-stream metrics, read at scrape time (bounded by the endpoints):
    the reference's llm_d_epp_kv_cache_events_* names where it has them, labelled
    pod_identifier; lag, drops and status are this picker's own."""

    def __init__(self, producer: PrecisePrefixCacheProducer) -> None:
        self.producer = producer

    def describe(self) -> list:
        return []  # several producers may report the same families

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        intake = self.producer.intake
        judged = list(intake.judged_all().values()) if intake is not None else []
        pre = "llm_d_epp_kv_cache_events_"
        active = GaugeMetricFamily(pre + "active_subscribers", "Number of active KV-events subscribers.",
                                   value=len(judged))
        received = CounterMetricFamily(pre + "messages_received", "KV-event batches applied, per endpoint.",
                                       labels=["pod_identifier"])
        reconnects = CounterMetricFamily(pre + "subscriber_reconnections",
                                         "KV-events stream disconnections, per endpoint.", labels=["pod_identifier"])
        dropped = CounterMetricFamily(pre + "dropped_batches",
                                      "KV-event batches lost (queue bound, gaps not replayed, undecodable), "
                                      "per endpoint.", labels=["pod_identifier"])
        lag = GaugeMetricFamily(pre + "lag_seconds", "Seconds from a batch's timestamp to its application, "
                                "last batch, per endpoint.", labels=["pod_identifier"])
        precise = GaugeMetricFamily(pre + "stream_precise", "1 when the endpoint's event stream is trusted for "
                                    "scoring, 0 when scoring falls back to the approximate guess.",
                                    labels=["pod_identifier"])
        # each subscription's queue, and the global socket's (it queues before routing)
        queues = [*intake.subscribed.values(), *filter(None, [intake.global_stream])] if intake is not None else []
        depth = GaugeMetricFamily(pre + "pool_queue_depth", "KV-event messages received and not yet applied, "
                                  "all endpoints.", value=sum(s.queued for s in queues))
        for s, status in judged:
            labels = [s.endpoint]
            received.add_metric(labels, s.batches)
            reconnects.add_metric(labels, s.disconnects)
            dropped.add_metric(labels, s.missed)
            if s.lag is not None:
                lag.add_metric(labels, s.lag)
            precise.add_metric(labels, 1.0 if status == "precise" else 0.0)
        return [active, received, reconnects, dropped, lag, precise, depth]


_INDEX_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # Go's prometheus.DefBuckets
_INDEX_COUNTERS = (  # (name after llm_d_epp_kv_cache_index_ and kvcache_index_, help)
    ("admissions", "Block keys added to the precise index (stored by events or speculatively)."),
    ("evictions", "Entries taken out of the precise index (removed block hashes, expired speculative entries)."),
    ("lookup_requests", "Lookups of a prompt's block keys in the precise index."),
    ("max_pod_hit_count", "Summed per lookup: the longest run of leading blocks one endpoint holds."),
    ("lookup_hits", "Summed per lookup: the leading blocks matched by the best endpoint."),
)


class _IndexMetrics:
    """The precise index's metrics with indexerConfig.kvBlockIndexConfig.enableMetrics
    (llm-d-kv-cache's instrumented index): llm_d_epp_kv_cache_index_* and the deprecated
    kvcache_index_* aliases. One per registry, summed over the producers using it;
    admissions and evictions are read from the indexes' counters when scraped."""

    def __init__(self) -> None:
        self.producers: list[PrecisePrefixCacheProducer] = []
        self.lookups = 0
        self.hits = 0
        self.latency = HistogramRecorder("", "", _INDEX_LATENCY_BUCKETS)

    def lookup(self, found: Mapping[str, PrefixMatch], seconds: float) -> None:
        self.lookups += 1
        self.hits += max((m.blocks for m in found.values()), default=0)
        self.latency.observe(seconds)

    def values(self) -> dict[str, float]:
        stats = [p.index.stats for p in self.producers]
        return {"admissions": sum(s.stored_blocks + s.speculated_blocks for s in stats),
                "evictions": sum(s.removed_hashes + s.speculative_expired for s in stats),
                "lookup_requests": self.lookups, "max_pod_hit_count": self.hits, "lookup_hits": self.hits}

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        values = self.values()
        out: list[Any] = []
        for what, doc in _INDEX_COUNTERS:
            out.append(CounterMetricFamily(f"llm_d_epp_kv_cache_index_{what}", doc, value=values[what]))
            out.append(CounterMetricFamily(f"kvcache_index_{what}", f"Deprecated: see llm_d_epp_kv_cache_index_"
                                           f"{what}_total. {doc}", value=values[what]))
        buckets, total = self.latency.cumulative(), self.latency._sum  # noqa: SLF001 - read only
        doc = "Seconds per lookup in the precise index (key computation included)."
        out.append(HistogramMetricFamily("llm_d_epp_kv_cache_index_lookup_latency_seconds", doc, buckets=buckets,
                                         sum_value=total))
        out.append(HistogramMetricFamily("kvcache_index_lookup_latency_seconds", "Deprecated: see "
                                         "llm_d_epp_kv_cache_index_lookup_latency_seconds. " + doc, buckets=buckets,
                                         sum_value=total))
        return out

    async def log_every(self, interval: float) -> None:
        """metricsLoggingInterval: one line of the index metrics every interval."""
        while True:
            await asyncio.sleep(interval)
            v = self.values()
            count = self.latency.cumulative()[-1][1]
            total = self.latency._sum  # noqa: SLF001 - read only
            log.info("kv-block index metrics: admissions=%d evictions=%d lookups=%d hits=%d max_pod_hit_count=%d "
                     "latency_count=%d latency_sum=%.6f latency_avg=%.6f", v["admissions"], v["evictions"],
                     v["lookup_requests"], v["lookup_hits"], v["max_pod_hit_count"], count, total,
                     total / count if count else 0.0)
