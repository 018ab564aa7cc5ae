"""token-producer (the reference's requestcontrol/dataproducer/tokenizer): tokenizes the
request's prompt once per request and publishes the count under TOKENIZED_PROMPT (for
inflight-load-producer and the like) and, when a real tokenizer ran, the token ids under
TOKEN_IDS (for the precise prefix cache). Backends, one per instance:

- `estimate` (no backend set, no modelName): 4 bytes of the prompt per token, the last one
  padded (ceil(bytes / 4)), the reference's estimate.go; no ids are published.
- `vllm` (or `modelName` alone when the model's tokenizer is not on this machine): vLLM's
  render endpoints, the reference's vllm_http.go (tokens_render.py). PrepareData is
  synchronous, so the call is made in the director's asynchronous step before the cycle
  (`prefetch_request_data`), bounded by `vllm.timeout` (chat and messages: the larger of it
  and `vllm.mmTimeout`); rendered ids are cached (bounded), so a repeated body is rendered
  once. A slow or failing render falls back to the estimate for that request (no ids),
  counted and logged. Anthropic Messages bodies follow `vllm.messagesRenderMode`
  (tokens_render.MessagesMode: /v1/messages/render, or converted to chat).
- `inProcess` (this project's; also `modelName` alone when its tokenizer is in the Hugging
  Face cache, and the reference's `udsTokenizerConfig`, whose tokenizer sidecar we replace
  by the same files loaded here): the `tokenizers` library in process (tokens_local.py),
  no I/O at request time. The director's asynchronous step renders the prompt (chat
  template) and encodes a long piece not seen before by the library's own threads, so the
  event loop is not held by it; PrepareData then encodes that rendered prompt, every long
  piece found cached (a repeated system prompt is encoded once), the template not rendered
  again.

Token ids the client sent (datakeys.client_token_ids: completions with a token-id prompt,
embeddings, generate) are published as they are by every backend, the estimate's too (as
the reference's backends pass them through), counted as outcome `client_ids`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import TOKEN_IDS, TOKENIZED_PROMPT, client_token_ids
from epp.framework.plugins import ConfiguredPlugin

from .tokens_local import LocalTokenizer, TokenizerError, find_tokenizer_dir
from .tokens_messages import messages_to_chat
from .tokens_params import TokenProducerParams
from .tokens_render import (
    LEGACY_WARNING,
    RENDER_PATHS,
    MessagesMode,
    RenderClient,
    RenderError,
    render_key,
)

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4
PREFETCHED_MAX = 4096  # bound: requests whose asynchronous step's result waits for their PrepareData
PREFETCHED_MAX_UNITS = 2_000_000  # bound: token ids plus prompt characters those results hold, in all (~72 MB of ids)
FAILURE_LOG_INTERVAL = 30.0  # seconds between repeated render-failure warnings
_NOT_PREFETCHED = object()
OUTCOMES = ("client_ids", "tokenized", "rendered", "render_cached", "estimated", "fallback_timeout", "fallback_error")


def estimate_tokens(request: InferenceRequest) -> int:
    """The prompt's token count by the estimate (the client's token ids are published instead)."""
    n = len(request.prompt_text.encode("utf-8", "surrogatepass"))
    return -(-n // BYTES_PER_TOKEN)


def load_local_tokenizer(p: TokenProducerParams, backend: str) -> LocalTokenizer | None:
    """The in-process tokenizer the parameters name (None when `auto` finds none). Raises ValueError."""
    where, path, hub = "inProcess.path", "", ""
    if backend == "inProcess" and p.inProcess is not None:
        path, hub = p.inProcess.path, p.inProcess.hfCacheDir
    elif backend == "uds" and p.udsTokenizerConfig is not None:
        uds = p.udsTokenizerConfig
        path = (uds.modelTokenizerMap or {}).get(p.modelName, "")
        hub, where = uds.tokenizersCacheDir, "udsTokenizerConfig.modelTokenizerMap"
    directory = find_tokenizer_dir(path, p.modelName, hub)
    if directory is None:
        if backend == "auto":
            return None
        sidecar = " (this picker loads the UDS sidecar's tokenizer files in process; it does not call the " \
                  "socket)" if backend == "uds" else ""
        raise ValueError(f"{where}: no tokenizer.json for model {p.modelName!r} at {path or 'the Hugging Face cache'}"
                         f"{sidecar}")
    try:
        tok = LocalTokenizer.load(directory)
        tok.require_chat_template()
    except TokenizerError as e:
        if backend == "auto":  # e.g. a chat template only vLLM renders: the reference's default backend then
            log.info("%s: not tokenizing in process: %s", where, e)
            return None
        raise ValueError(f"{where}: {e}") from None
    return tok


class TokenProducer(ConfiguredPlugin[TokenProducerParams]):
    type_name = "token-producer"
    Params = TokenProducerParams

    def configure(self, p: TokenProducerParams, handle: PluginHandle) -> None:
        name = self.name
        self.key = TOKENIZED_PROMPT.of(name)
        self.ids_key = TOKEN_IDS.of(name)
        self.model = p.modelName
        self.clock = handle.clock
        backend = p.backend()
        self.local: LocalTokenizer | None = None
        self.render: RenderClient | None = None
        self.messages_mode: MessagesMode | None = None
        self._probe_task: asyncio.Task[None] | None = None
        if backend in ("inProcess", "uds", "auto"):
            self.local = load_local_tokenizer(p, backend)
            if backend == "uds":
                log.info("%s: udsTokenizerConfig is deprecated in the reference; its tokenizer files are loaded in "
                         "process from %s (the socket %s is not used)", name, self.local.source,
                         p.udsTokenizerConfig.socketFile if p.udsTokenizerConfig else "")
        if backend == "vllm" or (backend == "auto" and self.local is None):
            self.render = RenderClient(p.render_settings())
            self.messages_mode = MessagesMode(self.render.settings.messages_mode, self.render, p.modelName)
            if self.messages_mode.mode == "legacy":
                log.warning("%s: vllm.messagesRenderMode legacy%s", name, LEGACY_WARNING)
            if backend == "auto":
                log.info("%s: no local tokenizer for %r, rendering with vLLM at %s", name, p.modelName,
                         self.render.base)
            self.prefetch_request_data = self._prefetch  # the director awaits this before the cycle
        self.backend = "vllm" if self.render is not None else "inProcess" if self.local is not None else "estimate"
        if self.backend == "inProcess":
            self.prefetch_request_data = self._warm  # long uncached pieces are encoded off the event loop
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.tokens_published = 0
        # what the asynchronous step made of a request, until its PrepareData takes it (normally
        # the same event-loop turn; a cycle that fails before PrepareData leaves it to the bounds):
        # id(request) -> (the request, its size, rendered ids or a fallback outcome (vllm), the
        # rendered prompt or None when it cannot be rendered (inProcess)). Keyed by the request
        # object, not its id header, which two clients may send alike.
        self._prefetched: OrderedDict[int, tuple[InferenceRequest, int, Any]] = OrderedDict()
        self._prefetched_units = 0
        self._last_warning = float("-inf")
        m = handle.metrics
        me = {"plugin_name": name, "plugin_type": self.type_name}
        for outcome in OUTCOMES:
            m.gauge("epp_token_producer_requests", "Requests token-producer handled, by outcome (a count).",
                    lambda o=outcome: self.counts[o], {**me, "outcome": outcome})
        m.gauge("epp_token_producer_published_tokens", "Token ids token-producer published, from a real tokenizer "
                "or as the client sent them (a count).", lambda: self.tokens_published, me)

    # ------------------------------------------------------------------ vllm: the async step
    async def start_background(self) -> None:
        """vllm.messagesRenderMode auto: probe the render service once at start, in the background
        (with VLLM_API_KEY as a Bearer token when set, as the reference's warmup)."""
        if self.messages_mode is not None and not self.messages_mode.mode and self._probe_task is None:
            key = os.environ.get("VLLM_API_KEY", "")
            self._probe_task = asyncio.create_task(self.messages_mode.probe_at_start(f"Bearer {key}" if key else ""),
                                                   name=f"{self.name} messages render probe")

    def _render_target(self, request: InferenceRequest) -> tuple[str, Mapping[str, Any], str] | None:
        """(render kind, body, model) of the request, or None when nothing is rendered for it.
        Raises TokenizerError for a Messages body the legacy conversion cannot take."""
        body = request.body
        if request.kind not in RENDER_PATHS or not isinstance(body, Mapping) or client_token_ids(body) is not None:
            return None
        if request.kind == "messages" and self.messages_mode is not None and self.messages_mode.mode == "legacy":
            return "chat", {"messages": messages_to_chat(body)}, self.model  # as the reference: modelName
        return request.kind, body, request.target_model or self.model

    async def _prefetch(self, request: InferenceRequest) -> None:
        """Render the request's prompt (or find it cached) before the cycle; never raises."""
        if self.render is None or request.kind not in RENDER_PATHS:
            return
        auth = request.headers.get("authorization", "")
        kind = request.kind
        try:
            if kind == "messages" and self.messages_mode is not None:
                await self.messages_mode.resolve(auth)  # at once once known; else one probe, shared
            target = self._render_target(request)
            if target is None:
                return
            kind, body, model = target
            key = render_key(kind, body, model)
            ids = self.render.cache.get(key)
            if ids is not None:
                outcome: tuple[int, ...] | str = ids
                self.counts["render_cached"] += 1
            else:
                outcome = await self.render.render(kind, body, model, auth, key)
                self.counts["rendered"] += 1
        except TimeoutError:
            outcome = "fallback_timeout"
            self._warn(f"render timed out after {self.render.timeout_for(kind)}s")
        except (RenderError, TokenizerError) as e:
            outcome = "fallback_error"
            self._warn(str(e))
        self._keep(request, outcome, len(outcome) if isinstance(outcome, tuple) else 0)

    def _keep(self, request: InferenceRequest, prefetched: Any, size: int = 0) -> None:
        """Hold the asynchronous step's result for the request's PrepareData; `size` counts
        its token ids or prompt characters against PREFETCHED_MAX_UNITS."""
        self._take(request)  # a second prefetch of the same request replaces the first
        self._prefetched[id(request)] = (request, size, prefetched)
        self._prefetched_units += size
        while len(self._prefetched) > PREFETCHED_MAX or self._prefetched_units > PREFETCHED_MAX_UNITS:
            _, (_, old, _) = self._prefetched.popitem(last=False)
            self._prefetched_units -= old

    def _take(self, request: InferenceRequest) -> Any:
        """The request's held result (taken), or _NOT_PREFETCHED."""
        held = self._prefetched.pop(id(request), None)  # the entry holds the request: its id is not reused
        if held is None:
            return _NOT_PREFETCHED
        self._prefetched_units -= held[1]
        return held[2]

    async def _warm(self, request: InferenceRequest) -> None:
        """Render the request's prompt once, its long new pieces encoded off the event loop."""
        body = request.body
        if self.local is not None and isinstance(body, Mapping) and client_token_ids(body) is None:
            try:
                prompt = await self.local.warm(request.kind, body)
            except TokenizerError:
                prompt = None  # PrepareData falls back to the estimate for it
            self._keep(request, prompt, len(prompt[0]) if prompt is not None else 0)

    def _warn(self, message: str) -> None:
        now = self.clock()
        if now - self._last_warning >= FAILURE_LOG_INTERVAL:
            self._last_warning = now
            log.warning("%s: falling back to the token estimate: %s", self.name, message)

    def _rendered(self, request: InferenceRequest) -> tuple[int, ...] | None:
        outcome = self._take(request)
        if isinstance(outcome, tuple):
            return outcome
        if isinstance(outcome, str):
            self.counts[outcome] += 1
            return None
        try:
            target = self._render_target(request)  # not prefetched (explain): only what is cached
        except TokenizerError:
            return None
        if target is None or self.render is None:
            return None
        ids = self.render.cache.get(render_key(*target))
        if ids is not None:
            self.counts["render_cached"] += 1
        return ids

    # ------------------------------------------------------------------ PrepareData
    def token_ids(self, request: InferenceRequest) -> tuple[int, ...] | None:
        """The prompt's token ids from the configured tokenizer, or None (estimate)."""
        body = request.body if isinstance(request.body, Mapping) else None
        if self.render is not None:
            return self._rendered(request)
        if self.local is not None and body is not None:
            prompt = self._take(request)
            if prompt is _NOT_PREFETCHED:  # (explain) rendered here
                try:
                    prompt = self.local.prompt(request.kind, body)
                except TokenizerError:
                    return None
            if prompt is not None:
                self.counts["tokenized"] += 1
                return tuple(self.local.encode(*prompt))
        return None

    async def stop_background(self) -> None:
        """The server's shutdown: stop the start-up probe, close the render service's HTTP session."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        if self.render is not None:
            await self.render.close()

    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest,
                             endpoints: Sequence[Endpoint]) -> None:
        ids = client_token_ids(request.body)
        if ids is not None:
            ids = tuple(ids)
            self.counts["client_ids"] += 1
        elif self.backend != "estimate":
            ids = self.token_ids(request)
        if ids is None:
            self.counts["estimated"] += 1
            cycle.write(self.key, estimate_tokens(request))
            return
        self.tokens_published += len(ids)
        cycle.write(self.ids_key, ids)
        cycle.write(self.key, len(ids))
