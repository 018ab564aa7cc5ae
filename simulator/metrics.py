"""The /metrics page of a simulated vLLM server, in prometheus_client's text format.

Rendered by hand from the engine's counters and a few cheap histograms: a picker
scrapes every 50 ms per server, and several servers share one process on 2 cores, so a
scrape must cost well under a millisecond. Names, labels, types, bucket bounds and the
`_created` families follow vLLM v0.10 (V1 engine); the python_gc_* / process_* families
come from prometheus_client's default registry, rendered at most once per second."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.utils import floatToGoString

from .engine import EngineStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's NixlPromMetrics (vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py)
NIXL_XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
NIXL_BYTES_BUCKETS = tuple(2 ** (10 + i) for i in range(1, 25, 2))  # 2 KiB .. 8 GiB


def buckets_1_2_5(limit: int) -> tuple[float, ...]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to limit."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > limit:
                return tuple(out)
            out.append(v)
        exp += 1


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "created", "static", "text")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.created = time.time()
        self.static: tuple | None = None
        self.text: str | None = None  # rendered page section, until the next observation

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.text = None

    @property
    def count(self) -> int:
        return sum(self.counts)


_fmt = floatToGoString


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _escape(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


# Counters with one series per model: (name without _total, help, the EngineStats field)
_MODEL_COUNTERS = (
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", "num_preemptions_total"),
    ("vllm:prompt_tokens", "Number of prefill tokens processed.", "prompt_tokens_total"),
    ("vllm:generation_tokens", "Number of generation tokens processed.", "generation_tokens_total"),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
     "prefix_cache_queries_total"),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits_total"),
)
# Simulator-only counters with one series per server (labels: model, pod, extra info)
_SIM_COUNTERS = (
    ("sim_prefix_cache_hit_requests", "Requests that reused at least one cached KV block.",
     "prefix_cache_hit_requests_total"),
    ("sim_lora_loads", "LoRA adapter loads into a GPU slot.", "lora_loads_total"),
    ("sim_remote_decode_prefills", "Prefills done for a remote decoder (blocks held for it).",
     "remote_decode_prefills_total"),
    ("sim_remote_prefills", "Requests whose prompt KV was pulled from a remote prefill.", "remote_prefills_total"),
    ("sim_kv_bytes_transferred", "Bytes of prompt KV pulled from remote prefills.", "kv_bytes_received_total"),
)
_HISTOGRAMS = (
    ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step."),
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
    ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request."),
    ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request."),
    ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request."),
    ("vllm:request_prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:request_generation_tokens", "Number of generation tokens processed."),
    ("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens."),
    ("vllm:request_params_n", "Histogram of the n request parameter."),
    ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter."),
    ("vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers."),
    ("vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers."),
)

_runtime_cache: tuple[float, str] = (0.0, "")


def runtime_families() -> str:
    """python_gc_*, python_info and process_* of this process (shared by all replicas)."""
    global _runtime_cache
    now = time.monotonic()
    if now - _runtime_cache[0] > 1.0:
        _runtime_cache = (now, generate_latest(REGISTRY).decode())
    return _runtime_cache[1]


class ServerMetrics:
    """Histograms and sim-specific counters of one server; counters and gauges are read
    from the engine at render time."""

    def __init__(self, model_name: str, pod: str, max_model_len: int, max_num_batched_tokens: int) -> None:
        self.model_name = model_name
        self.pod = pod
        token_buckets = buckets_1_2_5(max_model_len)
        self.hist: dict[str, Histogram] = {
            "vllm:iteration_tokens_total": Histogram(
                [b for b in ITERATION_TOKENS_BUCKETS if b <= max(max_num_batched_tokens, 1)]),
            "vllm:time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
            "vllm:inter_token_latency_seconds": Histogram(ITL_BUCKETS),
            "vllm:e2e_request_latency_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "vllm:request_queue_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "vllm:request_inference_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "vllm:request_prefill_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "vllm:request_decode_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "vllm:request_prompt_tokens": Histogram(token_buckets),
            "vllm:request_generation_tokens": Histogram(token_buckets),
            "vllm:request_max_num_generation_tokens": Histogram(token_buckets),
            "vllm:request_params_n": Histogram(PARAMS_N_BUCKETS),
            "vllm:request_params_max_tokens": Histogram(token_buckets),
            "vllm:nixl_xfer_time_seconds": Histogram(NIXL_XFER_TIME_BUCKETS),
            "vllm:nixl_bytes_transferred": Histogram(NIXL_BYTES_BUCKETS),
        }
        self.created = time.time()
        self.rejected: dict[int, int] = {}  # HTTP status -> count of requests refused
        # lora_requests_info keeps every label set it has shown, like prometheus_client
        # does; the series with the largest value (a timestamp) is the current one.
        self._lora_series: dict[tuple[str, str], float] = {}
        self.cache_config_labels: list[tuple[str, str]] = []
        self.role = "both"  # the server's P/D role: its row of sim_requests_total is always shown
        self.hardware: str | None = None
        # reason -> requests the sidecar prefilled locally; reasons are a fixed set (server.py)
        self.pd_fallbacks: dict[str, int] = {}
        # data-parallel primary: rank host:port -> requests handed to it (bounded by the pod's ranks)
        self.dp_routed: dict[str, int] = {}
        self.failed_notifications = 0

    def observe_finished(self, arrival: float, scheduled: float, first_token: float, finished: float,
                         prompt_tokens: int, generation_tokens: int, max_tokens: int) -> None:
        h = self.hist
        h["vllm:time_to_first_token_seconds"].observe(first_token - arrival)
        h["vllm:e2e_request_latency_seconds"].observe(finished - arrival)
        h["vllm:request_queue_time_seconds"].observe(scheduled - arrival)
        h["vllm:request_inference_time_seconds"].observe(finished - scheduled)
        h["vllm:request_prefill_time_seconds"].observe(first_token - scheduled)
        h["vllm:request_decode_time_seconds"].observe(finished - first_token)
        h["vllm:request_prompt_tokens"].observe(prompt_tokens)
        h["vllm:request_generation_tokens"].observe(generation_tokens)
        h["vllm:request_max_num_generation_tokens"].observe(max_tokens)
        h["vllm:request_params_n"].observe(1)
        h["vllm:request_params_max_tokens"].observe(max_tokens)

    def render(self, s: EngineStats, extra_info: Sequence[tuple[str, str]] = ()) -> str:
        model = (("model_name", self.model_name),)
        ml = _labels(model)
        out: list[str] = []
        add = out.append

        def gauge(name: str, help_: str, value: float, labels: str = ml) -> None:
            add(f"# HELP {name} {help_}\n# TYPE {name} gauge\n{name}{labels} {_fmt(value)}\n")

        def counter(base: str, help_: str, rows: Sequence[tuple[str, float]]) -> None:
            add(f"# HELP {base}_total {help_}\n# TYPE {base}_total counter\n")
            for labels, v in rows:
                add(f"{base}_total{labels} {_fmt(v)}\n")
            add(f"# HELP {base}_created {help_}\n# TYPE {base}_created gauge\n")
            for labels, _ in rows:
                add(f"{base}_created{labels} {_fmt(self.created)}\n")

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.num_requests_running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_requests_waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage_perc)
        gauge("vllm:gpu_cache_usage_perc",
              "GPU KV-cache usage. 1 means 100 percent usage.(DEPRECATED in v0.10: use vllm:kv_cache_usage_perc)",
              s.kv_cache_usage_perc)

        key = (",".join(s.running_lora_adapters), ",".join(s.waiting_lora_adapters))
        series = self._lora_series
        series[key] = time.time()  # vLLM re-sets the current series at every logging interval
        if len(series) > 32:
            del series[min(series, key=series.get)]
        add("# HELP vllm:lora_requests_info Running stats on lora requests.\n"
            "# TYPE vllm:lora_requests_info gauge\n")
        for (running, waiting), ts in series.items():
            labels = _labels((("max_lora", str(s.max_loras)), ("running_lora_adapters", running),
                              ("waiting_lora_adapters", waiting)))
            add(f"vllm:lora_requests_info{labels} {_fmt(ts)}\n")

        gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", 1.0,
              _labels(self.cache_config_labels))

        for name, help_, stat in _MODEL_COUNTERS:
            counter(name, help_, [(ml, getattr(s, stat))])
        counter("vllm:request_success", "Count of successfully processed requests.",
                [(_labels((("finish_reason", r),) + model), v) for r, v in s.request_success_total.items()])
        src = s.prompt_tokens_by_source
        counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                [(_labels(model + (("source", k),)), src.get(k, 0))
                 for k in ("local_compute", "local_cache_hit", "external_kv_transfer")])
        counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
                [(ml, src.get("local_cache_hit", 0) + src.get("external_kv_transfer", 0))])
        counter("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers.", [(ml, 0)])
        counter("vllm:nixl_num_failed_notifications", "Number of failed NIXL KV Cache notifications.",
                [(ml, self.failed_notifications)])
        counter("vllm:nixl_num_kv_expired_reqs",
                "Number of requests that had their KV expire. NOTE: This metric is tracked on the P instance.",
                [(ml, s.kv_expired_reqs_total)])

        for name, help_ in _HISTOGRAMS:
            self._histogram(add, name, help_, self.hist[name], model)

        # Simulator-only series: what this server served, for tests that check routing.
        pod = model + (("pod", self.pod),)
        sim = _labels(pod + tuple(extra_info))
        by_role = s.requests_by_role or {"both": s.num_requests_received}
        if self.role == "encode":  # every pass an encoder's engine runs is an encoder pass
            by_role = {"encode": sum(by_role.values())}
        counter("sim_requests", "Requests this simulated server accepted into its engine, by the role it "
                "played: prefill (for a remote decoder), decode (prompt KV pulled), both (aggregated).",
                [(_labels(pod + (("role", r),) + tuple(extra_info)), v) for r, v in sorted(by_role.items())
                 if v or r == self.role])
        for name, help_, stat in _SIM_COUNTERS:
            counter(name, help_, [(sim, getattr(s, stat))])
        gauge("sim_kv_transfers_held", "Finished remote-decode prefills whose blocks wait to be read.",
              s.num_held_transfers, sim)
        fb = [(_labels(pod + (("reason", r),)), v) for r, v in sorted(self.pd_fallbacks.items())]
        if fb:
            counter("sim_pd_local_fallbacks", "Requests with a prefill endpoint that were prefilled locally.", fb)
        dp = [(_labels(pod + (("rank", r),)), v) for r, v in sorted(self.dp_routed.items())]
        if dp:
            counter("sim_data_parallel_routed", "Requests this data-parallel primary handed to a rank.", dp)
        if self.hardware is not None:
            gauge("sim_hardware_info", "The hardware class whose timings this server simulates.", 1.0,
                  _labels(pod + (("hardware", self.hardware),)))
        rows = [(_labels(model + (("pod", self.pod), ("code", str(c)))), v) for c, v in sorted(self.rejected.items())]
        if rows:
            counter("sim_requests_rejected", "Requests refused with an HTTP error.", rows)
        add(runtime_families())
        return "".join(out)

    @staticmethod
    def _histogram(add, name: str, help_: str, h: Histogram, model: tuple[tuple[str, str], ...]) -> None:
        if h.text is not None:
            add(h.text)
            return
        static = h.static
        if static is None:  # bucket bounds, labels and _created never change: format once
            mv = f'model_name="{_escape(model[0][1])}"'
            static = h.static = (
                f"# HELP {name} {help_}\n# TYPE {name} histogram\n",
                [f'{name}_bucket{{le="{_fmt(b)}",{mv}}} ' for b in h.bounds + (float("inf"),)],
                f"{name}_count{{{mv}}} ", f"{name}_sum{{{mv}}} ",
                f"# HELP {name}_created {help_}\n# TYPE {name}_created gauge\n"
                f"{name}_created{{{mv}}} {_fmt(h.created)}\n",
            )
        head, prefixes, count_prefix, sum_prefix, created = static
        parts = [head]
        acc = 0
        for prefix, c in zip(prefixes, h.counts, strict=True):
            acc += c
            parts.append(f"{prefix}{_count(acc)}\n")
        parts.append(f"{count_prefix}{_count(acc)}\n{sum_prefix}{_fmt(h.sum)}\n{created}")
        h.text = "".join(parts)
        add(h.text)


def _count(n: int) -> str:
    return f"{n}.0" if n < 1_000_000 else _fmt(n)
