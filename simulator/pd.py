"""Prefill/decode disaggregation in virtual time: the routing sidecar's sequence between two
engine loops, without sockets (for the cluster simulation).

    disaggregate(loops[p], loops[d], req)

submits a one-token copy of `req` to the prefill loop with remote_decode (its blocks are
held for the decoder), and when that finishes submits `req` itself to the decode loop with
remote_prefill: the decode engine pulls the prompt's KV over its link, then the prefill
blocks are released (the NIXL notification). `req`'s callbacks fire as usual, from the
decode engine. As in the HTTP server, if the prefill copy ends without held blocks the
request is prefilled on the decoder (counted by the caller through the returned state)."""

from __future__ import annotations

from dataclasses import dataclass

from .engine import EngineLoop, EngineRequest

__all__ = ["PDRequest", "disaggregate"]


@dataclass
class PDRequest:
    """What happened to one disaggregated request (for counters)."""

    prefill_request_id: str
    prefilled_at: float | None = None  # the prefill copy finished
    kv_loaded_at: float | None = None  # the decoder finished pulling the KV
    kv_bytes: int = 0
    local_fallback: bool = False  # the decoder prefilled it itself
    prefill_cached_tokens: int = 0  # prompt tokens the prefiller found cached (the usage the sidecar reports)


def disaggregate(prefill: EngineLoop, decode: EngineLoop, req: EngineRequest,
                 prefill_request_id: str | None = None) -> PDRequest:
    """Run `req` disaggregated (see the module docstring). Raises PromptTooLong (before
    anything is submitted) if either engine can never run it."""
    prefill.engine.check(len(req.prompt_token_ids), 1, req.lora)
    decode.engine.check(len(req.prompt_token_ids), req.max_tokens, req.lora)
    state = PDRequest(prefill_request_id or f"prefill-{req.request_id}")

    def loaded(t: float, nbytes: int, seconds: float, user=req.on_kv_loaded) -> None:
        state.kv_loaded_at = t
        state.kv_bytes = nbytes
        prefill.release_transfer(state.prefill_request_id)
        if user is not None:
            user(t, nbytes, seconds)

    def prefilled(t: float, _reason: str) -> None:
        state.prefilled_at = t
        state.prefill_cached_tokens = copy.cached_tokens
        if copy.kv_block_ids is None:  # nothing held for us: prefill locally
            state.local_fallback = True
        else:
            req.remote_prefill = True
            req.on_kv_loaded = loaded
        decode.submit(req)

    copy = EngineRequest(state.prefill_request_id, req.prompt_token_ids, 1, lora=req.lora,
                         block_hashes=req.block_hashes, remote_decode=True, on_finish=prefilled)
    prefill.submit(copy)
    return state
