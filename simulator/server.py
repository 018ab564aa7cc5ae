"""The HTTP front of one simulated vLLM server (aiohttp), driving an Engine in real time.

Endpoints: POST /v1/completions, /v1/chat/completions (JSON or SSE), GET /v1/models,
/health, /metrics, POST /tokenize, /v1/completions/render, /v1/chat/completions/render,
/v1/messages/render (vLLM's render endpoints: the prompt's token ids), /v1/messages (the
Anthropic Messages API, text content, without streaming, tokenized as vLLM converts it to
chat), /v1/load_lora_adapter, /v1/unload_lora_adapter, /reset_prefix_cache. Prompts are tokenized by the built-in tokenizer, or with --tokenizer by a
model directory's tokenizer.json and chat template (simulator.tokenizer).
Test controls: POST /sim/hang (every other request then waits
until POST /sim/unhang), POST /sim/die (the server closes its port and stops), POST
/sim/kv_events/close (the KV-event publisher closes; requests are still served), GET
/sim/info (pod, labels, counts).

Prefill/decode disaggregation, as vLLM with the NixlConnector behind llm-d's routing
sidecar (llm-d/llm-d-router pkg/sidecar/proxy: chat_completions.go, connector_nixlv2.go):
- any server answers a request whose body has kv_transfer_params.do_remote_decode by
  prefilling it (the engine keeps its blocks for the decoder) and returning vLLM's
  `kv_transfer_params` {do_remote_prefill, do_remote_decode, remote_block_ids,
  remote_engine_id, remote_request_id, remote_host, remote_port, tp_size} in the JSON;
- any server admits kv_transfer_params.do_remote_prefill by pulling the prompt's KV
  (engine: bytes / link bandwidth) instead of computing it, then tells the prefiller
  (POST remote_host:remote_port/sim/nixl/notify, the NIXL notification) to free it;
- a decode or both server receiving `x-prefiller-host-port` (or the newer
  `x-llm-d-prefiller-host-port`; a comma list: the first) acts as the sidecar: it sends
  the prefiller a copy with do_remote_decode, max_tokens 1 (and max_completion_tokens 1
  for chat), stream false, then serves the original request with the prefiller's
  kv_transfer_params and reports the prefiller's cached_tokens in usage. If the prefiller
  cannot be reached, answers an error or omits kv_transfer_params, the request is
  prefilled locally (counted in sim_pd_local_fallbacks_total{reason}); the reference
  sidecar would return the prefiller's error instead. A prefill server has no sidecar.
- E/P/D (simulator.encoder): a decode or both server receiving `x-encoder-hosts-ports` on a
  chat request with multimodal parts first sends each part to an encoder and carries their
  `ec_transfer_params` on; an `--role encode` server answers as an encoder.
- a data-parallel pod's primary port hands a request to the rank named in
  `x-data-parallel-host-port` (simulator.data_parallel; `epp sim --data-parallel-size`).

max_tokens (or max_completion_tokens) defaults to 16 when absent. Output text: in
`random` mode max_tokens one-token words drawn deterministically from the prompt and the
seed (finish_reason "length"; `ignore_eos` is accepted and changes nothing); in `echo`
mode the prompt's own tokens (for chat, the last message's), finish_reason "stop" when
the echo ends before max_tokens. Latencies in the histograms are in simulated seconds."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sys
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from epp.httpbody import read_bounded
from epp.netaddr import join_hostport
from epp.requestcontrol.producers.tokens_messages import messages_to_chat

from . import tokenizer
from .clock import AsyncioClock
from .data_parallel import rank_handler
from .encoder import (
    ENCODERS_HEADER,
    EncoderError,
    encoder_answer,
    encoder_targets,
    fan_out,
    mm_items,
    placeholder_messages,
)
from .engine import Engine, EngineConfig, EngineLoop, EngineRequest, PromptTooLong
from .kv_events import ZmqKVPublisher, topic_for
from .metrics import ServerMetrics

DEFAULT_MAX_TOKENS = 16
ROLES = ("both", "prefill", "decode", "encode")
ROLE_LABEL = "llm-d.ai/role"  # the reference's P/D role label (prefill-filter / decode-filter)
# The sidecar's header naming the prefill endpoint: legacy name first (the sidecar trusts it first).
PREFILLER_HEADERS = ("x-prefiller-host-port", "x-llm-d-prefiller-host-port")
PREFILL_RESPONSE_LIMIT = 1 << 20  # bytes read from a prefiller's answer (one token)
MAX_NOTIFICATIONS_IN_FLIGHT = 256  # NIXL notifications being sent; beyond, counted as failed
NOTIFY_TIMEOUT = 5.0  # wall seconds

# Failure injection: type -> (HTTP status, error type, message), as llm-d-inference-sim.
FAILURES: dict[str, tuple[int, str, str]] = {
    "rate_limit": (429, "RateLimitError", "Rate limit reached for {model}. Please try again later."),
    "invalid_api_key": (401, "AuthenticationError", "Incorrect API key provided."),
    "context_length": (400, "BadRequestError",
                       "This model's maximum context length is {max_model_len} tokens. Please reduce the length "
                       "of the messages."),
    "server_error": (503, "ServiceUnavailableError", "The server is overloaded or not ready yet."),
    "invalid_request": (400, "BadRequestError", "Invalid request: the request could not be processed."),
    "model_not_found": (404, "NotFoundError", "The model `{model}` does not exist."),
}
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


@dataclass
class SimConfig:
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    host: str = "127.0.0.1"
    port: int = 8000
    pod: str = "sim-0"
    labels: dict[str, str] = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=EngineConfig)
    lora_modules: list[str] = field(default_factory=list)
    time_scale: float = 1.0
    seed: int = 0
    mode: str = "random"  # random | echo
    failure_injection_rate: float = 0.0
    failure_types: list[str] = field(default_factory=lambda: list(FAILURES))
    startup_delay: float = 0.0  # wall seconds during which /health answers 503
    kv_events_endpoint: str | None = None  # ZMQ bind address, e.g. tcp://*:5557
    advertise_host: str | None = None  # host in the KV-events topic (default: host; in a pod, its IP)
    kv_events_connect: bool = False  # connect to kv_events_endpoint (e.g. a picker's global socket), not bind
    kv_events_replay_endpoint: str | None = None  # vLLM's replay ROUTER bind address, e.g. tcp://*:5558
    role: str = "both"  # prefill | decode | both: decode and both act as the routing sidecar
    hardware: str | None = None  # simulator.hardware class name (timings already in `engine`)
    prefill_timeout: float = 60.0  # wall seconds the sidecar waits for its prefiller
    tokenizer: str | None = None  # a model directory (tokenizer.json + chat template); None: the built-in one

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not self.prefill_timeout > 0:
            raise ValueError(f"prefill_timeout must be > 0, got {self.prefill_timeout}")
        if self.mode not in ("random", "echo"):
            raise ValueError(f"mode must be 'random' or 'echo', got {self.mode!r}")
        if not 0.0 <= self.failure_injection_rate <= 1.0:
            raise ValueError(f"failure_injection_rate must be in [0, 1], got {self.failure_injection_rate}")
        bad = [t for t in self.failure_types if t not in FAILURES]
        if bad:
            raise ValueError(f"unknown failure type(s) {bad}; known: {sorted(FAILURES)}")
        if self.failure_injection_rate > 0 and not self.failure_types:
            raise ValueError("failure_types is empty but failure_injection_rate > 0")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _ERROR_TYPES.get(status, "BadRequestError")
        self.param = param


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


@dataclass
class _Prompt:
    token_ids: list[int]
    echo_pieces: list[str]  # the text the echo mode answers with, one piece a token; [] in other modes


class _Generation:
    """Collects one request's engine callbacks for its HTTP handler."""

    __slots__ = ("texts", "pieces", "wake", "done", "reason", "first_t", "cached", "last_t", "n", "server", "req",
                 "notify")

    def __init__(self, server: SimServer, pieces: Sequence[str]) -> None:
        self.server = server
        self.pieces = pieces
        self.texts: list[str] = []
        self.wake = asyncio.Event()
        self.done = False
        self.reason = ""
        self.cached = 0
        self.last_t = 0.0
        self.n = 0
        self.req: EngineRequest | None = None
        self.notify: tuple[str, int, str | None, str] | None = None  # prefiller to tell when KV is read

    def on_kv_loaded(self, t: float, nbytes: int, seconds: float) -> None:
        hist = self.server.metrics.hist
        hist["vllm:nixl_xfer_time_seconds"].observe(seconds)
        hist["vllm:nixl_bytes_transferred"].observe(nbytes)
        if self.notify is not None:
            notify, self.notify = self.notify, None
            self.server._notify(*notify)

    def on_first_token(self, t: float, cached: int) -> None:
        self.cached = cached
        self.last_t = t

    def on_token(self, t: float, _tok: int) -> None:
        if self.n:
            self.server.metrics.hist["vllm:inter_token_latency_seconds"].observe(t - self.last_t)
        self.last_t = t
        self.texts.append(self.pieces[self.n])
        self.n += 1
        self.wake.set()

    def on_finish(self, t: float, reason: str) -> None:
        self.done = True
        self.reason = reason
        r = self.req
        self.server.metrics.observe_finished(r.arrival, r.scheduled_at, r.first_token_at, t,
                                             len(r.prompt_token_ids), r.num_output, r.max_tokens)
        self.wake.set()


