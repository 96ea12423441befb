"""Where ``flash_attention_forward``'s automatic path spends time beside the kernel, on one CUDA GPU.

Usage (from the repository root, no installs):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/flashattn/probe_dispatch_cost.py

1. Host synchronisation: the automatic call runs under ``torch.cuda.set_sync_debug_mode("error")``; a call that
   waits for the GPU (``.item()``, ``.tolist()``, a pageable copy) stops the host from queueing ahead, so its host
   cost adds to the kernel's instead of hiding behind it. The traceback names the line.
2. Non-finite inputs: how each raw SDPA backend and the Triton kernel treat a NaN or infinite query row, and a
   NaN key or value, against the reference's rule (a row that holds NaN or inf and sees a key is NaN; a NaN key
   or value poisons the rows that see it; other rows stay finite). A backend that already follows the rule needs
   no extra pass over its output.
3. Timings at the guide's prefill shape and a long one (CUDA events, median): the raw backend, the automatic call,
   the same call with the backend forced, the non-finite pass alone, and the host time of one automatic call.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamatelemetry_core.testing.bench import gpu_ms
from llamatelemetry_flashattn import flash_attention_forward
from llamatelemetry_flashattn._special import propagate_query_nan

SHAPES = [(2, 2048, 32, 64), (1, 8192, 32, 128)]
BACKENDS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}


def queued_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """Wall time of ``calls`` back-to-back calls per call: the larger of host and GPU cost when nothing syncs."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def host_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Host time of one call while the GPU is kept busy (a long sleep kernel queued first), in microseconds."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # type: ignore[no-untyped-call]  # keeps the stream busy so queued calls cannot wait on results
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def raw(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    heads, kv_heads = q.shape[2], k.shape[2]
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=heads != kv_heads
        )
    return out.transpose(1, 2)


def sync_check() -> None:
    print("== 1. host synchronisation in the automatic call", flush=True)
    for b, length, h, d in [*SHAPES, (1, 1, 32, 128)]:
        kv_len = 4096 if length == 1 else length
        for label, kv_heads in (("gqa4", h // 4), ("mha", h)):
            q = torch.randn(b, length, h, d, device="cuda", dtype=torch.float16)
            k = torch.randn(b, kv_len, kv_heads, d, device="cuda", dtype=torch.float16)
            flash_attention_forward(q, k, k, causal=True)  # warm caches first: the first call may resolve lazily
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            name = f"B{b} L{length} kv{kv_len} H{h} D{d} {label}"
            try:
                flash_attention_forward(q, k, k, causal=True)
                print(f"  {name}: no synchronisation")
            except RuntimeError:
                print(f"  {name}: SYNCHRONISES:")
                print("    " + "    ".join(traceback.format_exc().splitlines(keepends=True)[-12:]))
            finally:
                torch.cuda.set_sync_debug_mode("default")


def special_values() -> None:
    print("== 2. non-finite inputs, raw backends (rule: NaN rows exactly where the reference has them)", flush=True)
    b, length, h, d = 2, 256, 8, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(b, length, h, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3)]
    # name -> (q, k, v, rows holding a non-finite query, (batch, head, position) of a non-finite key or value)
    cases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, set[tuple[int, int, int]] | None,
                           tuple[int, int, int] | None]] = {}  # fmt: skip
    q, k, v = (t.clone() for t in base)
    q[0, 100, 3, 5] = float("nan")
    cases["q NaN row"] = (q, k, v, {(0, 100, 3)}, None)
    q, k, v = (t.clone() for t in base)
    q[1, 7, 2, 0] = float("inf")
    cases["q inf row"] = (q, k, v, {(1, 7, 2)}, None)
    q, k, v = (t.clone() for t in base)
    k[0, 200, 1, 9] = float("nan")
    cases["k NaN at 200"] = (q, k, v, None, (0, 1, 200))
    q, k, v = (t.clone() for t in base)
    v[1, 50, 4, 0] = float("nan")
    cases["v NaN at 50"] = (q, k, v, None, (1, 4, 50))
    impls: dict[str, Callable[..., torch.Tensor]] = {
        name: (lambda q, k, v, be=be: raw(be, q, k, v)) for name, be in BACKENDS.items()
    }
    from llamatelemetry_flashattn.triton_kernel import triton_attention

    impls["triton kernel"] = lambda q, k, v: triton_attention(q, k, v, causal=True, softmax_scale=None,
                                                             window_size=None, softcap=None)  # fmt: skip
    impls["flash_attention_forward"] = lambda q, k, v: flash_attention_forward(q, k, v, causal=True)
    for name, fn in impls.items():
        verdicts = []
        for case, (q, k, v, rows, from_key) in cases.items():
            try:
                out = fn(q, k, v)
            except Exception as exc:  # a backend that refuses the call says so
                verdicts.append(f"{case}: refused ({type(exc).__name__})")
                continue
            row_nan = out.isnan().any(dim=-1)  # [B, L, H]
            expected = torch.zeros_like(row_nan)
            if rows is not None:
                for bi, li, hi in rows:
                    expected[bi, li, hi] = True
            if from_key is not None:
                bi, hi, pos = from_key
                expected[bi, pos:, hi] = True  # causal: rows at or after the key see it (GQA absent: heads equal)
            ok = bool(torch.equal(row_nan, expected))
            extra = int((row_nan & ~expected).sum())
            missing = int((expected & ~row_nan).sum())
            verdicts.append(f"{case}: {'OK' if ok else f'WRONG (+{extra} NaN rows, -{missing} missing)'}")
        print(f"  {name:24s} " + "; ".join(verdicts), flush=True)


