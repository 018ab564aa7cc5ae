"""Hardware classes: engine timing presets of one GPU serving an 8B bf16 model
(Llama-3.1-8B), for heterogeneous pools (`epp sim --hardware h100,a100`).

Each preset derives its numbers from the GPU's data sheet the same way the H100 defaults
of simulator.engine are derived (see simulator/README.md for the table and reasoning):
- step_overhead: reading the ~16 GB of weights once per step at HBM bandwidth, plus
  ~1.2 ms of launch/sampling/scheduler time;
- decode_time_per_seq: per-sequence KV reads, scaled from the H100's 0.08 ms by HBM
  bandwidth (3.35 TB/s / this GPU's);
- prefill_time_per_token: 16 GFLOP per token at the dense bf16 throughput vLLM reaches;
- num_gpu_blocks: (memory x 0.9 - 16 GB weights - ~2 GB activations) / 128 KiB of KV per
  token / 16 tokens per block;
- kv_transfer_bandwidth: the GPU's RDMA NIC at ~80% of line rate (NIXL).

Labels a server of a class carries (as llm-d's model-server charts label pods, plus the
GPU feature discovery node label): llm-d.ai/accelerator-vendor, llm-d.ai/accelerator-variant
(the class name) and nvidia.com/gpu.product."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .engine import EngineConfig

__all__ = ["HardwareClass", "HARDWARE", "ACCELERATOR_VENDOR_LABEL", "ACCELERATOR_VARIANT_LABEL",
           "GPU_PRODUCT_LABEL", "engine_config"]

ACCELERATOR_VENDOR_LABEL = "llm-d.ai/accelerator-vendor"
ACCELERATOR_VARIANT_LABEL = "llm-d.ai/accelerator-variant"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


@dataclass(frozen=True)
class HardwareClass:
    name: str
    vendor: str
    gpu_product: str  # the value GPU feature discovery puts in nvidia.com/gpu.product
    step_overhead: float
    prefill_time_per_token: float
    decode_time_per_seq: float
    num_gpu_blocks: int
    kv_transfer_bandwidth: float

    def labels(self) -> dict[str, str]:
        return {ACCELERATOR_VENDOR_LABEL: self.vendor, ACCELERATOR_VARIANT_LABEL: self.name,
                GPU_PRODUCT_LABEL: self.gpu_product}

    def timings(self) -> dict[str, float | int]:
        return {"step_overhead": self.step_overhead, "prefill_time_per_token": self.prefill_time_per_token,
                "decode_time_per_seq": self.decode_time_per_seq, "num_gpu_blocks": self.num_gpu_blocks,
                "kv_transfer_bandwidth": self.kv_transfer_bandwidth}


HARDWARE: dict[str, HardwareClass] = {
    # H100 SXM5 80 GB: HBM3 3.35 TB/s, 989 TFLOP/s dense bf16, ConnectX-7 400 Gb/s. The engine defaults.
    "h100": HardwareClass("h100", "nvidia", "NVIDIA-H100-80GB-HBM3", step_overhead=0.006,
                          prefill_time_per_token=0.000050, decode_time_per_seq=0.000080,
                          num_gpu_blocks=27000, kv_transfer_bandwidth=40e9),
    # H200 141 GB: HBM3e 4.8 TB/s, same compute as the H100: 16 GB / 4.8 TB/s = 3.3 ms + 1.2.
    "h200": HardwareClass("h200", "nvidia", "NVIDIA-H200", step_overhead=0.0045,
                          prefill_time_per_token=0.000050, decode_time_per_seq=0.000056,
                          num_gpu_blocks=52000, kv_transfer_bandwidth=40e9),
    # A100 SXM4 80 GB: HBM2e 2.04 TB/s, 312 TFLOP/s dense bf16, ConnectX-6 200 Gb/s.
    # 16 GB / 2.04 TB/s = 7.8 ms + 1.2; prefill ~2.2x slower than the H100 (vLLM reaches
    # about half the A100's peak: 16 GFLOP / ~150 TFLOP/s ~ 110 us).
    "a100": HardwareClass("a100", "nvidia", "NVIDIA-A100-SXM4-80GB", step_overhead=0.009,
                          prefill_time_per_token=0.000110, decode_time_per_seq=0.000130,
                          num_gpu_blocks=27000, kv_transfer_bandwidth=20e9),
    # A100 SXM4 40 GB: HBM2 1.555 TB/s: 16 GB / 1.555 TB/s = 10.3 ms + 1.2; ~18 GB for KV.
    "a100-40gb": HardwareClass("a100-40gb", "nvidia", "NVIDIA-A100-SXM4-40GB", step_overhead=0.0115,
                               prefill_time_per_token=0.000110, decode_time_per_seq=0.000170,
                               num_gpu_blocks=8600, kv_transfer_bandwidth=20e9),
}


def engine_config(hardware: str | None = None, **overrides) -> EngineConfig:
    """An EngineConfig of a hardware class (None: the engine defaults, an H100), with
    explicit overrides (None values ignored) applied on top."""
    base = EngineConfig()
    if hardware is not None:
        if hardware not in HARDWARE:
            raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}")
        base = dataclasses.replace(base, **HARDWARE[hardware].timings())
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **given) if given else base
