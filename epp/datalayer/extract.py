"""Pull the few series the scheduler needs out of a model server's /metrics page.

A vLLM page is 20-60 KB, mostly histogram buckets the picker never reads, scraped
every 50 ms per endpoint. So there is no general Prometheus parser here: each wanted
series is located with `bytes.find` (C speed) on "\\n<name>", the search ends with
the metric family's group, and only those lines' labels and values are parsed.
Tolerated: any label order, escaped quotes and `}` in label values, `_created`/`_total`
siblings and HELP/TYPE lines (they never match "\\n<name>{" or "\\n<name> "), several
series per name (e.g. one per model_name or engine rank), trailing timestamps, CRLF,
NaN and missing series.
"""

from __future__ import annotations

import functools
import math
import re

from epp.datalayer.specs import EngineMetricSpec
from epp.framework import Metrics

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
    """Label text between the braces -> {name: unescaped value}."""
    labels: dict[str, str] = {}
    for key, value in _LABEL.findall(text):
        if b"\\" in value:
            value = _ESCAPE.sub(lambda m: b"\n" if m.group(1) == b"n" else m.group(1), value)
        labels[key.decode()] = value.decode("utf-8", "replace")
    return labels


# Info series (cache config, LoRA state) repeat the same label text scrape after scrape.
_labels_of = functools.lru_cache(maxsize=1024)(parse_labels)


def _finite(samples: list[tuple[bytes, float]]) -> list[float]:
    return [v for _, v in samples if not math.isnan(v)]


def _sum_int(page: bytes, name: str) -> int:
    values = [v for v in _finite(find_samples(page, name)) if not math.isinf(v)] if name else []
    return int(sum(values))


def _max_int(page: bytes, name: str) -> int | None:
    values = [v for v in _finite(find_samples(page, name)) if not math.isinf(v)] if name else []
    return int(max(values)) if values else None


def _label_int(labels: dict[str, str], key: str) -> int | None:
    try:
        return int(float(labels[key]))
    except (KeyError, ValueError, OverflowError):
        return None


def _adapters(text: str) -> frozenset[str]:
    return frozenset(a.strip() for a in text.split(",") if a.strip())


def parse_metrics(page: bytes, spec: EngineMetricSpec, update_time: float) -> Metrics:
    """One scrape -> an immutable Metrics snapshot (ok=True). Missing series leave
    their field at the default: an engine that omits LoRA info is still healthy."""
    kv = 0.0
    for name in spec.kv_cache_usage:
        values = _finite(find_samples(page, name))
        if values:
            kv = max(values)
            break

    running_lora: frozenset[str] = frozenset()
    waiting_lora: frozenset[str] = frozenset()
    max_lora = 0
    if spec.lora_info:
        # The value is a timestamp: the series with the largest one is current.
        latest = max(((v, raw) for raw, v in find_samples(page, spec.lora_info) if not math.isnan(v)),
                     key=lambda s: s[0], default=None)
        if latest is not None:
            labels = _labels_of(latest[1])
            running_lora = _adapters(labels.get("running_lora_adapters", ""))
            waiting_lora = _adapters(labels.get("waiting_lora_adapters", ""))
            max_lora = _label_int(labels, "max_lora") or 0

    block_size = num_blocks = None
    if spec.cache_info:
        for raw, _ in find_samples(page, spec.cache_info):
            labels = _labels_of(raw)
            block_size = _label_int(labels, spec.block_size_label)
            num_blocks = _label_int(labels, spec.num_blocks_label)
            if block_size is not None or num_blocks is not None:
                break
    if spec.block_size_gauge:
        block_size = _max_int(page, spec.block_size_gauge)
    if spec.num_blocks_gauge:
        num_blocks = _max_int(page, spec.num_blocks_gauge)

    return Metrics(
        waiting_queue_size=_sum_int(page, spec.waiting_queue),
        running_requests_size=_sum_int(page, spec.running_requests),
        kv_cache_usage_percent=kv,
        running_lora_adapters=running_lora,
        waiting_lora_adapters=waiting_lora,
        max_active_models=max_lora,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        update_time=update_time,
        ok=True,
    )
