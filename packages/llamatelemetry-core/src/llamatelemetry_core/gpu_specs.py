"""Datasheet figures of the GPU models llamatelemetry knows, used where a device cannot be measured.

Figures are the vendor's published peaks for *dense* work (no structured sparsity). Tensor-core fp16/bf16 rates
are with fp32 accumulation, which is what PyTorch's matmuls use (GeForce cards run fp16 with fp32 accumulation at
half their fp16-accumulate rate, so their figures here are the lower ones). ``None`` means the model has no
tensor-core path for that type. Memory bandwidth is in GB/s; shared memory is the most a single block may opt into.

These are leads for planning and reporting, not measurements: benchmarks always measure their own ceilings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["GPU_SPECS", "GPUSpec", "architecture_name", "find_spec", "spec_by_key"]


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model's datasheet."""

    key: str
    name: str
    pattern: str
    compute_capability: tuple[int, int]
    sm_count: int
    memory_gb: float
    memory_bandwidth_gbps: float
    shared_memory_per_block_kib: int
    fp32_tflops: float
    fp16_tflops: float | None
    bf16_tflops: float | None
    tf32_tflops: float | None
    int8_tops: float | None
    fp8_tflops: float | None
    min_memory_gb: float = 0.0

    def matches(self, device_name: str, memory_gb: float | None = None) -> bool:
        if re.search(self.pattern, device_name, flags=re.IGNORECASE) is None:
            return False
        return memory_gb is None or memory_gb >= self.min_memory_gb


# Order matters: more specific patterns come before the ones they would also match (H100 PCIe before H100,
# the 80 GB A100 before the 40 GB one, RTX 2080 Ti before RTX 2080).
GPU_SPECS: tuple[GPUSpec, ...] = (
    GPUSpec("v100", "Tesla V100-SXM2", r"V100", (7, 0), 80, 32, 900, 96, 15.7, 125, None, None, None, None),
    GPUSpec("t4", "Tesla T4", r"\bT4\b", (7, 5), 40, 16, 320, 64, 8.1, 65, None, None, 130, None),
    GPUSpec(
        "rtx2080ti", "GeForce RTX 2080 Ti", r"RTX 2080 Ti", (7, 5), 68, 11, 616, 64, 13.4, 53.8, None, None, 215.2, None
    ),
    GPUSpec("rtx2080", "GeForce RTX 2080", r"RTX 2080\b", (7, 5), 46, 8, 448, 64, 10.1, 40.3, None, None, 161.1, None),
    GPUSpec(
        "a100-80gb",
        "NVIDIA A100 80GB SXM",
        r"A100",
        (8, 0),
        108,
        80,
        2039,
        163,
        19.5,
        312,
        312,
        156,
        624,
        None,
        min_memory_gb=60,
    ),
    GPUSpec("a100", "NVIDIA A100 40GB", r"A100", (8, 0), 108, 40, 1555, 163, 19.5, 312, 312, 156, 624, None),
    GPUSpec("a10", "NVIDIA A10", r"\bA10\b", (8, 6), 72, 24, 600, 99, 31.2, 125, 125, 62.5, 250, None),
    GPUSpec("rtx3090", "GeForce RTX 3090", r"RTX 3090", (8, 6), 82, 24, 936, 99, 35.6, 71, 71, 35.6, 284, None),
    GPUSpec("rtx3080", "GeForce RTX 3080", r"RTX 3080", (8, 6), 68, 10, 760, 99, 29.8, 59.5, 59.5, 29.8, 238, None),
    GPUSpec("l4", "NVIDIA L4", r"\bL4\b", (8, 9), 58, 24, 300, 99, 30.3, 121, 121, 60, 242.5, 242.5),
    GPUSpec("l40s", "NVIDIA L40S", r"L40S", (8, 9), 142, 48, 864, 99, 91.6, 362, 362, 183, 733, 733),
    GPUSpec(
        "rtx4090", "GeForce RTX 4090", r"RTX 4090", (8, 9), 128, 24, 1008, 99, 82.6, 165.2, 165.2, 82.6, 660.6, 330.3
    ),
    GPUSpec(
        "rtx4080", "GeForce RTX 4080", r"RTX 4080", (8, 9), 76, 16, 716.8, 99, 48.7, 97.5, 97.5, 48.7, 389.9, 194.9
    ),
    GPUSpec(
        "h100-pcie", "NVIDIA H100 PCIe", r"H100 PCIe", (9, 0), 114, 80, 2000, 227, 51.2, 756.5, 756.5, 378, 1513, 1513
    ),
    GPUSpec("h100", "NVIDIA H100 SXM", r"H100", (9, 0), 132, 80, 3350, 227, 67, 989.4, 989.4, 494.7, 1978.9, 1978.9),
    GPUSpec("h200", "NVIDIA H200", r"H200", (9, 0), 132, 141, 4800, 227, 67, 989.4, 989.4, 494.7, 1978.9, 1978.9),
    GPUSpec("b200", "NVIDIA B200", r"B200", (10, 0), 148, 180, 8000, 227, 80, 2250, 2250, 1100, 4500, 4500),
)


def spec_by_key(key: str) -> GPUSpec | None:
    """The spec whose key is ``key`` (case-insensitive), or ``None``."""
    wanted = key.strip().lower()
    return next((s for s in GPU_SPECS if s.key == wanted), None)


def find_spec(device_name: str, memory_gb: float | None = None) -> GPUSpec | None:
    """The first spec whose pattern matches a CUDA device name such as ``"NVIDIA H100 80GB HBM3"``."""
    return next((s for s in GPU_SPECS if s.matches(device_name, memory_gb)), None)


def architecture_name(major: int, minor: int) -> str:
    """NVIDIA's architecture name for a compute capability; ``"unknown (sm_XY)"`` for one not listed."""
    if major == 7:
        return "Turing" if minor >= 5 else "Volta"
    if major == 8:
        return "Ada" if minor == 9 else "Ampere"
    names = {3: "Kepler", 5: "Maxwell", 6: "Pascal", 9: "Hopper", 10: "Blackwell", 11: "Blackwell", 12: "Blackwell"}
    return names.get(major, f"unknown (sm_{major}{minor})")
