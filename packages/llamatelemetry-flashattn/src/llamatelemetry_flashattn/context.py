"""How long a context fits in GPU memory: a documented estimate, not a table of magic numbers.

For a context of ``n`` tokens and ``batch_size`` sequences, inference needs (bytes)::

    weights        = params * bytes_per_param(quantization)
    kv_cache       = batch * n * 2 * layers * kv_heads * head_dim * bytes(kv_dtype)
    activations    = batch * n * (16 * hidden * 2 + vocab * 4)        # one layer's prefill peak + fp32 logits
    attention      = batch * heads * n * 4                            # FlashAttention: O(n) softmax statistics
                   = batch * heads * n * n * 8                        # without: O(n^2) scores (fp16 logits, fp32
                                                                      #   softmax, fp16 probabilities)

and the context is the longest power of two ``n`` with ``weights + kv_cache + activations + attention <=
(1 - headroom) * available``, clamped to ``[min_context, max_context]``. ``headroom`` (10%) is left to the CUDA
context and allocator fragmentation. The activation term counts the residual stream, its normalised copy, q/k/v,
the attention output and a 4x-wide MLP (gate, up, activation): about 16 values of width ``hidden`` per token,
in fp16; the logits of every prompt position are materialised in fp32, as a plain Hugging Face forward does.

Architecture values not given are estimated from the parameter count with the usual decoder proportions
(``params ~= 12 * layers * hidden^2``, ``layers ~= hidden / 128``, ``head_dim = 128``, as many KV heads as query
heads: the conservative, pre-GQA assumption), so the estimate grows with the model and never shrinks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llamatelemetry_core.errors import CapacityError, ConfigurationError

__all__ = [
    "BYTES_PER_PARAM",
    "KV_BYTES",
    "MemoryEstimate",
    "estimate_inference_memory",
    "get_optimal_context_length",
]

GIB = 1024**3
# Q4 formats store 4-bit weights plus a 16-bit scale per 32 (GGUF Q4_0): 4.5 bits per parameter.
BYTES_PER_PARAM: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "q8": 1.0625, "q4": 0.5625}
KV_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0}
HEADROOM = 0.10
DEFAULT_VOCAB = 131072  # between Llama 3 (128K) and Gemma 3 (262K); pass the model's own
_ACTIVATION_WIDTHS = 16
_LAYERS_PER_WIDTH = 1 / 128
_DEFAULT_HEAD_DIM = 128


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed at one context length (see the module docstring for each term)."""

    context_length: int
    weights: float
    kv_cache: float
    activations: float
    attention: float
    budget: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.attention

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def _positive_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"expected {name} to be a finite number > 0, got {value!r}")
    return float(value)


def _optional_positive_int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"expected {name} to be None (estimate it) or an integer > 0, got {value!r}")
    return value


def _choice(value: object, table: dict[str, float], name: str) -> float:
    key = value.lower() if isinstance(value, str) else value
    if key not in table:
        raise ConfigurationError(f"expected {name} to be one of {sorted(table)}, got {value!r}")
    return table[key]


@dataclass(frozen=True)
class _Shape:
    layers: float
    hidden: float
    heads: float
    kv_heads: float
    head_dim: float
    vocab: float


def _shape(
    params: float,
    num_layers: int | None,
    hidden_size: int | None,
    num_heads: int | None,
    num_kv_heads: int | None,
    head_dim: int | None,
    vocab_size: int | None,
) -> _Shape:
    # Real-valued estimates (no rounding), so that each grows continuously with the parameter count.
    hidden = float(hidden_size) if hidden_size is not None else (params / (12 * _LAYERS_PER_WIDTH)) ** (1 / 3)
    layers = float(num_layers) if num_layers is not None else max(1.0, hidden * _LAYERS_PER_WIDTH)
    dim = float(head_dim) if head_dim is not None else float(_DEFAULT_HEAD_DIM)
    heads = float(num_heads) if num_heads is not None else max(1.0, hidden / dim)
    kv_heads = float(num_kv_heads) if num_kv_heads is not None else heads
    vocab = float(vocab_size) if vocab_size is not None else float(DEFAULT_VOCAB)
    return _Shape(layers, hidden, heads, kv_heads, dim, vocab)


