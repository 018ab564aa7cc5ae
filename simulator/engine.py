"""The engine model: a pure, synchronous state machine of one vLLM-style engine.

No clock and no asyncio inside: the caller passes `now` to every call. One batch step
is two calls, so that its effects land at the step's end:

    duration = engine.step(now)        # schedule a batch (admit, allocate KV blocks)
    ...                                # time passes: now + duration
    engine.finish_step(now + duration) # tokens, first-token/finish callbacks, stored blocks

EngineLoop (below) does exactly this on any Clock. Callbacks of an EngineRequest fire
inside finish_step, with the step's end time:
    on_first_token(t, cached_tokens)   once, when the prefill is done
    on_token(t, token_id)              every generated token, the first included
    on_finish(t, finish_reason)        "length" (or req.finish_reason) after max_tokens
An aborted request gets no callback (the caller aborted it).

Scheduling follows vLLM V1: each step first serves running requests in admission order
(one decode token each, or the next prefill chunk), then admits waiting requests FCFS
while there are sequence slots, token budget and KV blocks. A decode that cannot get a
block preempts the most recently admitted running request (it later recomputes). A
waiting request that does not fit in KV blocks stops admission (FCFS); one whose LoRA
adapter has no free slot is skipped and waits.

KV cache: num_gpu_blocks blocks of block_size tokens. A full prompt block is identified
by a 64-bit xxhash chained over (parent hash, its token ids), seeded by the adapter name.
Prompt hashes are computed once at submit. Blocks enter the cache when their tokens have
been computed; unreferenced cached blocks are evicted least-recently-freed first (a
finished request's blocks are freed tail first, so prefixes outlive their tails);
referenced blocks are never evicted. Generated tokens' blocks are not cached.

Default timing (one H100 80GB serving an 8B bf16 model such as Llama-3.1-8B):
- step_overhead 6 ms: a decode step must read the 16 GB of weights; at ~3.35 TB/s HBM
  that is ~4.8 ms, plus launch/sampling/scheduler overhead. Measured vLLM ITL for an 8B
  model on one H100 at low concurrency is ~6-7 ms.
- decode_time_per_seq 0.08 ms: KV reads and per-sequence work; a full batch of 256
  decoding sequences then takes ~26 ms per step, in line with measured ITL under load.
- prefill_time_per_token 50 us: ~16 GFLOP per token for 8B parameters at ~330 TFLOP/s
  effective (a third of the dense bf16 peak), i.e. ~20k prefill tokens/s; a 2,000-token
  prompt takes ~106 ms to first token when nothing is cached.
- num_gpu_blocks 27,000 x 16 tokens (~432k tokens): Llama-3-8B stores 128 KiB of KV per
  token (32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes); with
  gpu_memory_utilization 0.9, ~16 GB weights and activations, ~54 GB remain.
- max_num_seqs 256 and max_num_batched_tokens 8192: vLLM's defaults for online serving
  on an H100; max_model_len 32768; max_loras 1 (vLLM default), lora_load_time 30 ms
  (copying a rank-16 adapter of ~50 MB from host memory and setting it up).
Other accelerators: simulator.hardware (H100, H200, A100 presets).

Prefill/decode disaggregation (vLLM's NixlConnector, as its scheduler sees it):
- remote_decode (the prefill side, kv_transfer_params.do_remote_decode): the request runs
  as usual; when it finishes length-capped its blocks stay pinned (not freed, not
  evictable) until release_transfer(request_id) - the decode side has read them - or
  until kv_hold_time after the finish (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT, 480 s),
  then counted as expired.
- remote_prefill (the decode side, kv_transfer_params.do_remote_prefill): at admission
  the locally cached prefix is reused, blocks for the whole prompt are allocated and the
  rest of the prompt's KV is pulled over the link: (prompt - cached) tokens x
  kv_bytes_per_token / kv_transfer_bandwidth seconds. Transfers into one engine share
  its link FIFO (one NIC per GPU). The request waits meanwhile (counted as waiting, as
  vLLM's WAITING_FOR_REMOTE_KVS), holding no sequence slot; once loaded it runs with
  all but the last prompt token computed (vLLM recomputes that one token to sample the
  first output token), so its prefill costs one token, not the prompt.
  kv_bytes_per_token = 2 (K,V) x num_layers x num_kv_heads x head_dim x kv_dtype_bytes
  = 2 x 32 x 8 x 128 x 2 = 128 KiB for Llama-3.1-8B in bf16. Default link: 40 GB/s, a
  400 Gb/s NDR InfiniBand / ConnectX-7 NIC per H100 (50 GB/s line rate) at ~80%."""

