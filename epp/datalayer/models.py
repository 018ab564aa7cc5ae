"""An endpoint's served models from its OpenAI-compatible `/v1/models` (the reference's
models-data-source + models-data-extractor) into Endpoint.served.

vLLM lists its base model and every LoRA adapter it has registered; an adapter entry
names its base model in `parent` (null or absent for a base model). So an adapter
listed here can be served by the endpoint before any request has put it into a GPU
slot (and before vllm:lora_requests_info reports it), which LoRA affinity uses.

The body is the model server's to choose, so it is bounded everywhere: the page size
(MAX_MODELS_BODY), the entries read (MAX_MODEL_ENTRIES) and the name length
(MAX_MODEL_NAME); anything malformed is a failed poll with one clear message.
"""

from __future__ import annotations

import logging
import time
from ssl import SSLContext

import orjson

from epp.datalayer.collector import EndpointPoller, ScrapeStats
from epp.datalayer.datastore import Datastore
from epp.framework import Endpoint
from epp.framework.types import ServedModels

log = logging.getLogger("epp.datalayer")

MAX_MODELS_BODY = 4 << 20  # bytes; ~20,000 entries of a vLLM answer, far above any real one
MAX_MODEL_ENTRIES = 4096  # models + adapters kept per endpoint; the rest are dropped (logged)
MAX_MODEL_NAME = 256  # characters; a longer id is not a model name anyone routes to (dropped)

_REQUEST_HEADERS = {"Accept": "application/json"}


class ModelsError(ValueError):
    """A /v1/models answer that is not an OpenAI model list."""


def parse_models(body: bytes, update_time: float) -> tuple[ServedModels, int]:
    """A /v1/models body -> (ServedModels(ok=True), entries dropped for the bounds).
    Raises ModelsError naming what is wrong."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ModelsError(f"not JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict):
        raise ModelsError(f"expected a JSON object with 'data', got {type(doc).__name__}")
    data = doc.get("data")
    if not isinstance(data, list):
        raise ModelsError(f"'data' must be a list of models, got {type(data).__name__}")
    models: set[str] = set()
    adapters: dict[str, str] = {}
    dropped = 0
    for entry in data:
        if len(models) + len(adapters) >= MAX_MODEL_ENTRIES:
            dropped += 1
            continue
        if not isinstance(entry, dict):
            raise ModelsError(f"'data' entries must be objects, got {type(entry).__name__}")
        model_id, parent = entry.get("id"), entry.get("parent")
        if not isinstance(model_id, str) or not model_id:
            raise ModelsError("a model entry has no 'id' string")
        if parent is not None and not isinstance(parent, str):
            raise ModelsError(f"model {model_id[:MAX_MODEL_NAME]!r}: 'parent' must be a string or null")
        if len(model_id) > MAX_MODEL_NAME or (parent and len(parent) > MAX_MODEL_NAME):
            dropped += 1
            continue
        if parent:
            adapters[model_id] = parent
        else:
            models.add(model_id)
    return ServedModels(models=frozenset(models), adapters=adapters, update_time=update_time, ok=True), dropped


class ModelsCollector(EndpointPoller):
    """Polls every endpoint's /v1/models and publishes Endpoint.served."""

    what = "models poll"
    source_type = "models-data-source"
    extractor_type = "models-data-extractor"

    def __init__(self, datastore: Datastore, *, interval: float = 5.0, timeout: float = 1.0,
                 path: str = "/v1/models", ssl: SSLContext | None = None) -> None:
        super().__init__(datastore, interval=interval, timeout=timeout, path=path, ssl=ssl,
                         max_body=MAX_MODELS_BODY, headers=_REQUEST_HEADERS)
        self._warned: set[Endpoint] = set()  # endpoints whose dropped entries were logged; bounded by the pool

    def _view(self, ep: Endpoint) -> ServedModels:
        return ep.served

    def _publish(self, ep: Endpoint, view: ServedModels) -> None:
        self.datastore.set_served(ep, view)

    def _handle(self, ep: Endpoint, body: bytes, stats: ScrapeStats) -> None:
        served, dropped = parse_models(body, time.monotonic())
        if dropped and ep not in self._warned and ep in self.scraping():
            self._warned.add(ep)
            log.warning("endpoint %s: /v1/models lists more than %d entries or names over %d characters; "
                        "%d entries ignored", ep.name, MAX_MODEL_ENTRIES, MAX_MODEL_NAME, dropped)
        self.datastore.set_served(ep, served)

    def _reconcile(self) -> None:
        super()._reconcile()
        self._warned &= set(self._tasks)
