"""Pull the few series the scheduler needs out of a model server's /metrics page.

A vLLM page is 20-60 KB, mostly histogram buckets the picker never reads, scraped
every 50 ms per endpoint. So there is no general Prometheus parser here: each wanted
series is located with `bytes.find` (C speed) on "\\n<name>", the search ends with
the metric family's group, and only those lines' labels and values are parsed.
Tolerated: any label order, escaped quotes and `}` in label values, `_created`/`_total`
siblings and HELP/TYPE lines (they never match "\\n<name>{" or "\\n<name> "), several
series per name (e.g. one per model_name or engine rank), trailing timestamps, CRLF,
NaN and missing series. Hostile values (negative, infinite, absurdly large, huge labels)
count as missing: see "sanity" below.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from functools import lru_cache

from epp.datalayer.specs import EngineMetricSpec, parse_series
from epp.framework import Metrics

MAX_LABEL_VALUE = 16 << 10  # bytes; a longer label value is dropped (LoRA lists are a few KB at most)
LABEL_CACHE_BYTES = 256 << 10  # raw label text held by the label cache
MAX_CACHED_LABEL_TEXT = 4 << 10  # longer label texts are parsed each time, never cached

_LABEL = re.compile(rb'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
_ESCAPE = re.compile(rb"\\(.)")
_OPEN_BRACE, _SPACE, _TAB = ord("{"), ord(" "), ord("\t")


def find_samples(page: bytes, name: str | bytes) -> list[tuple[bytes, float]]:
    """(raw label text, value) of every sample line of series `name`; lines whose
    value does not parse are skipped. The exposition format requires all lines of a
    metric family to form one group, so once the first sample is found the search
    is bounded by the next comment line (the next family's HELP/TYPE) instead of
    running over the rest of the page."""
    key = name.encode() if isinstance(name, str) else name
    n = len(key)
    size = len(page)
    needle = b"\n" + key
    out: list[tuple[bytes, float]] = []
    limit = -1  # end of the family's group, once found
    pos = 0 if page.startswith(key) else _after(page.find(needle))
    while pos != -1:
        end = page.find(b"\n", pos)
        if end == -1:
            end = size
        j = pos + n
        c = page[j] if j < size else 0
        if c == _OPEN_BRACE or c == _SPACE or c == _TAB:  # else a longer name sharing this prefix
            sample = _sample(page[j:end], c == _OPEN_BRACE)
            if sample is not None:
                out.append(sample)
            if limit == -1:
                limit = page.find(b"\n#", end)
                if limit == -1:
                    limit = size
        pos = _after(page.find(needle, end) if limit == -1 else page.find(needle, end, limit))
    return out


def _after(newline: int) -> int:
    return -1 if newline == -1 else newline + 1


def _sample(line: bytes, has_labels: bool) -> tuple[bytes, float] | None:
    labels = b""
    if has_labels:
        # Values and timestamps never contain "}", so the last one closes the labels.
        close = line.rfind(b"}")
        if close == -1:
            return None
        labels, line = line[1:close], line[close + 1:]
    fields = line.split()
    if not fields:
        return None
    try:
        return labels, float(fields[0])
    except ValueError:
        return None


def parse_labels(text: bytes) -> dict[str, str]:
    """Label text between the braces -> {name: unescaped value}. A value longer than
    MAX_LABEL_VALUE bytes is dropped (as if the label were absent)."""
    labels: dict[str, str] = {}
    for key, value in _LABEL.findall(text):
        if len(value) > MAX_LABEL_VALUE:
            continue
        if b"\\" in value:
            value = _ESCAPE.sub(lambda m: b"\n" if m.group(1) == b"n" else m.group(1), value)
        labels[key.decode()] = value.decode("utf-8", "replace")
    return labels


class LabelCache:
    """Parsed label text of info series (cache config, LoRA state), which repeat scrape
    after scrape. Least recently used first out; bounded by the bytes of the raw texts it
    holds, and texts over `max_text` are parsed every time instead of cached (a page can
    carry a huge label value that changes every scrape)."""

    def __init__(self, max_bytes: int = LABEL_CACHE_BYTES, max_text: int = MAX_CACHED_LABEL_TEXT) -> None:
        self.max_bytes = max_bytes
        self.max_text = max_text
        self.bytes = 0
        self._entries: OrderedDict[bytes, dict[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def labels(self, text: bytes) -> dict[str, str]:
        entries = self._entries
        hit = entries.get(text)
        if hit is not None:
            entries.move_to_end(text)
            return hit
        labels = parse_labels(text)
        if len(text) <= self.max_text:
            entries[text] = labels
            self.bytes += len(text)
            while self.bytes > self.max_bytes:
                old, _ = entries.popitem(last=False)
                self.bytes -= len(old)
        return labels


_label_cache = LabelCache()


# --------------------------------------------------------------------------- sanity
# A value outside these ranges is not a real engine's: it is treated as missing, never
# trusted as a capacity or a count (a negative block count once made the prefix index's
# eviction loop forever).
MAX_COUNT = 1 << 20  # waiting or running requests of one endpoint
MAX_BLOCK_SIZE = 1 << 16  # tokens per KV block
MAX_GPU_BLOCKS = 1 << 24  # KV blocks of one endpoint (16 tokens each: 268M tokens)
MAX_LORA = 1 << 10  # LoRA adapter slots


def _in_range(value: float, low: float, high: float) -> bool:
    return low <= value <= high  # False for NaN; inf is above any bound


class _Report:
    """Collects the series whose values were rejected, for the caller to log."""

    __slots__ = ("problems",)

    def __init__(self, problems: list[tuple[str, str]] | None) -> None:
        self.problems = problems

    def bad(self, series: str, what: str, value: object) -> None:
        if self.problems is not None:
            self.problems.append((series, f"{what} {value!r} out of range, treated as missing"))


MAX_PARSED_SPECS = 256  # metric specs of the configured engines (a handful each)


@lru_cache(maxsize=MAX_PARSED_SPECS)
def _series(spec: str) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    name, labels = parse_series(spec)
    return name.encode(), labels


def select_samples(page: bytes, spec: str) -> list[tuple[bytes, float]]:
    """The samples of a metric spec: `name`, or `name{label=value,...}` keeping only the
    samples whose labels carry every listed value (the reference's label matchers)."""
    name, wanted = _series(spec)
    samples = find_samples(page, name)
    if not wanted:
        return samples
    out = []
    for raw, value in samples:
        labels = _label_cache.labels(raw)
        if all(labels.get(k) == v for k, v in wanted):
            out.append((raw, value))
    return out


def _values(page: bytes, name: str) -> list[float]:
    return [v for _, v in select_samples(page, name) if not math.isnan(v)] if name else []


def _count(page: bytes, name: str, report: _Report) -> int:
    """Sum of a count series' samples (e.g. one per model name); 0 when missing or bad."""
    values = _values(page, name)
    total = math.fsum(values) if all(_in_range(v, 0, MAX_COUNT) for v in values) else -1.0
    if not _in_range(total, 0, MAX_COUNT):
        report.bad(name, "sum of", values[:4])
        return 0
    return int(total)


def _gauge_int(page: bytes, name: str, low: int, high: int, report: _Report) -> int | None:
    values = _values(page, name)
    sane = [v for v in values if _in_range(v, low, high)]
    if values and not sane:
        report.bad(name, "value", values[0])
    return int(max(sane)) if sane else None


def _label_int(labels: dict[str, str], key: str, low: int, high: int, series: str, report: _Report) -> int | None:
    text = labels.get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not _in_range(value, low, high):
        report.bad(f"{series}{{{key}}}", "value", text[:40])
        return None
    return int(value)


def _adapters(text: str) -> frozenset[str]:
    return frozenset(a.strip() for a in text.split(",") if a.strip())


def parse_metrics(page: bytes, spec: EngineMetricSpec, update_time: float,
                  problems: list[tuple[str, str]] | None = None) -> Metrics:
    """One scrape -> an immutable Metrics snapshot (ok=True). Missing series leave
    their field at the default: an engine that omits LoRA info is still healthy.
    Values out of range (negative, NaN, infinite, absurdly large) count as missing and
    are listed in `problems` as (series, description) when it is given."""
    report = _Report(problems)
    kv = 0.0
    for name in spec.kv_cache_usage:
        values = _values(page, name)
        if values:
            sane = [v for v in values if _in_range(v, 0.0, 1.0)]
            if sane:
                kv = max(sane)
            else:
                report.bad(name, "value", values[0])
            break

    running_lora: frozenset[str] = frozenset()
    waiting_lora: frozenset[str] = frozenset()
    max_lora = 0
    if spec.lora_info:
        # The value is a timestamp: the series with the largest one is current.
        latest = max(((v, raw) for raw, v in select_samples(page, spec.lora_info) if math.isfinite(v)),
                     key=lambda s: s[0], default=None)
        if latest is not None:
            labels = _label_cache.labels(latest[1])
            running_lora = _adapters(labels.get("running_lora_adapters", ""))
            waiting_lora = _adapters(labels.get("waiting_lora_adapters", ""))
            max_lora = _label_int(labels, "max_lora", 0, MAX_LORA, spec.lora_info, report) or 0

    block_size = num_blocks = None
    if spec.cache_info:
        for raw, _ in select_samples(page, spec.cache_info):
            labels = _label_cache.labels(raw)
            block_size = _label_int(labels, spec.block_size_label, 1, MAX_BLOCK_SIZE, spec.cache_info, report)
            num_blocks = _label_int(labels, spec.num_blocks_label, 1, MAX_GPU_BLOCKS, spec.cache_info, report)
            if block_size is not None or num_blocks is not None:
                break
    if spec.block_size_gauge:
        block_size = _gauge_int(page, spec.block_size_gauge, 1, MAX_BLOCK_SIZE, report)
    if spec.num_blocks_gauge:
        num_blocks = _gauge_int(page, spec.num_blocks_gauge, 1, MAX_GPU_BLOCKS, report)

    return Metrics(
        waiting_queue_size=_count(page, spec.waiting_queue, report),
        running_requests_size=_count(page, spec.running_requests, report),
        kv_cache_usage_percent=kv,
        running_lora_adapters=running_lora,
        waiting_lora_adapters=waiting_lora,
        max_active_models=max_lora,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        update_time=update_time,
        ok=True,
    )