from __future__ import annotations

import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import xxhash

__all__ = [
    "EngineConfig", "EngineRequest", "Engine", "EngineLoop", "EngineStats", "PromptTooLong",
    "BlockStored", "BlockRemoved", "AllBlocksCleared", "KVEvent", "block_hashes",
]


class PromptTooLong(ValueError):
    """The request can never run on this engine (HTTP 400)."""


@dataclass
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int = 27000
    block_size: int = 16
    max_model_len: int = 32768
    max_loras: int = 1
    lora_load_time: float = 0.030
    step_overhead: float = 0.006
    prefill_time_per_token: float = 0.000050
    decode_time_per_seq: float = 0.000080
    # Model shape for the KV size of one token (Llama-3.1-8B, bf16 KV cache).
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    kv_dtype_bytes: int = 2
    kv_transfer_bandwidth: float = 40e9  # bytes/s into this engine (NIXL over RDMA)
    kv_hold_time: float = 480.0  # s a remote-decode prefill keeps its blocks unread

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_loras", "lora_load_time", "step_overhead", "prefill_time_per_token",
                     "decode_time_per_seq", "kv_hold_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "kv_dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.kv_transfer_bandwidth > 0:
            raise ValueError(f"kv_transfer_bandwidth must be > 0, got {self.kv_transfer_bandwidth}")


# Request states (LOADING: waiting for its prompt's KV from a remote prefill)
WAITING, RUNNING, FINISHED, ABORTED, LOADING = 0, 1, 2, 3, 4


@dataclass(eq=False)
class EngineRequest:
    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    lora: str | None = None
    arrival: float | None = None  # set to `now` at submit when None
    # Token ids to "generate" in order; past its end the engine emits token 0.
    output_token_ids: Sequence[int] = ()
    finish_reason: str = "length"
    on_first_token: Callable[[float, int], None] | None = None
    on_token: Callable[[float, int], None] | None = None
    on_finish: Callable[[float, str], None] | None = None
    # Chained prompt block hashes; computed at submit when not given.
    block_hashes: list[int] | None = None
    # P/D disaggregation (see the module docstring).
    remote_decode: bool = False  # prefill side: keep the blocks for a remote decoder
    remote_prefill: bool = False  # decode side: pull the prompt's KV instead of computing it
    on_kv_loaded: Callable[[float, int, float], None] | None = None  # (t, bytes, transfer seconds)

    # Engine-owned state.
    state: int = field(default=WAITING, init=False)
    num_prompt: int = field(default=0, init=False)
    num_computed: int = field(default=0, init=False)
    num_output: int = field(default=0, init=False)
    cached_tokens: int = field(default=0, init=False)
    scheduled_at: float | None = field(default=None, init=False)
    first_token_at: float | None = field(default=None, init=False)
    finished_at: float | None = field(default=None, init=False)
    num_preemptions: int = field(default=0, init=False)
    external_tokens: int = field(default=0, init=False)  # prompt tokens whose KV was pulled (kept)
    kv_bytes: int = field(default=0, init=False)  # bytes pulled
    load_started_at: float | None = field(default=None, init=False)
    load_done_at: float | None = field(default=None, init=False)
    kv_block_ids: list[int] | None = field(default=None, init=False)  # set when held for a remote decoder
    _held: list[int] = field(default_factory=list, init=False, repr=False)  # cached block hashes referenced
    _private: int = field(default=0, init=False, repr=False)  # blocks held outside the cache
    _nblocks: int = field(default=0, init=False, repr=False)  # len(_held) + _private
    _registered: int = field(default=0, init=False, repr=False)  # leading prompt blocks cached or hit


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str = "GPU"
    lora_name: str | None = None
    extra_keys: list[tuple | None] | None = None  # vLLM: one entry per block ((lora_name,) under a LoRA)
    group_idx: int = 0  # KV-cache group


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = "GPU"
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass
class EngineStats:
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    running_lora_adapters: list[str]
    waiting_lora_adapters: list[str]
    max_loras: int
    block_size: int
    num_gpu_blocks: int
    num_requests_received: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_hits_total: int
    prefix_cache_queries_total: int
    prefix_cache_hit_requests_total: int
    request_success_total: dict[str, int]
    num_preemptions_total: int
    lora_loads_total: int
    # P/D disaggregation
    requests_by_role: dict[str, int] = field(default_factory=dict)  # both | prefill | decode
    prompt_tokens_by_source: dict[str, int] = field(default_factory=dict)
    remote_decode_prefills_total: int = 0  # prefills finished and held for a remote decoder
    remote_prefills_total: int = 0  # prompt KV loads completed from a remote prefill
    kv_bytes_received_total: int = 0
    kv_expired_reqs_total: int = 0  # held blocks freed by the timeout, never read
    num_held_transfers: int = 0


