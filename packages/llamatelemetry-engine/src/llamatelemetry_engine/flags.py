"""One switch per optimization, and what each switch resolves to on this machine.

:class:`EngineFlags` is what a user asks for; :func:`resolve_flags` says, per flag, whether it is in effect here,
which implementation runs, and why not when it is off (a CPU has no Tensor Cores or CUDA graphs; paged
attention needs the paged cache). With every flag off the engine is plain PyTorch: fp32, PyTorch norms, rotary
and activation, SDPA attention over a per-sequence KV tensor that grows by concatenation, no graphs, and static
batches that wait for their longest member.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from llamatelemetry_core.errors import ConfigurationError

__all__ = ["FLAG_NAMES", "EngineFlags", "FlagState", "ResolvedFlags", "resolve_flags"]


@dataclass(frozen=True)
class EngineFlags:
    """Which optimizations to use (all on by default).

    * ``tensor_cores``: fp16 weights and activations on a GPU with Tensor Cores (bf16 with ``dtype=bfloat16``),
      with each layer's q/k/v and gate/up projections merged into one matmul each; off, fp32 with TF32 off and
      the separate projections of transformers.
    * ``triton_kernels``: fused residual + RMSNorm, RoPE and SwiGLU kernels of ``llamatelemetry-triton``; with
      ``paged_kv``, RoPE and the paged KV write in one launch (an unquantized store; a quantized one takes the
      two calls); on a Hopper GPU (compute capability 9.x) with merged projections, one-token steps run the
      projections as few-row kernels with the norms and SwiGLU fused in.
    * ``flash_attention``: prefill attention through ``llamatelemetry-flashattn``'s dispatcher, for prefill steps
      that run eagerly (with CUDA graphs, one that fits a step graph replays it with paged attention instead).
    * ``paged_kv``: the paged KV cache of ``llamatelemetry-kvcache`` read by paged attention; off, one
      contiguous KV tensor per sequence and layer.
    * ``prefix_caching``: reuse the KV blocks of a prompt prefix already computed (needs ``paged_kv``).
    * ``cuda_graphs``: decode steps replayed from CUDA graphs bucketed by batch size, and steps that carry
      prompt tokens from graphs bucketed by token count unless ``LLM(step_graphs=False)`` (needs a GPU and
      ``paged_kv``).
    * ``continuous_batching``: the scheduler of ``llamatelemetry-batch`` admits requests as others finish;
      off, static batches that wait for their longest member.
    """

    tensor_cores: bool = True
    triton_kernels: bool = True
    flash_attention: bool = True
    paged_kv: bool = True
    prefix_caching: bool = True
    cuda_graphs: bool = True
    continuous_batching: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise ConfigurationError(
                    f"expected EngineFlags.{f.name} to be True or False, got {getattr(self, f.name)!r}"
                )

    @classmethod
    def all_off(cls) -> EngineFlags:
        """Plain PyTorch."""
        return cls(**dict.fromkeys(FLAG_NAMES, False))

    def without(self, name: str) -> EngineFlags:
        """A copy with one flag off."""
        _check_name(name)
        return replace(self, **{name: False})

    def with_only(self, name: str) -> EngineFlags:
        """Every flag off but ``name`` (and what it needs: ``paged_kv`` for prefix caching and CUDA graphs)."""
        _check_name(name)
        on = {name} | ({"paged_kv"} if name in ("prefix_caching", "cuda_graphs") else set())
        return EngineFlags(**{n: n in on for n in FLAG_NAMES})

    def as_dict(self) -> dict[str, bool]:
        """``{flag: bool}``."""
        return asdict(self)


FLAG_NAMES: tuple[str, ...] = tuple(f.name for f in fields(EngineFlags))


def _check_name(name: str) -> None:
    if name not in FLAG_NAMES:
        raise ConfigurationError(f"unknown engine flag {name!r}; expected one of {list(FLAG_NAMES)}")


@dataclass(frozen=True)
class FlagState:
    """One flag on this machine: asked for, in effect, the implementation that runs, why it is off."""

    requested: bool
    active: bool
    implementation: str
    reason: str | None = None


@dataclass(frozen=True)
class ResolvedFlags:
    """Every flag resolved for one device, plus the dtype the engine computes in."""

    device: torch.device
    dtype: torch.dtype
    states: dict[str, FlagState]

    def active(self, name: str) -> bool:
        """Whether flag ``name`` is in effect."""
        return self.states[name].active

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "flags": {name: asdict(state) for name, state in self.states.items()},
        }


def _has(module: str, name: str) -> str | None:
    """``None`` when ``module.name`` exists and is provided, else why not."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not installed ({exc})"
    if not callable(getattr(mod, name, None)):
        return f"{module} {getattr(mod, '__version__', '?')} does not provide {name}"
    return None