def estimate_inference_memory(
    context_length: int,
    model_size_b: float,
    available_vram_gb: float,
    use_flash_attention: bool = True,
    *,
    quantization: str = "fp16",
    kv_dtype: str = "fp16",
    batch_size: int = 1,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    vocab_size: int | None = None,
) -> MemoryEstimate:
    """The memory terms of the module docstring at ``context_length`` tokens; ``budget`` is what may be used."""
    n = float(_optional_positive_int(context_length, "context_length") or 1)
    params = _positive_number(model_size_b, "model_size_b") * 1e9
    vram = _positive_number(available_vram_gb, "available_vram_gb") * GIB
    batch = float(_optional_positive_int(batch_size, "batch_size") or 1)
    shape = _shape(
        params,
        _optional_positive_int(num_layers, "num_layers"),
        _optional_positive_int(hidden_size, "hidden_size"),
        _optional_positive_int(num_heads, "num_heads"),
        _optional_positive_int(num_kv_heads, "num_kv_heads"),
        _optional_positive_int(head_dim, "head_dim"),
        _optional_positive_int(vocab_size, "vocab_size"),
    )
    weights = params * _choice(quantization, BYTES_PER_PARAM, "quantization")
    kv = batch * n * 2 * shape.layers * shape.kv_heads * shape.head_dim * _choice(kv_dtype, KV_BYTES, "kv_dtype")
    activations = batch * n * (_ACTIVATION_WIDTHS * shape.hidden * 2 + shape.vocab * 4)
    attention = batch * shape.heads * n * 4 if use_flash_attention else batch * shape.heads * n * n * 8
    return MemoryEstimate(int(n), weights, kv, activations, attention, (1 - HEADROOM) * vram)


def get_optimal_context_length(
    model_size_b: float,
    available_vram_gb: float,
    use_flash_attention: bool = True,
    *,
    quantization: str = "fp16",
    kv_dtype: str = "fp16",
    batch_size: int = 1,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    min_context: int = 256,
    max_context: int = 131072,
) -> int:
    """The longest power-of-two context that fits ``available_vram_gb`` GiB (see the module docstring).

    ``model_size_b`` is the parameter count in billions; ``quantization`` one of ``fp32, fp16, bf16, int8, q8,
    q4``; ``kv_dtype`` one of ``fp32, fp16, bf16, fp8, int8``. Architecture arguments left out are estimated
    from the model size. The result lies in ``[min_context, max_context]`` (rounded to powers of two inside).
    When even the shortest context in that range does not fit (a 70B model on 12 GB), it raises
    :class:`~llamatelemetry_core.errors.CapacityError` (a ``MemoryError``) with the numbers, never a length.
    More VRAM never shortens the result, a bigger model never lengthens it, and without FlashAttention
    (O(n^2) attention memory) it is never longer than with it.

    Raises ``ConfigurationError`` (a ``ValueError``) for zero, negative or non-finite sizes and unknown names.
    """
    if not isinstance(use_flash_attention, bool):
        raise ConfigurationError(f"expected use_flash_attention to be True or False, got {use_flash_attention!r}")
    low = _optional_positive_int(min_context, "min_context")
    high = _optional_positive_int(max_context, "max_context")
    assert low is not None and high is not None
    if low > high:
        raise ConfigurationError(f"expected min_context <= max_context, got {low} > {high}")
    low_pow2 = 1 << (low - 1).bit_length()
    high_pow2 = 1 << (high.bit_length() - 1)
    if low_pow2 > high_pow2:
        raise ConfigurationError(
            f"expected a power of two in [min_context, max_context], there is none in [{low}, {high}]"
        )

    def estimate(n: int) -> MemoryEstimate:
        return estimate_inference_memory(
            n,
            model_size_b,
            available_vram_gb,
            use_flash_attention,
            quantization=quantization,
            kv_dtype=kv_dtype,
            batch_size=batch_size,
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=vocab_size,
        )

    def fits(n: int) -> bool:
        return estimate(n).fits

    best = low_pow2
    floor = estimate(best)  # validates every argument
    if not floor.fits:
        raise CapacityError(
            f"a {model_size_b:g}B-parameter model ({quantization}) does not fit {available_vram_gb:g} GiB even at "
            f"a context of {best}: it needs {floor.total / GIB:.2f} GiB (weights {floor.weights / GIB:.2f}, KV "
            f"cache {floor.kv_cache / GIB:.2f}, activations {(floor.activations + floor.attention) / GIB:.2f}) "
            f"of a usable {floor.budget / GIB:.2f} GiB; use a smaller or more quantized model "
            "(quantization='q4'), a smaller batch, or a GPU with more memory"
        )
    n = low_pow2 * 2
    while n <= high_pow2 and fits(n):  # memory grows with n, so the first failure ends the search
        best = n
        n *= 2
    return best
