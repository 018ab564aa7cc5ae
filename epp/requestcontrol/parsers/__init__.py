"""Request parsing: the chain of Parser plugins (the reference's requestHandler.parsers and
its ParserRegistry, pkg/epp/handlers/parsers.go).

Each parser claims path suffixes; a request goes to the parser with the longest claimed
suffix of its path, whatever the order. A parser claiming no path is the fallback for
everything unclaimed; parsers listed after it are skipped (with a warning), and a second
parser of a type already listed is skipped too. Without a fallback an unclaimed path is
a 400. With no requestHandler configured the chain is DEFAULT_PARSER_TYPES: openai,
anthropic, vllmhttp, then passthrough as the fallback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from epp.errors import InferenceError, bad_request
from epp.framework import InferenceRequest, Parser, PluginHandle
from epp.framework.registry import plugin_class

log = logging.getLogger("epp.requestcontrol.parsers")

DEFAULT_PARSER_TYPES = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "passthrough-parser")
DEFAULT_PATH = "/v1/completions"  # the path of a request that names none (the reference's default)
RESOLVE_CACHE_SIZE = 1024  # resolved paths remembered (paths are the client's: cleared when full)
_PATH_HEADERS = (":path", "x-original-path", "x-forwarded-path")


def request_path(headers: Mapping[str, str]) -> str:
    """The request's path, query string cut: :path, then x-original-path, x-forwarded-path;
    "" when none is given."""
    for name in _PATH_HEADERS:
        path = headers.get(name)
        if path:
            return path.split("?", 1)[0]
    return ""


def _suffix(claim: str) -> str:
    return claim.strip().strip("/")


class ParserChain:
    """The configured parsers, resolved by path."""

    def __init__(self, parsers: Sequence[Parser]) -> None:
        self.parsers: list[Parser] = []  # the active ones, in order
        self.fallback: Parser | None = None
        self._claims: list[tuple[str, Parser]] = []
        self._resolved: dict[str, Parser] = {}
        # observe("RequestParsing", parser type, parser name, seconds) per parse (plugin_duration metrics)
        self.observe: Callable[[str, str, str, float], None] | None = None
        seen: set[str] = set()
        for i, parser in enumerate(parsers):
            kind = parser.type_name
            if kind in seen:
                log.warning("parser %r: a parser of type %s is already listed; skipped", parser.name, kind)
                continue
            seen.add(kind)
            self.parsers.append(parser)
            paths = tuple(_suffix(p) for p in parser.paths)
            if not paths:
                self.fallback = parser
                for skipped in parsers[i + 1:]:
                    log.warning("parser %r is listed after the fallback parser %r; skipped", skipped.name,
                                parser.name)
                break
            self._claims.extend((p, parser) for p in paths if p)
        # Longest suffix first, so the first match is the longest (ties: listing order).
        self._claims.sort(key=lambda c: -len(c[0]))

    def resolve(self, path: str) -> Parser:
        parser = self._resolved.get(path)
        if parser is None:
            parser = self._resolve(path)
            if len(self._resolved) >= RESOLVE_CACHE_SIZE:
                self._resolved.clear()
            self._resolved[path] = parser
        return parser

    def _resolve(self, path: str) -> Parser:
        norm = (path or DEFAULT_PATH).strip().rstrip("/")
        for suffix, parser in self._claims:
            if norm.endswith(suffix):
                return parser
        if self.fallback is not None:
            return self.fallback
        raise bad_request(f"no parser registered matching path suffix for: {norm[:256]}")

    def parse(self, body: bytes, headers: Mapping[str, str], request_id: str) -> InferenceRequest:
        """The parsed request (headers not yet applied). Any failure is a 400."""
        path = request_path(headers)
        parser = self.resolve(path)
        t0 = time.perf_counter()
        try:
            return parser.parse_request(body, headers, request_id, path)
        except InferenceError:
            raise
        except Exception as e:  # noqa: BLE001 - a third-party parser's bug is the request's 400, not a crash
            log.warning("parser %r failed on request %s: %s", parser.name, request_id, type(e).__name__)
            raise bad_request(f"error parsing request: {type(e).__name__}") from None
        finally:
            if self.observe is not None:
                self.observe("RequestParsing", parser.type_name, parser.name, time.perf_counter() - t0)


def default_parsers(handle: PluginHandle | None = None) -> list[Parser]:
    """The parsers used when no requestHandler is configured (by type name, through the registry)."""
    handle = handle if handle is not None else PluginHandle()
    return [plugin_class(t)(t, None, handle) for t in DEFAULT_PARSER_TYPES]


__all__ = ["DEFAULT_PARSER_TYPES", "DEFAULT_PATH", "RESOLVE_CACHE_SIZE", "ParserChain", "default_parsers", "request_path"]