def _triton_state() -> str:
    from llamatelemetry_triton import HAS_TRITON

    return "triton" if HAS_TRITON else "reference (Triton not installed: the kernels' PyTorch references)"


def resolve_flags(flags: EngineFlags, device: torch.device, dtype: torch.dtype | None = None) -> ResolvedFlags:
    """What ``flags`` give on ``device``; ``dtype`` forces the compute dtype (default: from ``tensor_cores``).

    Raises :class:`ConfigurationError` for a dtype the device cannot compute in (bf16 on a GPU without it).
    """
    cuda = device.type == "cuda"
    states: dict[str, FlagState] = {}

    tc_reason = None if cuda else "no Tensor Cores on a CPU: fp32"
    if cuda and flags.tensor_cores:
        from llamatelemetry_tensorcore import check_tensor_core_support

        if not check_tensor_core_support(device):
            tc_reason = "this GPU has no Tensor Cores: fp32"
    tc_active = flags.tensor_cores and tc_reason is None
    if dtype is None:
        dtype = torch.float16 if tc_active else torch.float32
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigurationError(f"expected dtype float16, bfloat16 or float32, got {dtype}")
    if cuda and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigurationError("this GPU has no bf16; use dtype=torch.float16 (Tensor Cores) or float32")
    matmuls = f"{str(dtype).removeprefix('torch.')} matmuls, q/k/v and gate/up merged"
    states["tensor_cores"] = FlagState(
        flags.tensor_cores, tc_active and dtype != torch.float32, matmuls, None if not flags.tensor_cores else tc_reason
    )
    states["triton_kernels"] = FlagState(
        flags.triton_kernels, flags.triton_kernels, _triton_state() if flags.triton_kernels else "PyTorch"
    )
    states["flash_attention"] = FlagState(
        flags.flash_attention,
        flags.flash_attention,
        "llamatelemetry-flashattn dispatcher" if flags.flash_attention else "PyTorch SDPA",
    )
    paged_reason = _has("llamatelemetry_kvcache", "PagedKVCache") or _has("llamatelemetry_flashattn", "paged_attention")
    paged = flags.paged_kv and paged_reason is None
    states["paged_kv"] = FlagState(
        flags.paged_kv, paged, "paged KV + paged attention" if paged else "contiguous KV per sequence",
        paged_reason if flags.paged_kv else None,
    )  # fmt: skip
    prefix_reason = None if paged else "needs paged_kv"
    states["prefix_caching"] = FlagState(
        flags.prefix_caching, flags.prefix_caching and prefix_reason is None, "block hashes",
        prefix_reason if flags.prefix_caching else None,
    )  # fmt: skip
    graph_reason = "needs a CUDA GPU" if not cuda else (None if paged else "needs paged_kv (fixed-shape decode)")
    states["cuda_graphs"] = FlagState(
        flags.cuda_graphs, flags.cuda_graphs and graph_reason is None, "decode graphs by batch size",
        graph_reason if flags.cuda_graphs else None,
    )  # fmt: skip
    batch_reason = _has("llamatelemetry_batch", "ContinuousBatchingEngine")
    batching = flags.continuous_batching and batch_reason is None
    states["continuous_batching"] = FlagState(
        flags.continuous_batching, batching, "llamatelemetry-batch scheduler" if batching else "static batches",
        batch_reason if flags.continuous_batching else None,
    )  # fmt: skip
    return ResolvedFlags(device, dtype, states)
