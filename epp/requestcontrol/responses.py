"""Reading and editing OpenAI responses as they stream back: token usage (SSE events or
a JSON body) and the client-facing model name after a rewrite.

Every buffer here has a bound: an SSE line is held until its newline up to
MAX_SSE_LINE, a JSON body up to MAX_JSON_RESPONSE; past that the bytes pass through
unread (usage unknown, model name left as the server wrote it).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from epp.framework import ResponseInfo

__all__ = ["MAX_JSON_RESPONSE", "MAX_SSE_LINE", "LineBuffer", "ModelNameRestorer", "UsageParser"]

# Largest JSON response body kept in memory to read `usage` from (or restore the model name in).
MAX_JSON_RESPONSE = 16 * 1024 * 1024
# Longest SSE line held while waiting for its newline (an event carrying one token or a
# usage object is far below this; a server that never sends a newline hits it).
MAX_SSE_LINE = 1024 * 1024


class LineBuffer:
    """Splits a byte stream at newlines: `split` returns everything up to and including
    the last newline seen, holding the partial line after it. Pieces are kept in a list
    so a line arriving in many small chunks is joined once, not copied per chunk."""

    __slots__ = ("_parts", "size", "limit")

    def __init__(self, limit: int = MAX_SSE_LINE) -> None:
        self._parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    @property
    def over(self) -> bool:
        """The held partial line is longer than the limit."""
        return self.size > self.limit

    def split(self, chunk: bytes) -> bytes:
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            if chunk:
                self._parts.append(chunk)
                self.size += len(chunk)
            return b""
        head = chunk[:cut]
        if self._parts:
            head = b"".join((*self._parts, head))
        rest = chunk[cut:]
        self._parts = [rest] if rest else []
        self.size = len(rest)
        return head

    def take(self) -> bytes:
        """Everything held, emptying the buffer."""
        held = b"".join(self._parts)
        self._parts, self.size = [], 0
        return held


class UsageParser:
    """Reads token usage from a response: SSE `data:` events (split across chunks: the
    partial line is carried over) or a JSON body (kept until the end, up to a cap)."""

    __slots__ = ("sse", "usage", "_lines", "_skip_line", "_json", "_json_size")

    def __init__(self, sse: bool = False) -> None:
        self.sse = sse
        self.usage: dict[str, Any] | None = None
        self._lines = LineBuffer()
        self._skip_line = False  # the rest of an over-long line is still to come: ignore it
        self._json: list[bytes] = []
        self._json_size = 0

    def feed(self, chunk: bytes, eos: bool) -> None:
        if self.sse:
            self._feed_sse(chunk, eos)
        else:
            self._feed_json(chunk, eos)

    def _feed_sse(self, chunk: bytes, eos: bool) -> None:
        lines = self._lines
        complete = lines.split(chunk)
        if eos:
            complete += lines.take()
        elif lines.over:
            lines.take()
            self._skip_line = True
        if not complete:
            return
        if self._skip_line:
            self._skip_line = False
            complete = complete.partition(b"\n")[2]
        if b'"usage"' in complete:
            for line in complete.split(b"\n"):
                if b'"usage"' in line and line.startswith(b"data:"):
                    self._take(line[5:].strip())

    def _feed_json(self, chunk: bytes, eos: bool) -> None:
        if self._json_size + len(chunk) <= MAX_JSON_RESPONSE:
            self._json.append(chunk)
            self._json_size += len(chunk)
        if eos and self._json:
            body = b"".join(self._json)
            self._json, self._json_size = [], 0
            if b'"usage"' in body:
                self._take(body)

    def _take(self, payload: bytes) -> None:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if usage is None:  # Anthropic message_start and Responses API events nest it
            outer = obj.get("message") or obj.get("response")
            usage = outer.get("usage") if isinstance(outer, dict) else None
        if isinstance(usage, dict):  # merged: Anthropic sends input and output counts in two events
            self.usage = {**self.usage, **usage} if self.usage else usage

    def fill(self, info: ResponseInfo) -> None:
        """Copy the token counts read so far into the response info."""
        usage = self.usage
        if not usage:
            return
        # OpenAI chat/completions names, else the Responses API's and Anthropic's
        info.prompt_tokens = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
        info.completion_tokens = _count(usage.get("completion_tokens", usage.get("output_tokens")))
        details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
        if isinstance(details, dict):
            info.cached_tokens = _count(details.get("cached_tokens"))
        elif "cache_read_input_tokens" in usage:
            info.cached_tokens = _count(usage.get("cache_read_input_tokens"))


class ModelNameRestorer:
    """Restores the client-facing model name in a response whose request was rewritten.
    SSE: rewritten line by line (a partial line waits for its end, up to MAX_SSE_LINE,
    then passes through as is). JSON: rewritten once the whole body is in (intermediate
    chunks yield nothing), up to MAX_JSON_RESPONSE, then passed through as is."""

    __slots__ = ("_pattern", "_replacement", "_sse", "_lines", "_json", "_json_size", "_passthrough")

    def __init__(self, target: str, incoming: str, sse: bool) -> None:
        self._pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(orjson.dumps(target)))
        self._replacement = rb"\g<1>" + orjson.dumps(incoming).replace(b"\\", b"\\\\")
        self._sse = sse
        self._lines = LineBuffer()
        self._json: list[bytes] = []
        self._json_size = 0
        self._passthrough = False  # a JSON body outgrew the cap: the rest goes out unrewritten

    def flush(self) -> bytes:
        """Whatever is held (the response ended with trailers instead of end_of_stream)."""
        return self.feed(b"", True)

    def feed(self, chunk: bytes, eos: bool) -> bytes:
        if self._sse:
            return self._feed_sse(chunk, eos)
        return self._feed_json(chunk, eos)

    def _rewrite(self, data: bytes) -> bytes:
        return self._pattern.sub(self._replacement, data) if data else data

    def _feed_sse(self, chunk: bytes, eos: bool) -> bytes:
        lines = self._lines
        out = self._rewrite(lines.split(chunk))
        if eos:
            return out + self._rewrite(lines.take())
        if lines.over:
            return out + lines.take()
        return out

    def _feed_json(self, chunk: bytes, eos: bool) -> bytes:
        if self._passthrough:
            return chunk
        self._json.append(chunk)
        self._json_size += len(chunk)
        if eos:
            body = b"".join(self._json)
            self._json, self._json_size = [], 0
            return self._rewrite(body)
        if self._json_size > MAX_JSON_RESPONSE:  # too big to hold: pass through unrewritten
            self._passthrough = True
            body = b"".join(self._json)
            self._json, self._json_size = [], 0
            return body
        return b""


def _count(value: Any) -> int:
    """A token count from a response's usage: a non-negative int, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
