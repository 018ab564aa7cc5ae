"""In-flight accounting on an endpoint: what a routed request adds to
`Endpoint.in_flight` / `Endpoint.in_flight_tokens` and takes back, exactly once."""

from __future__ import annotations

from dataclasses import dataclass

from epp.framework import Endpoint, InferenceRequest

__all__ = ["InFlightCharge", "estimated_tokens"]


def estimated_tokens(request: InferenceRequest) -> int:
    """The picker's estimate of a request's load (it has no tokenizer): prompt tokens
    from the text length plus the output budget the client asked for."""
    return request.estimated_prompt_tokens + (request.max_tokens or 0)


@dataclass(slots=True)
class InFlightCharge:
    """One request counted on one endpoint. `release()` takes back exactly what `add`
    added, once; later calls do nothing."""

    endpoint: Endpoint
    tokens: int
    released: bool = False

    @classmethod
    def add(cls, endpoint: Endpoint, request: InferenceRequest) -> InFlightCharge:
        tokens = estimated_tokens(request)
        endpoint.in_flight += 1
        endpoint.in_flight_tokens += tokens
        return cls(endpoint, tokens)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        ep = self.endpoint
        ep.in_flight = max(0, ep.in_flight - 1)
        ep.in_flight_tokens = max(0, ep.in_flight_tokens - self.tokens)
