"""The vllm backend of token-producer: vLLM's render endpoints over HTTP (the reference's
tokenizer/vllm_http.go). A completions body goes to POST /v1/completions/render, which
answers a JSON list of vLLM GenerateRequest objects; a chat body to
POST /v1/chat/completions/render, which answers one GenerateRequest, as does
POST /v1/messages/render for an Anthropic Messages body (MessagesMode below picks it or the
deprecated conversion to chat, `vllm.messagesRenderMode`). The prompt's token ids
are its `token_ids` (the first element's for completions). The body is sent as the client
sent it, with `model` set to the model the request is routed for (after any rewrite), and
the client's Authorization header forwarded, as the reference's native render does.

Rendered ids are kept in a bounded LRU keyed by a digest of what decides them (the
render path and the body without its sampling fields), and concurrent renders of one body
share one call. Nothing is cached by prompt prefix here: a render answers for the whole
prompt, so a new body costs one call whatever part of it was seen before, and joining a
cached prefix's ids to the rest rendered apart is not a full render (a BPE merge can span
the cut: with the fixture tokenizer, 27 of the 56 cuts of one sentence change its ids).
The inProcess backend, which splits at special tokens, encodes a repeated system prompt
once."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import xxhash

from epp.httpbody import read_bounded

from .tokens_local import IdsCache

log = logging.getLogger(__name__)

COMPLETIONS_RENDER_PATH = "/v1/completions/render"
CHAT_RENDER_PATH = "/v1/chat/completions/render"
MESSAGES_RENDER_PATH = "/v1/messages/render"
RENDER_PATHS = {"completions": COMPLETIONS_RENDER_PATH, "chat": CHAT_RENDER_PATH, "messages": MESSAGES_RENDER_PATH}
DEFAULT_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = 5.0  # the reference's vllm.timeout
DEFAULT_MM_TIMEOUT = 30.0  # vllm.mmTimeout; chat uses the larger of the two, as the reference
MAX_RESPONSE_BYTES = 64 << 20  # a render answer larger than this is refused
MAX_TOKEN_ID = (1 << 32) - 1  # vLLM's ids travel as uint32 in the reference
RENDER_CACHE_ENTRIES = 4096  # bodies whose rendered ids are kept
RENDER_CACHE_TOKENS = 1 << 22  # ... and the total ids they hold
MAX_IDLE_CONNECTIONS = 16  # the reference's MaxIdleConnsPerHost
# fields that do not change a prompt's token ids (sampling, streaming, routing hints): left out of the cache key
_NOT_RENDERED = frozenset((
    "stream", "stream_options", "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens",
    "min_tokens", "n", "seed", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs", "top_logprobs", "logit_bias", "user", "priority", "request_id",
    "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "kv_transfer_params"))


class RenderError(Exception):
    """A render call that gave no token ids (message says why; `status` the HTTP status, if one came)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def parse_render_response(kind: str, data: bytes) -> tuple[int, ...]:
    """The prompt token ids in a render endpoint's JSON answer. Raises RenderError for
    anything that is not the shape vLLM sends."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise RenderError(f"render answer is not JSON: {e}") from None
    if kind == "completions":
        if not isinstance(doc, list) or not doc:
            raise RenderError("completions render answer must be a non-empty JSON list")
        doc = doc[0]
    if not isinstance(doc, dict):
        raise RenderError("render answer must be a JSON object (vLLM's GenerateRequest)")
    ids = doc.get("token_ids")
    if not isinstance(ids, list) or not ids:
        raise RenderError("render answer has no token_ids")
    for t in ids:
        if type(t) is not int or not 0 <= t <= MAX_TOKEN_ID:
            raise RenderError("render answer's token_ids must be unsigned 32-bit integers")
    return tuple(ids)


def render_key(kind: str, body: Mapping[str, Any], model: str) -> bytes:
    """A digest of what decides a body's rendered ids."""
    kept = {k: v for k, v in body.items() if k not in _NOT_RENDERED}
    kept["model"] = model
    try:
        raw = orjson.dumps(kept, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # not JSON-serialisable: never cached
        return b""
    return kind.encode() + xxhash.xxh3_128_digest(raw)


class RenderCache(IdsCache[bytes, tuple[int, ...]]):
    """LRU of render key -> token ids, bounded by entries and by total ids."""

    def __init__(self, max_entries: int = RENDER_CACHE_ENTRIES, max_tokens: int = RENDER_CACHE_TOKENS) -> None:
        super().__init__(max_tokens, max_entries)


@dataclass(slots=True)
class RenderSettings:
    url: str = DEFAULT_URL
    timeout: float = DEFAULT_TIMEOUT
    mm_timeout: float = DEFAULT_MM_TIMEOUT
    prefill_only: bool = False
    ca_cert_path: str = ""
    client_cert_path: str = ""
    client_key_path: str = ""
    insecure_skip_verify: bool = False
    messages_mode: str = "auto"  # vllm.messagesRenderMode (MessagesMode)

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("https://"):
            return True  # aiohttp's default
        from epp.tls import client_context

        return client_context(self.ca_cert_path, self.insecure_skip_verify, self.client_cert_path,
                              self.client_key_path)


def render_body(body: Mapping[str, Any], model: str, prefill_only: bool) -> dict[str, Any]:
    """The copy of the request body sent to render (vllm.prefillOnly: a one-token output budget)."""
    out = dict(body)
    if model:
        out["model"] = model
    if prefill_only and out.get("truncate_prompt_tokens") is None:
        out["max_tokens"] = 1
        if out.get("max_completion_tokens") is not None:
            out["max_completion_tokens"] = min(out["max_completion_tokens"], 1) \
                if isinstance(out["max_completion_tokens"], int) else 1
        if "min_tokens" in out:
            out["min_tokens"] = 0
    return out


class RenderClient:
    """Calls one render URL; the session is made on first use (inside the event loop)."""

    def __init__(self, settings: RenderSettings) -> None:
        self.settings = settings
        self.base = settings.url.rstrip("/")
        self._ssl = settings.ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self.cache = RenderCache()
        self._inflight: dict[bytes, asyncio.Future[tuple[int, ...]]] = {}

    def timeout_for(self, kind: str) -> float:
        s = self.settings
        return max(s.timeout, s.mm_timeout) if kind != "completions" else s.timeout

    async def render(self, kind: str, body: Mapping[str, Any], model: str, authorization: str = "",
                     key: bytes | None = None) -> tuple[int, ...]:
        """The body's token ids (cached, or one call shared by concurrent callers). Raises
        RenderError, or asyncio.TimeoutError past the kind's timeout."""
        key = render_key(kind, body, model) if key is None else key
        ids = self.cache.get(key)
        if ids is not None:
            return ids
        pending = self._inflight.get(key) if key else None
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        if key:
            self._inflight[key] = fut
        try:
            ids = await asyncio.wait_for(self._post(kind, render_body(body, model, self.settings.prefill_only),
                                                    authorization), self.timeout_for(kind))
            self.cache.put(key, ids)
            fut.set_result(ids)
            return ids
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else RenderError("render cancelled"))
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._inflight.pop(key, None)

    async def _post(self, kind: str, body: dict[str, Any], authorization: str) -> tuple[int, ...]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                limit_per_host=MAX_IDLE_CONNECTIONS, ssl=self._ssl))
        headers = {"Content-Type": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        url = self.base + RENDER_PATHS[kind]
        try:
            async with self._session.post(url, data=orjson.dumps(body), headers=headers) as resp:
                data = await read_bounded(resp.content, MAX_RESPONSE_BYTES)
                if data is None:
                    raise RenderError(f"render answer larger than {MAX_RESPONSE_BYTES} bytes")
                if not 200 <= resp.status < 300:
                    snippet = data[:1024].decode("utf-8", "replace")
                    raise RenderError(f"vLLM render returned status {resp.status}: {snippet}", resp.status)
        except aiohttp.ClientError as e:
            raise RenderError(f"post {RENDER_PATHS[kind]}: {type(e).__name__}: {e}") from None
        return parse_render_response(kind, data)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


MESSAGES_MODES = ("auto", "native", "legacy")
PROBE_ATTEMPTS = 24  # the reference's warmup: this many probes at start, this far apart, until one answers
PROBE_INTERVAL = 5.0
_MISSING_ROUTE = (404, 405)  # a render service without /v1/messages/render


class MessagesMode:
    """vllm.messagesRenderMode, as the reference's configureLegacyMessages / useLegacy: `native`
    posts the Messages body to /v1/messages/render; `legacy` (deprecated) converts it to a chat
    body (tokens_messages.py) for /v1/chat/completions/render with `model` = modelName; `auto`
    (the default) probes /v1/messages/render with a one-message text body for modelName:
    success selects native; a 404 or 405 selects legacy when the same body renders on the chat
    path; any other outcome leaves the mode unknown, and the next Messages request (or the
    start-up probe's next attempt) probes again, concurrent callers sharing one probe."""

    def __init__(self, configured: str, client: RenderClient, model: str) -> None:
        self.configured = configured
        self.mode = "" if configured == "auto" else configured  # "" until a probe answers
        self.client, self.model = client, model
        self._probe: asyncio.Future[str] | None = None

    async def resolve(self, authorization: str = "") -> str:
        """native or legacy; probes first while unknown. Raises RenderError or TimeoutError."""
        if self.mode:
            return self.mode
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._discover(authorization))
            # every waiter may be gone (cancelled at shutdown) when it fails: its error is read here,
            # so asyncio never logs it as "never retrieved"
            self._probe.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._probe)

    async def _discover(self, authorization: str) -> str:
        probe = {"model": self.model, "max_tokens": 1, "messages": [{"role": "user", "content": "warmup"}]}
        client, mode = self.client, "native"
        try:
            await asyncio.wait_for(client._post("messages", probe, authorization), client.timeout_for("messages"))
        except RenderError as e:
            if e.status not in _MISSING_ROUTE:
                raise RenderError(f"discover Messages rendering: {e}", e.status) from None
            mode = "legacy"  # confirm the chat path renders this model before converting to it
            try:
                await asyncio.wait_for(client._post("chat", probe, authorization), client.timeout_for("chat"))
            except RenderError as e2:
                raise RenderError(f"discover legacy Messages rendering: {e2}", e2.status) from None
        self.mode = mode
        log.log(logging.WARNING if mode == "legacy" else logging.INFO,
                "%s: Messages rendering: %s%s", client.base, mode, LEGACY_WARNING if mode == "legacy" else "")
        return mode

    async def probe_at_start(self, authorization: str) -> None:
        """The start-up probe (background): up to PROBE_ATTEMPTS tries, PROBE_INTERVAL apart,
        stopping at the first answer or at a 401/403 (which retrying does not clear)."""
        for _ in range(PROBE_ATTEMPTS):
            try:
                await self.resolve(authorization)
                return
            except RenderError as e:
                if e.status in (401, 403):
                    log.info("%s: Messages render probe needs authentication (%s); the first Messages request "
                             "probes with its own credentials", self.client.base, e)
                    return
            except TimeoutError:
                pass
            await asyncio.sleep(PROBE_INTERVAL)


LEGACY_WARNING = (" (deprecated: the conversion to chat does not guarantee the token ids vLLM's /v1/messages uses; "
                  "use native with a renderer serving /v1/messages/render)")
