"""The request headers the picker reads and owns, in one table (the reference's
pkg/epp/metadata/consts.go and pkg/epp/util/request/headers.go).

A control header has a canonical `x-llm-d-*` name and may have a deprecated alias; the
canonical one is looked up first, then the alias. Every name of a control header, and a
client's copy of a header the picker writes, is removed from the request forwarded to
the model server (STRIPPED). Header maps here have lowercased keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from epp.errors import DROPPED_REASON_HEADER
from epp.framework import InferenceRequest
from epp.framework.headers import (  # the names, defined once; re-exported here with their handling
    DESTINATION,
    DESTINATION_SERVED,
    FAIRNESS_ID,
    MODEL_NAME_REWRITE,
    OBJECTIVE,
    REQUEST_ID,
    SESSION_ID,
    SLO_TPOT_MS,
    SLO_TTFT_MS,
    SUBSET_HINT,
    VIDEO_DURATION_SECONDS,
    VIDEO_FPS,
    VIDEO_RESOLUTION,
)

DEFAULT_FAIRNESS_ID = "default-flow"
MAX_SLO_CHARS = 32  # a longer SLO header value is not a number worth parsing

# canonical name -> every name it is read under, canonical first (the reference's headerAliases)
NAMES: dict[str, tuple[str, ...]] = {
    OBJECTIVE: (OBJECTIVE, "x-gateway-inference-objective"),
    FAIRNESS_ID: (FAIRNESS_ID, "x-gateway-inference-fairness-id"),
    MODEL_NAME_REWRITE: (MODEL_NAME_REWRITE, "x-gateway-model-name-rewrite"),
    SLO_TTFT_MS: (SLO_TTFT_MS, "x-slo-ttft-ms"),
    SLO_TPOT_MS: (SLO_TPOT_MS, "x-slo-tpot-ms"),
}

# Sent by the gateway or the client to steer the picker: read, then never forwarded.
INPUT_CONTROL = (OBJECTIVE, FAIRNESS_ID, MODEL_NAME_REWRITE, SUBSET_HINT, SLO_TTFT_MS, SLO_TPOT_MS,
                 VIDEO_FPS, VIDEO_DURATION_SECONDS, VIDEO_RESOLUTION)
# Written by the picker: a client's copy is never forwarded (the destination is overwritten).
OUTPUT_INJECTION = (DESTINATION, DESTINATION_SERVED, DROPPED_REASON_HEADER)

STRIPPED: tuple[str, ...] = tuple(dict.fromkeys(
    [alias for name in INPUT_CONTROL for alias in NAMES.get(name, (name,))] + list(OUTPUT_INJECTION)))


def header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of a header by its canonical name: the canonical name wins, then the
    deprecated aliases in order; None when none is present."""
    for alias in NAMES.get(name, (name,)):
        value = headers.get(alias)
        if value is not None:
            return value
    return None


def objective(headers: Mapping[str, str]) -> str:
    return header(headers, OBJECTIVE) or ""


def fairness_id(headers: Mapping[str, str]) -> str:
    return header(headers, FAIRNESS_ID) or DEFAULT_FAIRNESS_ID


def model_name_rewrite(headers: Mapping[str, str]) -> str:
    return header(headers, MODEL_NAME_REWRITE) or ""


def apply(request: InferenceRequest, headers: Mapping[str, str]) -> InferenceRequest:
    """Hand a parsed request its headers and what the control headers say about it."""
    request.headers = headers
    request.objective = objective(headers)
    request.fairness_id = fairness_id(headers)
    request.slo_ttft_ms = slo_ms(headers, SLO_TTFT_MS)
    request.slo_tpot_ms = slo_ms(headers, SLO_TPOT_MS)
    return request


def slo_ms(headers: Mapping[str, str], name: str) -> float:
    """A latency SLO header's milliseconds (a float, as the reference parses it); 0 when
    absent or not a finite number >= 0 (the reference's value for a header it cannot parse)."""
    raw = header(headers, name)
    if raw is None or len(raw) > MAX_SLO_CHARS:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if 0.0 <= value < math.inf else 0.0


__all__ = ["DEFAULT_FAIRNESS_ID", "DESTINATION", "DESTINATION_SERVED", "DROPPED_REASON_HEADER", "FAIRNESS_ID",
           "INPUT_CONTROL", "MODEL_NAME_REWRITE", "NAMES", "OBJECTIVE", "OUTPUT_INJECTION", "REQUEST_ID",
           "SESSION_ID", "SLO_TPOT_MS", "SLO_TTFT_MS", "STRIPPED", "SUBSET_HINT", "VIDEO_DURATION_SECONDS",
           "VIDEO_FPS", "VIDEO_RESOLUTION", "apply", "fairness_id", "header", "model_name_rewrite", "objective",
           "slo_ms"]