def _lora_seed(lora: str | None) -> int:
    return 0 if lora is None else xxhash.xxh64_intdigest(lora.encode())


def block_hashes(token_ids: Sequence[int], block_size: int, lora: str | None = None) -> list[int]:
    """Chained hashes of the full blocks of token_ids: hash_i = xxh64(hash_{i-1} || tokens_i).
    Linear in the prompt; ids are packed once as 32-bit ints."""
    n = len(token_ids) // block_size
    if n == 0:
        return []
    raw = array.array("I", token_ids[: n * block_size]).tobytes()
    step = 4 * block_size
    parent = _lora_seed(lora)
    out = []
    h = xxhash.xxh64_intdigest
    for i in range(n):
        parent = h(parent.to_bytes(8, "little") + raw[i * step:(i + 1) * step])
        out.append(parent)
    return out


class Engine:
    def __init__(self, config: EngineConfig | None = None,
                 on_kv_events: Callable[[list[KVEvent]], None] | None = None) -> None:
        self.config = config or EngineConfig()
        self.on_kv_events = on_kv_events
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._requests: dict[str, EngineRequest] = {}
        self._refs: dict[int, int] = {}  # cached block hash -> reference count
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, least recently freed first
        self._num_free = self.config.num_gpu_blocks  # blocks neither cached nor held
        self._batch: list[tuple[EngineRequest, int]] | None = None
        self._events: list[KVEvent] = []
        self._lora_running: dict[str, int] = {}  # adapter -> running requests using it
        self._lora_resident: OrderedDict[str, None] = OrderedDict()  # loaded in a GPU slot, LRU order
        self._lora_ids: dict[str, int] = {}
        self.last_step_tokens = 0
        # counters
        self.num_requests_received = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefix_cache_hits_total = 0
        self.prefix_cache_queries_total = 0
        self.prefix_cache_hit_requests_total = 0
        self.request_success_total = {"stop": 0, "length": 0, "abort": 0}
        self.num_preemptions_total = 0
        self.lora_loads_total = 0
        # P/D disaggregation
        self._loading: deque[EngineRequest] = deque()  # pulling KV, in completion order (FIFO link)
        self._loaded: deque[EngineRequest] = deque()  # KV pulled, waiting for a slot
        self._link_free_at = 0.0
        # Finished remote-decode prefills keeping their blocks: id -> (request, deadline);
        # bounded by the KV cache (each holds at least one block) and by kv_hold_time.
        self._transfers: OrderedDict[str, tuple[EngineRequest, float]] = OrderedDict()
        self._new_holds: list[tuple[str, float]] = []
        self._next_block_id = 0
        self.requests_by_role = {"both": 0, "prefill": 0, "decode": 0}
        self.prompt_tokens_by_source = {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0}
        self.remote_decode_prefills_total = 0
        self.remote_prefills_total = 0
        self.kv_bytes_received_total = 0
        self.kv_expired_reqs_total = 0

    # ---- requests ---------------------------------------------------------------------

    def submit(self, req: EngineRequest, now: float) -> None:
        self.check(len(req.prompt_token_ids), req.max_tokens, req.lora)
        cfg = self.config
        n_prompt = len(req.prompt_token_ids)
        if req.request_id in self._requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.block_hashes is None:
            req.block_hashes = block_hashes(req.prompt_token_ids, cfg.block_size, req.lora)
        req.arrival = now if req.arrival is None else req.arrival
        req.num_prompt = n_prompt
        req.state = WAITING
        self._requests[req.request_id] = req
        self.waiting.append(req)
        self.num_requests_received += 1
        role = "prefill" if req.remote_decode else "decode" if req.remote_prefill else "both"
        self.requests_by_role[role] += 1

    def check(self, n_prompt: int, max_tokens: int, lora: str | None = None) -> None:
        """Raise PromptTooLong if such a request could never run here."""
        cfg = self.config
        if n_prompt == 0:
            raise PromptTooLong("prompt must contain at least one token")
        if max_tokens < 1:
            raise PromptTooLong(f"max_tokens must be >= 1, got {max_tokens}")
        if n_prompt + max_tokens > cfg.max_model_len:
            raise PromptTooLong(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.")
        if -(-(n_prompt + max_tokens) // cfg.block_size) > cfg.num_gpu_blocks:
            raise PromptTooLong(f"request needs more than the {cfg.num_gpu_blocks} KV cache blocks of this server")
        if lora is not None and cfg.max_loras < 1:
            raise PromptTooLong("LoRA adapters are not enabled on this server (max_loras is 0)")

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; frees its blocks. False if unknown or done."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req.state == WAITING:
            self.waiting.remove(req)
        elif req.state == LOADING:
            (self._loaded if req in self._loaded else self._loading).remove(req)
            self._free(req)
        elif req.state == RUNNING:
            self._free(req)
            self._lora_release(req)
            self.running.remove(req)
        req.state = ABORTED
        self.request_success_total["abort"] += 1
        self._flush_events()
        return True

    def has_work(self) -> bool:
        """Something a step can do now (a pending KV load is not: see next_wakeup)."""
        return bool(self.running or self.waiting or self._loaded)

    def next_wakeup(self) -> float | None:
        """When the next KV load completes, if any is under way."""
        return self._loading[0].load_done_at if self._loading else None

    # ---- P/D: blocks held for a remote decoder ------------------------------------------

    def take_new_holds(self) -> list[tuple[str, float]]:
        """(request id, deadline) of transfers held since the last call (for timers)."""
        out, self._new_holds = self._new_holds, []
        return out

    def release_transfer(self, request_id: str, expired: bool = False) -> bool:
        """Free the blocks a finished remote-decode prefill kept (the decoder read them,
        or the hold timed out). False if unknown or already released."""
        entry = self._transfers.pop(request_id, None)
        if entry is None:
            return False
        self._free(entry[0])
        if expired:
            self.kv_expired_reqs_total += 1
        self._flush_events()
        return True

    def expire_transfers(self, now: float) -> int:
        """Release every held transfer whose deadline has passed. Holds are kept in finish
        order and all last kv_hold_time, so deadlines ascend: the due ones lead (this runs
        every step while any is held)."""
        due = 0
        while self._transfers:
            rid, (_, deadline) = next(iter(self._transfers.items()))
            if deadline > now:
                break
            self.release_transfer(rid, expired=True)
            due += 1
        return due

    @property
    def num_held_transfers(self) -> int:
        return len(self._transfers)

    # ---- one batch step -----------------------------------------------------------------

    def step(self, now: float) -> float | None:
        """Schedule one batch starting at `now`; return its duration, or None if idle.
        Must be followed by finish_step(now + duration) before the next step."""
        if self._batch is not None:
            raise RuntimeError("step() called before finish_step() of the previous step")
        if self._loading:
            self._complete_loads(now)
        if self._transfers:
            self.expire_transfers(now)
        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        batch: list[tuple[EngineRequest, int]] = []
        prefill_tokens = 0
        decode_seqs = 0
        loads = 0

        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed
            remaining = req.num_prompt + req.num_output - computed  # >= 1 for a running request
            decode = remaining == 1 and req.num_output > 0
            chunk = remaining if remaining < budget else budget
            end = computed + chunk
            if end > req._nblocks * bs:
                need = -(-end // bs) - req._nblocks
                preempted_self = False
                while not self._allocate(need):
                    victim = running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is req:
                        preempted_self = True
                        break
                if preempted_self:
                    break
                req._private += need
                req._nblocks += need
            batch.append((req, chunk))
            budget -= chunk
            if decode:
                decode_seqs += 1
            else:
                prefill_tokens += chunk
            i += 1

        if budget > 0 and (self.waiting or self._loaded) and not preempted:  # as vLLM: none after a preemption
            loads, prefill_tokens = self._admit(now, budget, batch, loads, prefill_tokens)

        if not batch:
            self.last_step_tokens = 0
            self._flush_events()
            return None
        self._batch = batch
        self.last_step_tokens = prefill_tokens + decode_seqs
        self._flush_events()
        return (cfg.step_overhead + prefill_tokens * cfg.prefill_time_per_token
                + decode_seqs * cfg.decode_time_per_seq + loads * cfg.lora_load_time)

    def _admit(self, now: float, budget: int, batch: list, loads: int, prefill_tokens: int) -> tuple[int, int]:
        cfg = self.config
        bs = cfg.block_size
        waiting = self.waiting
        loaded = self._loaded
        while loaded and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = loaded[0]  # blocks already allocated: only the last prompt token to compute
            lora = req.lora
            if lora is not None and lora not in self._lora_running and len(self._lora_running) >= cfg.max_loras:
                break
            loaded.popleft()
            if lora is not None:
                loads += self._lora_acquire(lora)
            chunk = min(req.num_prompt + req.num_output - req.num_computed, budget)
            req.state = RUNNING
            self.running.append(req)
            batch.append((req, chunk))
            budget -= chunk
            prefill_tokens += chunk
        skipped: list[EngineRequest] = []
        while waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = waiting[0]
            lora = req.lora
            if lora is not None and lora not in self._lora_running and len(self._lora_running) >= cfg.max_loras:
                skipped.append(waiting.popleft())  # waits for a LoRA slot; others may go ahead
                continue
            if req.remote_prefill and req.load_started_at is None:
                if not self._start_load(req, now):
                    break  # FCFS, as below
                continue
            hit, hit_evictable = self._match(req)
            total = req.num_prompt + req.num_output
            computed = hit * bs
            chunk = min(total - computed, budget)
            need = -(-(computed + chunk) // bs) - hit
            if need > self._num_free + len(self._evictable) - hit_evictable:
                break  # FCFS: nothing behind it is admitted either
            waiting.popleft()
            self._take_blocks(req, hit, need, now)
            if lora is not None:
                loads += self._lora_acquire(lora)
            req.state = RUNNING
            self.running.append(req)
            batch.append((req, chunk))
            budget -= chunk
            prefill_tokens += chunk
        if skipped:
            waiting.extendleft(reversed(skipped))
        return loads, prefill_tokens

    def _start_load(self, req: EngineRequest, now: float) -> bool:
        """Admit a remote-prefill request: reuse the cached prefix, allocate blocks for the
        whole prompt and start pulling the rest over the link. False if it does not fit."""
        cfg = self.config
        bs = cfg.block_size
        hit, hit_evictable = self._match(req)
        need = -(-req.num_prompt // bs) - hit
        if need > self._num_free + len(self._evictable) - hit_evictable:
            return False
        self.waiting.popleft()
        self._take_blocks(req, hit, need, now)  # first admission: counts its prefix-cache lookup
        req.kv_bytes = (req.num_prompt - req.num_computed) * cfg.kv_bytes_per_token
        start = max(now, self._link_free_at)
        req.load_started_at = start
        req.load_done_at = self._link_free_at = start + req.kv_bytes / cfg.kv_transfer_bandwidth
        req.state = LOADING
        self._loading.append(req)
        return True

    def _take_blocks(self, req: EngineRequest, hit: int, need: int, now: float) -> None:
        """Give an admitted request its `hit` cached prefix blocks (referenced) and `need`
        new ones; its cached prefix counts as computed. On its first admission this is its
        prefix-cache lookup (scheduled_at, cached_tokens and the hit counters)."""
        hashes = req.block_hashes
        refs = self._refs
        for h in hashes[:hit]:
            r = refs[h]
            if r == 0:
                del self._evictable[h]
            refs[h] = r + 1
        req._held = list(hashes[:hit])
        req._registered = hit
        self._allocate(need)
        req._private = need
        req._nblocks = hit + need
        computed = hit * self.config.block_size
        req.num_computed = computed
        if req.scheduled_at is None:
            req.scheduled_at = now
            req.cached_tokens = computed
            self.prefix_cache_queries_total += req.num_prompt
            self.prefix_cache_hits_total += computed
            if hit:
                self.prefix_cache_hit_requests_total += 1

    def _complete_loads(self, now: float) -> None:
        emit = self.on_kv_events is not None
        bs = self.config.block_size
        while self._loading and self._loading[0].load_done_at <= now:
            req = self._loading.popleft()
            # As vLLM: the loaded prompt counts as computed except its last token, which
            # is recomputed to sample the first output token.
            req.num_computed = req.num_prompt - 1
            req.external_tokens = req.num_computed - req.cached_tokens
            full = min(req.num_computed // bs, len(req.block_hashes))
            if full > req._registered:
                self._register(req, full, emit)
            self.remote_prefills_total += 1
            self.kv_bytes_received_total += req.kv_bytes
            self._loaded.append(req)
            if req.on_kv_loaded is not None:
                req.on_kv_loaded(req.load_done_at, req.kv_bytes, req.load_done_at - req.load_started_at)

    def finish_step(self, now: float) -> None:
        """Apply the scheduled step's effects at its end time `now` and fire callbacks."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        bs = self.config.block_size
        emit = self.on_kv_events is not None
        finished = False
        generated = 0
        for req, chunk in batch:
            if req.state != RUNNING:
                continue  # aborted or preempted while the step ran
            computed = req.num_computed = req.num_computed + chunk
            if req._registered < len(req.block_hashes):
                full = computed // bs
                if full > req._registered:
                    self._register(req, min(full, len(req.block_hashes)), emit)
            out = req.num_output
            if computed < req.num_prompt + out:
                continue  # prefill chunk, no token yet
            req.num_output = out + 1
            generated += 1
            if out == 0 and req.first_token_at is None:
                req.first_token_at = now
                self.prompt_tokens_total += req.num_prompt
                src = self.prompt_tokens_by_source
                src["local_cache_hit"] += req.cached_tokens
                src["external_kv_transfer"] += req.external_tokens
                src["local_compute"] += req.num_prompt - req.cached_tokens - req.external_tokens
                if req.on_first_token is not None:
                    req.on_first_token(now, req.cached_tokens)
            if req.on_token is not None:
                req.on_token(now, req.output_token_ids[out] if out < len(req.output_token_ids) else 0)
            if out + 1 >= req.max_tokens:
                self._finish(req, now)
                finished = True
        self.generation_tokens_total += generated
        if finished:
            self.running = [r for r in self.running if r.state == RUNNING]
        self._flush_events()

    # ---- KV blocks --------------------------------------------------------------------

    def _match(self, req: EngineRequest) -> tuple[int, int]:
        """Leading prompt blocks cached now (at most all but the last prompt token, which
        must be computed to sample), and how many of those are evictable."""
        refs = self._refs
        limit = (len(req.prompt_token_ids) - 1) // self.config.block_size
        hit = evictable = 0
        for h in req.block_hashes:
            if hit >= limit:
                break
            r = refs.get(h)
            if r is None:
                break
            hit += 1
            if r == 0:
                evictable += 1
        return hit, evictable

    def cached_prefix_blocks(self, token_ids: Sequence[int] | None = None, lora: str | None = None,
                             hashes: Sequence[int] | None = None) -> int:
        """Leading full blocks of this prompt cached now (no LRU side effects). Pass the
        prompt's token ids, or its block_hashes() to avoid rehashing."""
        if hashes is None:
            hashes = block_hashes(token_ids or (), self.config.block_size, lora)
        refs = self._refs
        n = 0
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return n

    def _allocate(self, n: int) -> bool:
        if n <= 0:
            return True
        if n > self._num_free + len(self._evictable):
            return False
        short = n - self._num_free
        if short > 0:
            removed = []
            ev = self._evictable
            refs = self._refs
            for _ in range(short):
                h, _ = ev.popitem(last=False)
                del refs[h]
                removed.append(h)
            self._num_free += short
            if self.on_kv_events is not None:
                self._events.append(BlockRemoved(removed))
        self._num_free -= n
        return True

    def _register(self, req: EngineRequest, full: int, emit: bool) -> None:
        """Cache the prompt blocks req has just completed. A block another request cached
        meanwhile is shared instead: req drops its own copy (no event: nothing new stored)."""
        refs = self._refs
        hashes = req.block_hashes
        run_start = -1
        for i in range(req._registered, full):
            h = hashes[i]
            r = refs.get(h)
            if r is not None:
                if r == 0:
                    del self._evictable[h]
                refs[h] = r + 1
                req._held.append(h)
                req._private -= 1
                self._num_free += 1
                if emit and run_start >= 0:
                    self._stored(req, run_start, i)
                run_start = -1
                continue
            refs[h] = 1
            req._held.append(h)
            req._private -= 1
            if run_start < 0:
                run_start = i
        if emit and run_start >= 0:
            self._stored(req, run_start, full)
        req._registered = full

    def _stored(self, req: EngineRequest, start: int, end: int) -> None:
        bs = self.config.block_size
        hashes = req.block_hashes
        self._events.append(BlockStored(
            block_hashes=hashes[start:end],
            parent_block_hash=hashes[start - 1] if start > 0 else None,
            token_ids=list(req.prompt_token_ids[start * bs:end * bs]),
            block_size=bs,
            lora_id=self._lora_id(req.lora),
            lora_name=req.lora,
            extra_keys=[(req.lora,) if req.lora else None] * (end - start),
        ))

    def _free(self, req: EngineRequest) -> None:
        refs = self._refs
        ev = self._evictable
        for h in reversed(req._held):  # tail first: a prefix outlives its continuations
            r = refs[h] - 1
            refs[h] = r
            if r == 0:
                ev[h] = None
        req._held = []
        self._num_free += req._private
        req._private = 0
        req._nblocks = 0

    def _finish(self, req: EngineRequest, now: float) -> None:
        if req.remote_decode and req.finish_reason == "length" and req._nblocks:
            # vLLM (NixlConnector.request_finished): a length-capped remote-decode prefill
            # keeps its blocks until the decoder has read them or the timeout expires.
            n = req._nblocks
            req.kv_block_ids = [(self._next_block_id + i) % self.config.num_gpu_blocks for i in range(n)]
            self._next_block_id = (self._next_block_id + n) % self.config.num_gpu_blocks
            deadline = now + self.config.kv_hold_time
            self._transfers[req.request_id] = (req, deadline)
            self._new_holds.append((req.request_id, deadline))
            self.remote_decode_prefills_total += 1
        else:
            self._free(req)
        self._lora_release(req)
        req.state = FINISHED
        req.finished_at = now
        self._requests.pop(req.request_id, None)
        reason = req.finish_reason
        self.request_success_total[reason] = self.request_success_total.get(reason, 0) + 1
        if req.on_finish is not None:
            req.on_finish(now, reason)

    def _preempt(self, req: EngineRequest) -> None:
        """Recompute-style preemption: free everything, requeue at the head."""
        self.running.remove(req)
        self._free(req)
        self._lora_release(req)
        req.num_computed = 0
        req._registered = 0
        req.external_tokens = 0  # recomputed locally from here on
        req.state = WAITING
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block; refused (False) while any is referenced."""
        if any(r > 0 for r in self._refs.values()):
            return False
        self._num_free += len(self._refs)
        self._refs.clear()
        self._evictable.clear()
        if self.on_kv_events is not None:
            self._events.append(AllBlocksCleared())
        self._flush_events()
        return True

    def restart(self) -> None:
        """A server restart as far as the KV cache is concerned: running requests start over
        (recomputed, as a preemption), every cached block is dropped and AllBlocksCleared is
        published. RuntimeError if blocks stay referenced (a remote-prefill load or a
        held transfer)."""
        for req in list(self.running):
            self._preempt(req)
        if not self.reset_prefix_cache():
            raise RuntimeError("restart: blocks still referenced after preempting every running request")

    def _flush_events(self) -> None:
        if self._events:
            events, self._events = self._events, []
            if self.on_kv_events is not None:
                self.on_kv_events(events)

    # ---- LoRA ---------------------------------------------------------------------------

    def _lora_id(self, lora: str | None) -> int | None:
        if lora is None:
            return None
        i = self._lora_ids.get(lora)
        if i is None:
            i = self._lora_ids[lora] = len(self._lora_ids) + 1
        return i

    def _lora_acquire(self, lora: str) -> int:
        """Count a running user of `lora`; returns 1 if it had to be loaded into a slot."""
        self._lora_running[lora] = self._lora_running.get(lora, 0) + 1
        resident = self._lora_resident
        if lora in resident:
            resident.move_to_end(lora)
            return 0
        if len(resident) >= self.config.max_loras:
            for name in resident:
                if name not in self._lora_running:
                    del resident[name]
                    break
        resident[lora] = None
        self.lora_loads_total += 1
        return 1

    def _lora_release(self, req: EngineRequest) -> None:
        lora = req.lora
        if lora is None:
            return
        n = self._lora_running.get(lora, 0) - 1
        if n <= 0:
            self._lora_running.pop(lora, None)
        else:
            self._lora_running[lora] = n

    def unload_lora(self, lora: str) -> None:
        """Forget a resident adapter (next use loads it again)."""
        if lora not in self._lora_running:
            self._lora_resident.pop(lora, None)

    # ---- introspection -------------------------------------------------------------------

    @property
    def num_cached_blocks(self) -> int:
        return len(self._refs)

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._refs

    def kv_cache_usage(self) -> float:
        cfg = self.config
        return (cfg.num_gpu_blocks - self._num_free - len(self._evictable)) / cfg.num_gpu_blocks

    def stats(self) -> EngineStats:
        waiting_loras = sorted({r.lora for r in self.waiting if r.lora is not None})
        return EngineStats(
            num_requests_running=len(self.running),
            num_requests_waiting=len(self.waiting) + len(self._loading) + len(self._loaded),
            kv_cache_usage_perc=self.kv_cache_usage(),
            running_lora_adapters=sorted(self._lora_running),
            waiting_lora_adapters=waiting_loras,
            max_loras=self.config.max_loras,
            block_size=self.config.block_size,
            num_gpu_blocks=self.config.num_gpu_blocks,
            num_requests_received=self.num_requests_received,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_hits_total=self.prefix_cache_hits_total,
            prefix_cache_queries_total=self.prefix_cache_queries_total,
            prefix_cache_hit_requests_total=self.prefix_cache_hit_requests_total,
            request_success_total=dict(self.request_success_total),
            num_preemptions_total=self.num_preemptions_total,
            lora_loads_total=self.lora_loads_total,
            requests_by_role=dict(self.requests_by_role),
            prompt_tokens_by_source=dict(self.prompt_tokens_by_source),
            remote_decode_prefills_total=self.remote_decode_prefills_total,
            remote_prefills_total=self.remote_prefills_total,
            kv_bytes_received_total=self.kv_bytes_received_total,
            kv_expired_reqs_total=self.kv_expired_reqs_total,
            num_held_transfers=len(self._transfers),
        )


class EngineLoop:
    """Drives an Engine on any Clock: one step at a time, idle when there is no work,
    woken by submit(), by the end of a KV load, or by a released transfer.
    on_step(start, duration, tokens) observes every step."""

    def __init__(self, engine: Engine, clock, on_step: Callable[[float, float, int], None] | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.on_step = on_step
        self._busy = False  # a step is scheduled or running
        self._step_end = 0.0
        self._timer = None  # idle until a KV load completes
        self._hold_timers: dict[str, object] = {}  # one per held transfer (bounded like them)

    def submit(self, req: EngineRequest) -> None:
        """Raises PromptTooLong for a request the engine can never run."""
        now = self.clock.now()
        self.engine.submit(req, now)
        self._wake()

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def release_transfer(self, request_id: str) -> bool:
        """The decoder has read a held transfer: free its blocks now."""
        handle = self._hold_timers.pop(request_id, None)
        if handle is not None:
            handle.cancel()
        released = self.engine.release_transfer(request_id)
        if released and self.engine.has_work():
            self._wake()
        return released

    def _expire(self, request_id: str) -> None:
        self._hold_timers.pop(request_id, None)
        if self.engine.release_transfer(request_id, expired=True) and self.engine.has_work():
            self._wake()

    def _arm_holds(self) -> None:
        for rid, deadline in self.engine.take_new_holds():
            self._hold_timers[rid] = self.clock.call_at(deadline, lambda rid=rid: self._expire(rid))

    def _wake(self) -> None:
        if not self._busy:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._busy = True
            # Not inline: the submitter may be inside a callback of the engine.
            self.clock.call_at(self.clock.now(), self._start_step)

    def _on_timer(self, wakeup: float) -> None:
        self._timer = None
        # A real-time loop may fire a hair early: the load is done at `wakeup` regardless.
        self._step_end = max(self._step_end, wakeup)
        if not self._busy:
            self._busy = True
            self._start_step()

    def _start_step(self) -> None:
        now = max(self.clock.now(), self._step_end)
        duration = self.engine.step(now)
        if duration is None:
            self._busy = False
            self._arm_holds()
            wakeup = self.engine.next_wakeup()
            if wakeup is not None:
                self._timer = self.clock.call_at(wakeup, lambda: self._on_timer(wakeup))
            return
        if self.on_step is not None:
            self.on_step(now, duration, self.engine.last_step_tokens)
        self._step_end = now + duration
        self.clock.call_at(self._step_end, self._end_step)

    def _end_step(self) -> None:
        self.engine.finish_step(self._step_end)
        self._arm_holds()
        self._start_step()