class SimServer:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.tok = tokenizer.prompt_tokenizer(config.tokenizer)
        self.engine = Engine(config.engine)
        self.metrics = ServerMetrics(config.model, config.pod, config.engine.max_model_len,
                                     config.engine.max_num_batched_tokens)
        self.metrics.cache_config_labels = _cache_config_labels(config.engine)
        self.metrics.role = config.role
        self.metrics.hardware = config.hardware
        self.engine_id = str(uuid.uuid4())  # as vLLM's kv_transfer_config.engine_id
        self._client: aiohttp.ClientSession | None = None
        self._notifications: set[asyncio.Task] = set()
        self.loras: dict[str, str] = {name: name for name in config.lora_modules}  # name -> path
        self._rng = random.Random(config.seed)
        self._hang = asyncio.Event()
        self._hang.set()  # set = not hanging
        self._loop_driver: EngineLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready_at = 0.0
        self.publisher: ZmqKVPublisher | None = None
        self.dead = asyncio.Event()
        self.ranks: dict[str, SimServer] = {}  # on a data-parallel pod's primary: rank host:port -> its server
        self.app = self._build_app()

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, clock: AsyncioClock | None = None) -> None:
        cfg = self.config
        clock = clock or AsyncioClock(time_scale=cfg.time_scale)
        if cfg.kv_events_endpoint:
            topic = topic_for(cfg.advertise_host or cfg.host, cfg.port, cfg.model)
            self.publisher = ZmqKVPublisher(cfg.kv_events_endpoint, topic, connect=cfg.kv_events_connect,
                                            replay_endpoint=cfg.kv_events_replay_endpoint)
            self.engine.on_kv_events = self.publisher.publish
        hist = self.metrics.hist["vllm:iteration_tokens_total"]
        self._loop_driver = EngineLoop(self.engine, clock, on_step=lambda _s, _d, n: hist.observe(n))
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self._client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False)
        site = web.TCPSite(self._runner, cfg.host, cfg.port, reuse_address=True)
        await site.start()
        self._ready_at = time.monotonic() + cfg.startup_delay
        labels = ",".join(f"{k}={v}" for k, v in cfg.labels.items())
        kv = f" kv_events={cfg.kv_events_endpoint}" if cfg.kv_events_endpoint else ""
        hw = f" hardware={cfg.hardware}" if cfg.hardware else ""
        print(f"sim ready: pod={cfg.pod} model={cfg.model} url=http://{cfg.host}:{cfg.port}"
              f" labels={labels or '-'} healthy_after={cfg.startup_delay}s{kv} role={cfg.role}{hw}", flush=True)

    async def stop(self) -> None:
        for req in list(self.engine._requests):
            self.engine.abort(req)
        for task in list(self._notifications):
            task.cancel()
        if self._notifications:
            await asyncio.gather(*self._notifications, return_exceptions=True)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        self._hang.set()
        self.dead.set()

    # ---- app -----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._middleware])
        app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics_page),
            web.post("/tokenize", self.tokenize),
            web.post("/v1/completions/render", self.render_completion),
            web.post("/v1/chat/completions/render", self.render_chat),
            web.post("/v1/messages", self.messages),
            web.post("/v1/messages/render", self.render_messages),
            web.post("/v1/load_lora_adapter", self.load_lora),
            web.post("/v1/unload_lora_adapter", self.unload_lora),
            web.post("/reset_prefix_cache", self.reset_prefix_cache),
            web.post("/sim/hang", self.sim_hang),
            web.post("/sim/unhang", self.sim_unhang),
            web.post("/sim/die", self.sim_die),
            web.post("/sim/kv_events/close", self.sim_close_kv_events),
            web.get("/sim/info", self.sim_info),
            web.post("/sim/nixl/notify", self.sim_nixl_notify),
        ])
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if not request.path.startswith("/sim/") and not self._hang.is_set():
            await self._hang.wait()
        try:
            if self.ranks and not request.path.startswith("/sim/"):  # a data-parallel pod's primary port
                try:
                    handler = rank_handler(self, request.headers, handler)
                except LookupError as e:
                    raise ApiError(400, str(e)) from None
            return await handler(request)
        except ApiError as e:
            self.metrics.rejected[e.status] = self.metrics.rejected.get(e.status, 0) + 1
            return error_response(e.status, e.message, e.type, e.param)
        except web.HTTPException as e:
            if e.status >= 400:
                return error_response(e.status, e.reason)
            raise

    # ---- OpenAI endpoints -----------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit(request)
        prompt = self._completion_prompt(body)
        return await self._generate(request, body, prompt, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit(request)
        prompt = self._chat_prompt(body)
        if self.config.role == "encode":
            return await self._encode(request, body, prompt)
        return await self._generate(request, body, prompt, chat=True)

    async def _admit(self, request: web.Request) -> dict:
        """Body, model and failure-injection checks shared by both completion endpoints."""
        cfg = self.config
        if time.monotonic() < self._ready_at:
            raise ApiError(503, "The server is starting up.")
        body = await _read_json(request)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model must be a string", param="model")
        if model is not None and model != cfg.model and model not in self.loras:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model")
        if cfg.failure_injection_rate and self._rng.random() < cfg.failure_injection_rate:
            kind = self._rng.choice(cfg.failure_types)
            status, type_, msg = FAILURES[kind]
            raise ApiError(status, msg.format(model=model or cfg.model, max_model_len=cfg.engine.max_model_len),
                           type_)
        return body

    def _completion_prompt(self, body: dict) -> _Prompt:
        echo = self.config.mode == "echo"  # the pieces are only read in echo mode
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids, pieces = self.tok.completion(prompt, body.get("add_special_tokens", True) is not False, echo)
            return _Prompt(ids, pieces)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and 0 <= t < self.tok.vocab_size
                                                       for t in prompt):
            return _Prompt(list(prompt), [tokenizer.decode_token(t) or " x" for t in prompt] if echo else [])
        if isinstance(prompt, list) and len(prompt) > 1:
            raise ApiError(400, "prompt: only one prompt per request is supported", param="prompt")
        raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")

    def _chat_prompt(self, body: dict) -> _Prompt:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        try:
            ids, pieces = self.tok.chat(placeholder_messages(messages),
                                        body.get("add_generation_prompt", True) is not False,
                                        echo=self.config.mode == "echo")
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return _Prompt(ids, pieces)

    def _messages_chat(self, body: dict) -> dict:
        """An Anthropic Messages body as the chat body vLLM's /v1/messages serves it with
        (epp/requestcontrol/producers/tokens_messages.py: text content only)."""
        try:
            chat = {"messages": messages_to_chat(body)}
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        if "max_tokens" in body:
            chat["max_tokens"] = body["max_tokens"]
        if body.get("model") is not None:
            chat["model"] = body["model"]
        return chat

    # vLLM's /v1/messages (non-streaming; the Anthropic answer, usage.input_tokens the prompt's count)
    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit(request)
        if body.get("stream") is True:
            raise ApiError(400, "stream: the simulator answers /v1/messages without streaming", param="stream")
        chat = self._messages_chat(body)
        resp = await self._generate(request, chat, self._chat_prompt(chat), chat=True)
        if resp.status != 200:
            return resp
        out = orjson.loads(resp.body)
        choice, usage = out["choices"][0], out["usage"]
        return _json({"id": "msg_" + out["id"].removeprefix("chatcmpl-"), "type": "message", "role": "assistant",
                      "content": [{"type": "text", "text": choice["message"]["content"]}], "model": out["model"],
                      "stop_reason": {"stop": "end_turn", "length": "max_tokens"}.get(choice["finish_reason"],
                                                                                     "end_turn"),
                      "stop_sequence": None,
                      "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}})

    def _max_tokens(self, body: dict, chat: bool) -> int:
        names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        for name in names:
            v = body.get(name)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ApiError(400, f"{name} must be an integer >= 1, got {v!r}", param=name)
            return v
        return DEFAULT_MAX_TOKENS

    async def _generate(self, request: web.Request, body: dict, prompt: _Prompt, chat: bool) -> web.StreamResponse:
        cfg = self.config
        max_tokens = self._max_tokens(body, chat)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be a boolean", param="stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        include_usage = bool(opts.get("include_usage", False))
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, "n: only n=1 is supported", param="n")
        if "ignore_eos" in body and not isinstance(body["ignore_eos"], bool):
            raise ApiError(400, "ignore_eos must be a boolean", param="ignore_eos")
        model = body.get("model") or cfg.model
        lora = model if model != cfg.model else None
        try:  # before any per-token work: max_tokens may be huge
            self.engine.check(len(prompt.token_ids), max_tokens, lora)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
        kv_params = body.get("kv_transfer_params")
        if kv_params is not None and not isinstance(kv_params, dict):
            raise ApiError(400, "kv_transfer_params must be an object", param="kv_transfer_params")
        prefiller_cached: int | None = None
        if chat and cfg.role in ("decode", "both"):
            encoders = encoder_targets(request.headers.getall(ENCODERS_HEADER, []))
            if encoders and mm_items(body):  # the routing sidecar's encode stage (E/P/D)
                body = await self._remote_encode(body, encoders)
        if cfg.role != "prefill" and not (kv_params and kv_params.get("do_remote_decode") is True):
            target = _prefiller_target(request.headers)
            if target is not None:  # the routing sidecar's P/D protocol (NIXL v2)
                kv_params, prefiller_cached = await self._remote_prefill(request, body, target, chat)
        remote_decode = bool(kv_params) and kv_params.get("do_remote_decode") is True
        notify = None
        if kv_params and not remote_decode and kv_params.get("do_remote_prefill") is True:
            notify = _remote_source(kv_params)
            if notify is None:
                self._fallback("invalid_kv_transfer_params")

        if cfg.mode == "echo":
            pieces = prompt.echo_pieces[:max_tokens] or [" "]
            finish = "stop" if len(pieces) < max_tokens else "length"
            out_ids = self.tok.completion("".join(pieces), False, echo=False)[0][: len(pieces)]
        else:
            rng = random.Random(cfg.seed * 1_000_003 + zlib.crc32(repr(prompt.token_ids[-64:]).encode()))
            choices = rng.choices(tokenizer.OUTPUT_VOCAB, k=max_tokens)
            pieces = [t for _, t in choices]
            out_ids = [i for i, _ in choices]
            finish = "length"
        gen = _Generation(self, pieces)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req = EngineRequest(rid, prompt.token_ids, len(pieces), lora=lora, output_token_ids=out_ids,
                            finish_reason=finish, on_first_token=gen.on_first_token, on_token=gen.on_token,
                            on_finish=gen.on_finish, remote_decode=remote_decode,
                            remote_prefill=notify is not None,
                            on_kv_loaded=gen.on_kv_loaded if notify is not None else None)
        gen.req = req
        gen.notify = notify
        try:
            self._loop_driver.submit(req)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="prompt" if not chat else "messages") from None
        try:
            if stream:
                return await self._stream(request, gen, rid, model, chat, include_usage, prefiller_cached)
            while not gen.done:
                await gen.wake.wait()
                gen.wake.clear()
            out = _full_response(rid, model, chat, "".join(gen.texts), gen.reason,
                                 _usage(req, gen.cached if prefiller_cached is None else prefiller_cached))
            if kv_params is not None:
                out["kv_transfer_params"] = self._transfer_params(req) if remote_decode else None
            return _json(out)
        finally:
            if not gen.done:
                self._loop_driver.abort(rid)
            if gen.notify is not None:  # aborted before its KV was read: as vLLM, free the prefiller's now
                notify, gen.notify = gen.notify, None
                self._notify(*notify)

    async def _stream(self, request: web.Request, gen: _Generation, rid: str, model: str, chat: bool,
                      include_usage: bool, prefiller_cached: int | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model}
        sent = 0
        first = True
        while True:
            await gen.wake.wait()
            gen.wake.clear()
            texts = gen.texts
            parts = []
            if chat and first and texts:
                parts.append(_sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}]}))
                first = False
            end = len(texts)
            for i in range(sent, end):
                last = gen.done and i == end - 1
                reason = gen.reason if last else None
                if chat:
                    choice = {"index": 0, "delta": {"content": texts[i]}, "logprobs": None, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": texts[i], "logprobs": None, "finish_reason": reason,
                              "stop_reason": None}
                parts.append(_sse({**head, "choices": [choice]}))
            sent = end
            if gen.done:
                if include_usage:
                    cached = gen.cached if prefiller_cached is None else prefiller_cached
                    parts.append(_sse({**head, "choices": [], "usage": _usage(gen.req, cached)}))
                parts.append(b"data: [DONE]\n\n")
            if parts:
                await resp.write(b"".join(parts))
            if gen.done:
                await resp.write_eof()
                return resp

    # ---- E/P/D disaggregation: the encode stage ------------------------------------

    async def _remote_encode(self, body: dict, encoders: list[str]) -> dict:
        """The sidecar's encode leg: every multimodal part to an encoder; their
        ec_transfer_params ride on in the request (to the prefiller too)."""
        try:
            params = await fan_out(self._client, body, encoders, str(uuid.uuid4()), self.config.prefill_timeout)
        except EncoderError as e:
            raise ApiError(502, str(e)) from None
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return {**body, "ec_transfer_params": params} if params else body

    async def _encode(self, request: web.Request, body: dict, prompt: _Prompt) -> web.Response:
        """An encoder pass: the request runs for one token; the answer names this server's
        encoder-cache entry for each multimodal part."""
        one = {**body, "max_tokens": 1, "stream": False}
        one.pop("max_completion_tokens", None)
        one.pop("stream_options", None)
        out = orjson.loads((await self._generate(request, one, prompt, chat=True)).body)
        cfg = self.config
        out["ec_transfer_params"] = encoder_answer(cfg.advertise_host or cfg.host, cfg.port, self.engine_id, body)
        return _json(out)

    # ---- P/D disaggregation --------------------------------------------------------

    async def _remote_prefill(self, request: web.Request, body: dict, target: str,
                              chat: bool) -> tuple[dict | None, int | None]:
        """The sidecar's prefill leg: ask `target` (host:port) to prefill a one-token copy.
        Returns (its kv_transfer_params, its cached_tokens), or (None, None) after counting
        why the request will be prefilled here instead."""
        url = _prefiller_url(target, request.path)
        if url is None:
            self._fallback("invalid_prefiller")
            return None, None
        pbody = dict(body)
        pbody["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False,
                                       "remote_engine_id": None, "remote_block_ids": None,
                                       "remote_host": None, "remote_port": None}
        pbody["max_tokens"] = 1
        if chat:
            pbody["max_completion_tokens"] = 1
        pbody.pop("min_tokens", None)
        pbody["stream"] = False
        pbody.pop("stream_options", None)
        headers = {"Content-Type": "application/json", "x-request-id": str(uuid.uuid4())}
        try:
            async with self._client.post(url, data=orjson.dumps(pbody), headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.config.prefill_timeout)) as r:
                status = r.status
                raw = await read_bounded(r.content, PREFILL_RESPONSE_LIMIT)
        except TimeoutError:
            self._fallback("prefiller_timeout")
            return None, None
        except (aiohttp.ClientError, OSError, ValueError):
            self._fallback("prefiller_unreachable")
            return None, None
        if status != 200 or raw is None:
            self._fallback("prefiller_error")
            return None, None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict):
            self._fallback("prefiller_error")
            return None, None
        usage = answer.get("usage")
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return params, cached if isinstance(cached, int) and not isinstance(cached, bool) else 0

    def _fallback(self, reason: str) -> None:
        fb = self.metrics.pd_fallbacks
        fb[reason] = fb.get(reason, 0) + 1

    def _transfer_params(self, req: EngineRequest) -> dict | None:
        """vLLM's NixlConnector.request_finished answer for a held prefill."""
        if req.kv_block_ids is None:
            return None
        cfg = self.config
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": req.kv_block_ids,
                "remote_engine_id": self.engine_id, "remote_request_id": req.request_id,
                "remote_host": cfg.advertise_host or cfg.host, "remote_port": cfg.port, "tp_size": 1}

    def _notify(self, host: str, port: int, request_id: str | None, engine_id: str) -> None:
        """Tell the prefiller its blocks were read (fire and forget, bounded)."""
        if request_id is None:
            return  # it frees them when its hold expires
        if len(self._notifications) >= MAX_NOTIFICATIONS_IN_FLIGHT or self._client is None:
            self.metrics.failed_notifications += 1
            return
        task = asyncio.get_running_loop().create_task(self._send_notify(host, port, request_id, engine_id))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _send_notify(self, host: str, port: int, request_id: str, engine_id: str) -> None:
        url = f"http://{join_hostport(host, port)}/sim/nixl/notify"
        try:
            async with self._client.post(url, data=orjson.dumps({"remote_request_id": request_id,
                                                                  "remote_engine_id": engine_id}),
                                         headers={"Content-Type": "application/json"},
                                         timeout=aiohttp.ClientTimeout(total=NOTIFY_TIMEOUT)) as r:
                await r.read()
                ok = r.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            ok = False
        if not ok:
            self.metrics.failed_notifications += 1

    async def sim_nixl_notify(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        rid, engine_id = body.get("remote_request_id"), body.get("remote_engine_id")
        if not isinstance(rid, str) or (engine_id is not None and engine_id != self.engine_id):
            return _json({"released": False})
        released = self._loop_driver.release_transfer(rid) if self._loop_driver is not None else False
        return _json({"released": released})

    async def models(self, request: web.Request) -> web.Response:
        cfg = self.config
        created = int(self.metrics.created)
        data = [{"id": cfg.model, "object": "model", "created": created, "owned_by": "vllm", "root": cfg.model,
                 "parent": None, "max_model_len": cfg.engine.max_model_len}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": path,
                  "parent": cfg.model, "max_model_len": cfg.engine.max_model_len}
                 for name, path in self.loras.items()]
        return _json({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if time.monotonic() < self._ready_at:
            return error_response(503, "The server is starting up.")
        return web.Response(status=200)

    async def metrics_page(self, request: web.Request) -> web.Response:
        text = self.metrics.render(self.engine.stats())
        return web.Response(body=text.encode(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        if "messages" in body:
            prompt = self._chat_prompt(body)
        elif isinstance(body.get("prompt"), str):
            special = body.get("add_special_tokens", True) is not False
            prompt = _Prompt(self.tok.completion(body["prompt"], special, echo=False)[0], [])
        else:
            raise ApiError(400, "tokenize needs 'prompt' (a string) or 'messages'", param="prompt")
        return _json({"count": len(prompt.token_ids), "max_model_len": self.config.engine.max_model_len,
                      "tokens": prompt.token_ids, "token_strs": None})

    # vLLM's render endpoints: the prompt's token ids as a GenerateRequest (a list of one for completions);
    # its sampling_params here carry only max_tokens
    def _generate_request(self, body: dict, prompt: _Prompt) -> dict:
        max_tokens = body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else None
        return {"request_id": f"render-{uuid.uuid4().hex}", "token_ids": prompt.token_ids, "features": None,
                "sampling_params": {"max_tokens": max_tokens}, "model": body.get("model") or self.config.model,
                "stream": False, "stream_options": None, "cache_salt": body.get("cache_salt"), "priority": 0,
                "kv_transfer_params": None}

    async def _render_body(self, request: web.Request) -> dict:
        body = await _read_json(request)
        model = body.get("model")
        if model is not None and model != self.config.model and model not in self.loras:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model")
        return body

    async def render_completion(self, request: web.Request) -> web.Response:
        body = await self._render_body(request)
        return _json([self._generate_request(body, self._completion_prompt(body))])

    async def render_chat(self, request: web.Request) -> web.Response:
        body = await self._render_body(request)
        return _json(self._generate_request(body, self._chat_prompt(body)))

    async def render_messages(self, request: web.Request) -> web.Response:
        body = await self._render_body(request)
        return _json(self._generate_request(body, self._chat_prompt(self._messages_chat(body))))

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
        if name in self.loras or name == self.config.model:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        self.loras[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in self.loras:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name")
        del self.loras[name]
        self.engine.unload_lora(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        if not self.engine.reset_prefix_cache():
            raise ApiError(400, "Failed to reset prefix cache: blocks are in use by running requests.")
        return web.Response(status=200)

    # ---- test controls ---------------------------------------------------------------

    async def sim_hang(self, request: web.Request) -> web.Response:
        self._hang.clear()
        return _json({"hanging": True})

    async def sim_unhang(self, request: web.Request) -> web.Response:
        self._hang.set()
        return _json({"hanging": False})

    async def sim_die(self, request: web.Request) -> web.StreamResponse:
        resp = _json({"dying": True})
        await resp.prepare(request)
        await resp.write_eof()
        asyncio.get_running_loop().create_task(self.stop())
        return resp

    async def sim_close_kv_events(self, request: web.Request) -> web.Response:
        if self.publisher is not None:
            self.engine.on_kv_events = None
            self.publisher.close()
            self.publisher = None
        return _json({"kv_events": False})

    async def sim_info(self, request: web.Request) -> web.Response:
        cfg = self.config
        s = self.engine.stats()
        return _json({"pod": cfg.pod, "labels": cfg.labels, "host": cfg.host, "port": cfg.port, "model": cfg.model,
                      "loras": list(self.loras), "stats": dataclasses.asdict(s),
                      "hanging": not self._hang.is_set(), "role": cfg.role, "hardware": cfg.hardware,
                      "engine_id": self.engine_id, "pd_local_fallbacks": dict(self.metrics.pd_fallbacks)})


async def _read_json(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _prefiller_target(headers) -> str | None:
    """The prefill endpoint a routing sidecar would use: the legacy header first, a
    comma list's first entry."""
    for name in PREFILLER_HEADERS:
        values = headers.getall(name, [])
        if values:
            if len(values) == 1:
                values = values[0].split(",")
            return values[0].strip() or None
    return None


def _prefiller_url(target: str, path: str) -> str | None:
    """http://host:port<path> for a `host:port` (IPv6 in brackets), or None if malformed."""
    target = target.removeprefix("http://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare or len(bare) > 253 or not all(c.isalnum() or c in ".-:_" for c in bare):
        return None
    return f"http://{join_hostport(bare, int(port))}{path}"


def _remote_source(params: dict) -> tuple[str, int, str | None, str] | None:
    """(host, port, request id, engine id) of a do_remote_prefill request's KV source, or
    None if the fields vLLM's NixlConnector needs are missing (it then prefills locally)."""
    host, port, engine = params.get("remote_host"), params.get("remote_port"), params.get("remote_engine_id")
    blocks, rid = params.get("remote_block_ids"), params.get("remote_request_id")
    if not (isinstance(host, str) and host and isinstance(engine, str) and isinstance(blocks, list) and blocks
            and isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
        return None
    return host, port, rid if isinstance(rid, str) else None, engine


def _sse(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _usage(req: EngineRequest, cached: int) -> dict:
    p, c = len(req.prompt_token_ids), req.num_output
    return {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _full_response(rid: str, model: str, chat: bool, text: str, reason: str, usage: dict) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                  "logprobs": None, "finish_reason": reason, "stop_reason": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None,
                  "prompt_logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage}


def _cache_config_labels(e: EngineConfig) -> list[tuple[str, str]]:
    return [("block_size", str(e.block_size)), ("cache_dtype", "auto"), ("calculate_kv_scales", "False"),
            ("cpu_offload_gb", "0"), ("enable_prefix_caching", "True"), ("gpu_memory_utilization", "0.9"),
            ("is_attention_free", "False"), ("num_cpu_blocks", "None"), ("num_gpu_blocks", str(e.num_gpu_blocks)),
            ("num_gpu_blocks_override", "None"), ("prefix_caching_hash_algo", "builtin"),
            ("sliding_window", "None"), ("swap_space", "4"), ("swap_space_bytes", str(4 * 1024 ** 3))]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
