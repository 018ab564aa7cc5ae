"""A vLLM-compatible simulated model server: engine model, HTTP front, KV events.

The engine (simulator.engine) is a pure state machine driven by a clock it is given:
an AsyncioClock for HTTP serving (`epp sim`, simulator.server), or a VirtualClock to run
hundreds of engines in one process without sockets:

    from simulator import Engine, EngineConfig, EngineLoop, EngineRequest, VirtualClock, encode

    clock = VirtualClock()
    loops = [EngineLoop(Engine(EngineConfig(num_gpu_blocks=2000)), clock) for _ in range(64)]
    ttft = {}
    req = EngineRequest("r1", encode("You are a helpful assistant. Hi!"), max_tokens=32,
                        on_first_token=lambda t, cached: ttft.update(r1=t),
                        on_finish=lambda t, reason: print("done at", t, reason))
    clock.call_at(0.5, lambda: loops[3].submit(req))   # arrives at t=0.5 s
    clock.run_until_idle()                              # virtual time, no sleeping
    loops[3].engine.stats().num_requests_running        # 0
    loops[3].engine.cached_prefix_blocks(encode("..."))  # oracle: leading blocks cached now

See simulator.engine's docstring for the scheduling model, the default timings and P/D
disaggregation (remote_decode / remote_prefill requests), simulator.hardware for the
H100/H200/A100 presets."""

from .clock import AsyncioClock, Clock, VirtualClock
from .engine import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Engine,
    EngineConfig,
    EngineLoop,
    EngineRequest,
    EngineStats,
    PromptTooLong,
    block_hashes,
)
from .tokenizer import apply_chat_template, encode

__all__ = [
    "AllBlocksCleared", "AsyncioClock", "BlockRemoved", "BlockStored", "Clock", "Engine", "EngineConfig",
    "EngineLoop", "EngineRequest", "EngineStats", "PromptTooLong", "VirtualClock", "apply_chat_template",
    "block_hashes", "encode",
]