def timing_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], object]]:
    out = raw(SDPBackend.CUDNN_ATTENTION, q, k, v)

    def nan_pass() -> torch.Tensor:
        return propagate_query_nan(q, out, causal=True, window_size=None, kv_len=k.shape[1])

    return {
        "raw sdpa_cudnn": lambda: raw(SDPBackend.CUDNN_ATTENTION, q, k, v),
        "auto": lambda: flash_attention_forward(q, k, v, causal=True),
        "backend=sdpa_cudnn": lambda: flash_attention_forward(q, k, v, causal=True, backend="sdpa_cudnn"),
        "propagate_query_nan": nan_pass,
    }


def timings() -> None:
    print("== 3. timings (ms; host us = host time of one call with the GPU kept busy)", flush=True)
    for b, length, h, d in SHAPES:
        q, k, v = (torch.randn(b, length, h, d, device="cuda", dtype=torch.float16) for _ in range(3))
        for name, fn in timing_rows(q, k, v).items():
            print(
                f"  B{b} L{length} H{h} D{d} {name:22s} gpu {gpu_ms(fn):.4f}  queued {queued_ms(fn):.4f}  "
                f"host {host_us(fn):.1f} us",
                flush=True,
            )


def runtime_calls() -> None:
    print("== 4. CUDA runtime calls of one automatic call (torch.profiler), with the Python stack of waits", flush=True)
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(2, 2048, 32, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    flash_attention_forward(q, k, v, causal=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(3):
            flash_attention_forward(q, k, v, causal=True)
        torch.cuda.synchronize()
    for evt in prof.key_averages():
        if evt.key.startswith("cu") and not evt.key.startswith("cutlass"):
            print(f"  {evt.count // 3:3d}x {evt.key}  cpu {evt.cpu_time_total / 3:.1f} us")
    for evt in prof.events():
        low = evt.name.lower()
        if any(w in low for w in ("synchronize", "memcpy", "memgetinfo", "query", "getdeviceproperties")):
            stack = [f for f in (evt.stack or []) if "llamatelemetry" in f or "probe" in f][:6]
            print(f"  {evt.name}: " + " <- ".join(stack))


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_dispatch_cost: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    sync_check()
    special_values()
    timings()
    runtime_calls()
    return 0


if __name__ == "__main__":
    sys.exit(main())
