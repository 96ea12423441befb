"""Where the host time of an eager call goes on a GPU machine: public operations at tiny shapes, where the GPU
finishes before Python has issued the next call, so the time per call is the host's.

For each case: microseconds per call from Python (``host_us`` of ``llamatelemetry_core.testing.bench``), the same
work replayed from a CUDA graph (GPU time), the native torch call it stands for, and a bare Triton launch of an empty
kernel (the floor of any Triton launch from Python on this host). Then a cProfile of the eager loop per case, by
own time: what the library adds, what Triton's launcher adds.

    python benchmarks/host/profile_gpu_eager.py --out DIR     # PYTHONPATH: every packages/*/src
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llamatelemetry_core.testing.bench import gpu_ms, host_us, progress
from llamatelemetry_flashattn import flash_attention_forward
from llamatelemetry_tensorcore import matmul_tensor_core
from llamatelemetry_tensorcore._fused_kernels import fused_matmul
from llamatelemetry_triton import triton_layernorm, triton_linear, triton_rmsnorm
from llamatelemetry_triton._compat import tl, triton

CALLS = 1000


@triton.jit  # type: ignore[untyped-decorator]
def _empty_kernel(x_ptr, y_ptr, n, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    pid = tl.program_id(0)
    if pid < 0:  # never: the launch is the subject
        tl.store(y_ptr + n, tl.load(x_ptr) * eps)


def profile(fn: Callable[[], object], top: int = 14, calls: int = 500) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    return "\n".join(lines[3:])  # from the column header on


def cases(device: torch.device) -> list[tuple[str, Callable[[], object], Callable[[], object] | None]]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    x, w, b = randn(4, 2048), randn(2048), randn(2048)
    a32, b32 = randn(64, 64, dtype=torch.float32), randn(64, 64, dtype=torch.float32)
    q, kv = randn(1, 1, 32, 64), randn(1, 256, 8, 64)
    lin_w = randn(2048, 2048)
    y = torch.empty(4096, device=device)
    return [
        ("empty Triton kernel (launch floor)", lambda: _empty_kernel[(1,)](x, y, 0, 1e-6, BLOCK=128), None),
        ("triton_rmsnorm 4x2048 fp16", lambda: triton_rmsnorm(x, w, 1e-6), lambda: F.rms_norm(x, (2048,), w, 1e-6)),
        (
            "triton_layernorm 4x2048 fp16",
            lambda: triton_layernorm(x, w, b, 1e-5),
            lambda: F.layer_norm(x, (2048,), w, b, 1e-5),
        ),
        ("triton_linear 1x2048x2048 fp16", lambda: triton_linear(x[:1], lin_w), lambda: F.linear(x[:1], lin_w)),
        ("matmul_tensor_core 64^3 fp32", lambda: matmul_tensor_core(a32, b32), lambda: torch.matmul(a32, b32)),
        ("fused_matmul 64^3 fp32 (launcher only)", lambda: fused_matmul(a32, b32, None), None),
        (
            "flash_attention_forward decode 32/8 heads, 256 keys",
            lambda: flash_attention_forward(q, kv, kv, causal=False),
            lambda: F.scaled_dot_product_attention(
                q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), enable_gqa=True
            ),
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="folder for profile.txt and summary.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_gpu_eager: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows = []
    profiles = []
    for name, fn, native in cases(device):
        progress(name)
        eager = host_us(fn, calls=CALLS)
        graph = gpu_ms(fn, graph=True, reps=20) * 1e3
        native_us = host_us(native, calls=CALLS) if native is not None else float("nan")
        rows.append(f"| {name} | {eager:.1f} | {graph:.1f} | {native_us:.1f} |")
        profiles.append(f"== {name}: {eager:.1f} us per eager call\n{profile(fn)}")
    title = (
        f"Eager host cost on {torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__})"
    )
    table = "\n".join(
        [
            f"# {title}",
            "",
            f"Host us per call from Python (core's host_us: the lowest of 7 means over {CALLS} calls; the GPU work "
            "is shorter, so the queue never fills); GPU us: the same call replayed from a CUDA graph; native: the "
            "torch call it stands for, timed the same way.",
            "",
            "| case | eager us/call | GPU us (graph) | native torch us/call |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print("\n\n".join(profiles))
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.txt").write_text("\n\n".join(profiles) + "\n", encoding="utf-8")
        (args.out / "summary.md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
