"""token-producer (the reference's requestcontrol/dataproducer/tokenizer/tokenizer.go,
estimate.go): counts the request's prompt tokens once, in PrepareData, and publishes the
count under TOKENIZED_PROMPT for the producers that need it (inflight-load-producer).

The `estimate` backend, the reference's default when no backend is set: 4 bytes of the
prompt per token, the last one padded (ceil(bytes / 4)). Token ids the client sent
(completions or embeddings with a token-id prompt, generate) count one each. The other
backends (vllm: the model server's /render endpoint; udsTokenizerConfig: an in-process
tokenizer) and the multimodal estimates (estimate.image / estimate.video) belong to precise
tokenization (issue 12) and are refused at start-up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import TOKENIZED_PROMPT

BYTES_PER_TOKEN = 4
_ISSUE12 = "precise tokenization (issue 12), not built yet; leave it out for the estimate backend"


@dataclass(slots=True)
class TokenProducerParams:
    modelName: str = ""
    vllm: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None
    udsTokenizerConfig: dict[str, Any] | None = None  # deprecated in the reference

    def validate(self) -> None:
        backends = [k for k in ("estimate", "vllm", "udsTokenizerConfig") if getattr(self, k) is not None]
        if self.modelName and "vllm" not in backends and "udsTokenizerConfig" not in backends:
            backends.append("vllm")  # the reference: a model name alone selects the vllm backend
        if len(backends) > 1:
            raise ValueError(f"{backends[1]}: only one of 'estimate', 'vllm' or 'udsTokenizerConfig' may be set")
        if backends and backends[0] in ("vllm", "udsTokenizerConfig"):
            key = backends[0] if getattr(self, backends[0]) is not None else "modelName"
            raise ValueError(f"{key}: the {backends[0]} tokenizer backend needs {_ISSUE12}")
        for key in (self.estimate or {}):
            if key in ("image", "video"):
                raise ValueError(f"estimate.{key}: multimodal token estimation needs {_ISSUE12}")
            raise ValueError(f"estimate.{key}: unknown parameter (known: image, video)")


def _token_ids(body: Mapping[str, Any] | None) -> Sequence[Any] | None:
    """The client's own token ids, when the prompt is given as a list of integers."""
    if not body:
        return None
    for key in ("prompt", "input", "token_ids", "prompt_token_ids"):
        v = body.get(key)
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
    return None


def estimate_tokens(request: InferenceRequest) -> int:
    ids = _token_ids(request.body if isinstance(request.body, Mapping) else None)
    if ids is not None:
        return len(ids)
    n = len(request.prompt_text.encode("utf-8", "surrogatepass"))
    return -(-n // BYTES_PER_TOKEN)


class TokenProducer:
    type_name = "token-producer"
    Params = TokenProducerParams

    def __init__(self, name: str, params: TokenProducerParams | None, handle: PluginHandle) -> None:
        self.name = name
        self.key = TOKENIZED_PROMPT.of(name)

    # PrepareData
    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest,
                             endpoints: Sequence[Endpoint]) -> None:
        cycle.write(self.key, estimate_tokens(request))
