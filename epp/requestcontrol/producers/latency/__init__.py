"""Latency prediction (placeholder docstring; rewritten below)."""

from .features import (
    DEFAULT_CLASS,
    DEFAULT_CLASS_LABELS,
    TPOT_BASIS,
    TTFT_BASIS,
    LatencyFeatures,
    clean,
    endpoint_class,
    tpot_basis,
    ttft_basis,
)
from .model import (
    ERROR_WINDOW,
    MAX_CLASSES,
    PENDING_MAX,
    POOL,
    ErrorStats,
    ForgettingRidge,
    LatencyModel,
    LatencyPrediction,
    Target,
    TrainReport,
)

__all__ = [
    "DEFAULT_CLASS", "DEFAULT_CLASS_LABELS", "ERROR_WINDOW", "MAX_CLASSES", "PENDING_MAX", "POOL", "TPOT_BASIS",
    "TTFT_BASIS", "ErrorStats", "ForgettingRidge", "LatencyFeatures", "LatencyModel", "LatencyPrediction", "Target",
    "TrainReport", "clean", "endpoint_class", "tpot_basis", "ttft_basis",
]
