"""``enable_flash_attention``: route a model's attention through :func:`flash_attention_forward`.

Two kinds of models are understood:

* Hugging Face ``transformers`` models whose attention goes through ``AttentionInterface`` (Llama, Mistral,
  Qwen2, Gemma and most decoder families of transformers 5): an attention function is registered under the
  name ``"llamatelemetry"`` and selected with ``model.set_attn_implementation``. Its mask function is
  transformers' own SDPA one, so the function receives either no mask (plain causal) or the exact boolean mask
  the model wants; a mask is checked against the causal / sliding-window pattern the kernels compute, with any
  padding removed row by row (left padding; right padding, whose rows after the last real token see every real
  key and run as one non-causal call; right padding with a sliding window is refused), and a mask that is
  anything else raises instead of being ignored.
* ``torch.nn.MultiheadAttention`` modules (anywhere in the model): their ``forward`` is replaced by one that
  computes the same projections and calls :func:`flash_attention_forward` (``nn.TransformerEncoderLayer``'s
  fused inference fast path, which would bypass it, is turned off for the patched layers). Calls the kernels
  cannot express (``need_weights=True``, ``key_padding_mask``, an ``attn_mask`` that is not the causal one) run
  the original ``forward``, unchanged.

The model's own attention parameters (causality, scale, sliding window, softcap, dropout rate) always win, so
outputs equal the unpatched model's; from the config, ``window_size`` narrows the window further (deliberately
changing the outputs beyond it), ``backend`` forces an implementation and ``dropout_p``, if set, replaces the
model's dropout rate in training. transformers is imported only when a transformers model is given.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_flashattn._hf_hook import install
from llamatelemetry_flashattn.attention import flash_attention_forward
from llamatelemetry_flashattn.config import FlashAttentionConfig
from llamatelemetry_flashattn.reference import visibility_mask

__all__ = ["HF_ATTENTION_NAME", "disable_flash_attention", "enable_flash_attention"]

HF_ATTENTION_NAME = "llamatelemetry"
_CONFIG_ATTR = "_llamatelemetry_flash_config"
_ORIGINAL_FORWARD_ATTR = "_llamatelemetry_original_forward"
_PREVIOUS_IMPL_ATTR = "_llamatelemetry_previous_attn_implementation"
_FASTPATH_ATTR = "_llamatelemetry_activation_relu_or_gelu"


# --- window arithmetic -------------------------------------------------------------------------------------------


def _narrower(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    """The intersection of two windows (``-1`` = unbounded)."""
    if a is None:
        return b
    if b is None:
        return a

    def side(x: int, y: int) -> int:
        return y if x == -1 else x if y == -1 else min(x, y)

    return side(a[0], b[0]), side(a[1], b[1])


def _hf_window(sliding_window: object) -> tuple[int, int] | None:
    """transformers' ``sliding_window=W`` lets a query see the W keys ending at itself: left = W - 1."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0:
        raise ConfigurationError(f"expected the model's sliding_window to be a positive int, got {sliding_window!r}")
    return sliding_window - 1, -1


# --- Hugging Face transformers -----------------------------------------------------------------------------------


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A transformers mask as booleans, True where attention is allowed (bool masks, or additive float ones)."""
    return mask if mask.dtype == torch.bool else mask == 0


class _RowPlan:
    """How to run one batch row of a masked call: its query rows and keys, or ``None`` when it has no query.

    ``full_span`` holds the query rows after the last key under right padding: causal masking lets each of them
    see every key, so they run as one non-causal call over ``key_span``.
    """

    __slots__ = ("full_span", "key_span", "query_span")

    def __init__(
        self, query_span: tuple[int, int], key_span: tuple[int, int], full_span: tuple[int, int] | None = None
    ) -> None:
        self.query_span = query_span
        self.key_span = key_span
        self.full_span = full_span

    def same_as(self, other: _RowPlan) -> bool:
        return (self.query_span, self.key_span, self.full_span) == (other.query_span, other.key_span, other.full_span)


def _span(flags: torch.Tensor) -> tuple[int, int] | None:
    """(start, end) of the True entries of a 1-D bool tensor when they are contiguous; ``None`` when none is."""
    idx = flags.nonzero().flatten()
    if idx.numel() == 0:
        return None
    start, end = int(idx[0]), int(idx[-1]) + 1
    if end - start != idx.numel():
        raise ConfigurationError(
            "expected each row's attention mask to allow one contiguous run of keys (left or right padding), "
            "got a mask with gaps; use model.set_attn_implementation('sdpa') for such masks"
        )
    return start, end


def _plan_rows(allowed: torch.Tensor, causal: bool, window: tuple[int, int] | None, kind: str) -> list[_RowPlan | None]:
    """Check a [B, q_len, kv_len] mask against the pattern the kernels compute, once per batch row."""
    plans: list[_RowPlan | None] = []
    for row in allowed:
        query_span = _span(row.any(dim=1))
        key_span = _span(row.any(dim=0))
        if query_span is None or key_span is None:
            plans.append(None)
            continue
        (q0, q1), (k0, k1) = query_span, key_span
        if _matches(row[q0:q1, k0:k1], causal, window):
            plans.append(_RowPlan(query_span, key_span))
            continue
        # Right padding under a causal mask: the rows after the last real token see every real key. The causal
        # part ends at the first row that sees them all; everything after it must see them all too.
        sees_all = row[q0:q1, k0:k1].all(dim=1).nonzero().flatten()
        split = q0 + int(sees_all[0]) + 1 if causal and window is None and sees_all.numel() else q1
        if split < q1 and bool(row[split:q1, k0:k1].all()) and _matches(row[q0:split, k0:k1], causal, window):
            plans.append(_RowPlan((q0, split), key_span, (split, q1)))
            continue
        raise ConfigurationError(
            f"{kind}: the attention mask is neither {'causal' if causal else 'full'} attention"
            f"{'' if window is None else f' with window {window}'} nor that with padding; "
            "llamatelemetry's attention does not take arbitrary masks (left and right padding are handled; "
            "right padding with a sliding window is not). Use model.set_attn_implementation('sdpa')"
        )
    return plans


def _matches(sub: torch.Tensor, causal: bool, window: tuple[int, int] | None) -> bool:
    """Whether a ``[q, k]`` block of a mask is exactly the pattern the kernels compute for it."""
    expected = visibility_mask(sub.shape[0], sub.shape[1], causal=causal, window_size=window, device=sub.device)
    return bool(sub.all()) if expected is None else torch.equal(sub, expected)


_plan_cache: dict[
    tuple[int, bool, tuple[int, int] | None], tuple[weakref.ref[torch.Tensor], list[_RowPlan | None]]
] = {}


def _cached_plan(mask: torch.Tensor, causal: bool, window: tuple[int, int] | None, kind: str) -> list[_RowPlan | None]:
    # Every layer of one forward receives the same mask object: analyse it once.
    key = (id(mask), causal, window)
    hit = _plan_cache.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    allowed = _allowed(mask)
    if allowed.dim() == 4:  # [B, 1 or H, q_len, kv_len]
        if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
            raise ConfigurationError(f"{kind}: expected one attention mask for all heads, got one per head")
        allowed = allowed[:, 0]
    elif allowed.dim() != 3:
        raise ConfigurationError(f"{kind}: expected a [B, 1, q_len, kv_len] attention mask, got {list(mask.shape)}")
    plans = _plan_rows(allowed, causal, window, kind)
    _plan_cache.clear()
    _plan_cache[key] = (weakref.ref(mask), plans)
    return plans


def _hf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q ``[B, H, Sq, D]``, k/v ``[B, H_kv, Skv, D]``.

    Returns ``([B, Sq, H, D], None)``: attention weights are never materialised.
    """
    config: FlashAttentionConfig = getattr(module, _CONFIG_ATTR, None) or FlashAttentionConfig()
    kind = type(module).__name__
    if kwargs.get("output_attentions"):
        raise ConfigurationError(f"{kind}: attention weights are never materialised; pass output_attentions=False")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    model_window = _hf_window(sliding_window)
    window = _narrower(model_window, config.window_size)
    dropout_p = config.dropout_p if (config.dropout_p > 0 and module.training) else float(dropout)
    model_softcap = softcap if softcap else None
    if config.softcap is not None and model_softcap is not None and config.softcap != model_softcap:
        raise ConfigurationError(f"{kind}: the model caps logits at {model_softcap}, the config at {config.softcap}")
    cap = model_softcap if model_softcap is not None else config.softcap
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def run(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, masked: bool = causal) -> torch.Tensor:
        return flash_attention_forward(
            qs,
            ks,
            vs,
            causal=masked,
            dropout_p=dropout_p,
            softmax_scale=scaling,
            window_size=window,
            softcap=cap,
            training=module.training,
            backend=config.backend,
        )

    if attention_mask is None:
        return run(q, k, v), None
    allowed_len = attention_mask.shape[-1]
    if allowed_len < k.shape[1]:  # a static cache longer than the mask: the tail is unused
        k, v = k[:, :allowed_len], v[:, :allowed_len]
    if torch.compiler.is_compiling():
        return _traced_masked_attention(q, k, v, attention_mask, config, kind, scaling, cap, dropout_p, module), None
    plans = _cached_plan(attention_mask, causal, model_window, kind)
    first = plans[0]
    if first is not None and first.full_span is None and all(p is not None and p.same_as(first) for p in plans):
        (q0, q1), (k0, k1) = first.query_span, first.key_span
        if (q0, q1) == (0, q.shape[1]):  # every row alike (no padding, or the same padding): one call
            return run(q, k[:, k0:k1], v[:, k0:k1]), None
    out = torch.zeros_like(q)
    for b, plan in enumerate(plans):
        if plan is None:
            continue
        (q0, q1), (k0, k1) = plan.query_span, plan.key_span
        out[b : b + 1, q0:q1] = run(q[b : b + 1, q0:q1], k[b : b + 1, k0:k1], v[b : b + 1, k0:k1])
        if plan.full_span is not None:
            f0, f1 = plan.full_span
            out[b : b + 1, f0:f1] = run(q[b : b + 1, f0:f1], k[b : b + 1, k0:k1], v[b : b + 1, k0:k1], False)
    return out, None


def _traced_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor,
    config: FlashAttentionConfig,
    kind: str,
    scaling: float | None,
    softcap: float | None,
    dropout_p: float,
    module: torch.nn.Module,
) -> torch.Tensor:
    """An explicit mask under ``torch.compile``: PyTorch SDPA with that mask, ``[B, Sq, H, D]`` out.

    Planning a masked call reads the mask's values (which rows and keys it allows), which a traced graph cannot
    do without breaking. transformers builds the mask with its SDPA mask function (registered for this
    implementation), so SDPA over it computes what transformers' ``"sdpa"`` implementation computes.
    """
    if softcap is not None or config.window_size is not None:
        raise ConfigurationError(
            f"{kind}: under torch.compile an explicit attention mask runs through PyTorch SDPA, which has no "
            f"softcap or extra window (got softcap={softcap}, window_size={config.window_size}); compile without "
            "a mask (no padding), or leave softcap and window_size unset in the FlashAttentionConfig"
        )
    allowed = _allowed(attention_mask)
    heads, kv_heads = q.shape[2], k.shape[2]
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)
    if heads != kv_heads:
        kh, vh = kh.repeat_interleave(heads // kv_heads, dim=1), vh.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), kh, vh, attn_mask=allowed, dropout_p=dropout_p if module.training else 0.0, scale=scaling
    )
    return out.transpose(1, 2)


def _register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_ATTENTION_NAME, _hf_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, sdpa_mask)


def register_when_transformers_loads() -> None:
    """Make ``attn_implementation="llamatelemetry"`` known to transformers as soon as its modeling code is loaded
    (at once if it is); called when this component is imported. A transformers too old for these interfaces is
    left alone here: :func:`enable_flash_attention` then says what is missing."""

    def register() -> None:
        # Without AttentionInterface / AttentionMaskInterface, enable_flash_attention raises with the reason.
        with contextlib.suppress(ImportError):
            _register_with_transformers()

    install(register)


def _is_transformers_model(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "set_attn_implementation")


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type={getattr(config, 'model_type', '?')!r})"


def _enable_transformers(module: torch.nn.Module, config: FlashAttentionConfig) -> None:
    model: Any = module  # a transformers PreTrainedModel, typed loosely: transformers is optional
    if not type(model)._can_set_attn_implementation():
        raise CapabilityError(
            f"cannot route the attention of {_model_type(model)} through llamatelemetry: its attention does not "
            "go through transformers' AttentionInterface. Supported: decoder families that do (Llama, Mistral, "
            "Qwen2, Gemma, ...)"
        )
    if (
        not config.causal
        and getattr(model.config, "is_decoder", True)
        and not getattr(model.config, "is_encoder_decoder", False)
    ):
        raise ConfigurationError(
            f"{_model_type(model)} is a causal decoder: its attention stays causal; "
            "leave FlashAttentionConfig.causal=True"
        )
    _register_with_transformers()
    previous = model.config._attn_implementation
    model.set_attn_implementation(HF_ATTENTION_NAME)
    if model.config._attn_implementation != HF_ATTENTION_NAME:
        raise CapabilityError(f"{_model_type(model)} refused attn_implementation={HF_ATTENTION_NAME!r}")
    if previous != HF_ATTENTION_NAME:
        setattr(model, _PREVIOUS_IMPL_ATTR, previous)
    for submodule in model.modules():
        setattr(submodule, _CONFIG_ATTR, config)


# --- torch.nn.MultiheadAttention ---------------------------------------------------------------------------------


def _is_causal_mask(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """True when ``mask`` (MultiheadAttention's convention: True or -inf = blocked) is exactly the causal mask."""
    if mask.dim() != 2 or tuple(mask.shape) != (q_len, kv_len):
        return False
    blocked = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    if mask.dtype != torch.bool and not bool(((mask == 0) | blocked).all()):
        return False
    expected = visibility_mask(q_len, kv_len, causal=True, device=mask.device)
    return expected is not None and torch.equal(~blocked, expected)


def _mha_forward(
    self: torch.nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    original: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = getattr(self, _ORIGINAL_FORWARD_ATTR)
    batched = query.dim() == 3
    seq_first = not self.batch_first
    q_len = query.shape[0 if seq_first or not batched else 1]
    kv_len = key.shape[0 if seq_first or not batched else 1]
    causal = False
    if attn_mask is not None:
        causal = is_causal or _is_causal_mask(attn_mask, q_len, kv_len)
    elif is_causal:
        causal = True
    expressible = (
        not need_weights
        and key_padding_mask is None
        and (attn_mask is None or causal)
        and self.bias_k is None
        and not self.add_zero_attn
        and self._qkv_same_embed_dim
    )
    if not expressible:
        return original(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
    config: FlashAttentionConfig = getattr(self, _CONFIG_ATTR)
    if not batched:
        query, key, value = (
            query.unsqueeze(1 if seq_first else 0),
            key.unsqueeze(1 if seq_first else 0),
            value.unsqueeze(1 if seq_first else 0),
        )
    if seq_first:  # [S, B, E] -> [B, S, E]
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    embed, heads = self.embed_dim, self.num_heads
    head_dim = embed // heads
    w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    in_bias: torch.Tensor | None = self.in_proj_bias
    b_q, b_k, b_v = (None, None, None) if in_bias is None else in_bias.chunk(3)
    batch = query.shape[0]
    q = F.linear(query, w_q, b_q).view(batch, -1, heads, head_dim)
    k = F.linear(key, w_k, b_k).view(batch, -1, heads, head_dim)
    v = F.linear(value, w_v, b_v).view(batch, -1, heads, head_dim)
    dropout_p = config.dropout_p if config.dropout_p > 0 else self.dropout
    out = flash_attention_forward(
        q,
        k,
        v,
        causal=causal,
        dropout_p=dropout_p,
        window_size=config.window_size,
        training=self.training,
        backend=config.backend,
    )
    out = self.out_proj(out.reshape(batch, -1, embed))
    if seq_first:
        out = out.transpose(0, 1)
    if not batched:
        out = out.squeeze(1 if seq_first else 0)
    return out, None


def _enable_mha(module: torch.nn.MultiheadAttention, config: FlashAttentionConfig) -> None:
    if not hasattr(module, _ORIGINAL_FORWARD_ATTR):
        setattr(module, _ORIGINAL_FORWARD_ATTR, module.forward)
        module.forward = types.MethodType(_mha_forward, module)  # type: ignore[method-assign]
    setattr(module, _CONFIG_ATTR, config)


# --- the public entry points -------------------------------------------------------------------------------------


def enable_flash_attention(model: torch.nn.Module, config: FlashAttentionConfig | None = None) -> torch.nn.Module:
    """Make ``model`` compute its attention with :func:`flash_attention_forward`; returns the same model.

    Works on transformers models whose attention goes through ``AttentionInterface`` (Llama, Mistral, Qwen2,
    Gemma families, ...) and on any module holding ``torch.nn.MultiheadAttention`` layers; see the module
    docstring for what is kept from the model and what comes from ``config``. Calling it again replaces the
    config. Raises ``CapabilityError`` naming the model type when there is nothing it can route.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module, got {type(model).__name__}")
    config = config if config is not None else FlashAttentionConfig()
    if not isinstance(config, FlashAttentionConfig):
        raise TypeError(f"expected config to be a FlashAttentionConfig or None, got {type(config).__name__}")
    if _is_transformers_model(model):
        _enable_transformers(model, config)
        return model
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    if not mha:
        raise CapabilityError(
            f"cannot route the attention of {type(model).__module__}.{type(model).__name__}: expected a "
            "transformers model whose attention goes through AttentionInterface (Llama, Mistral, Qwen2, Gemma, "
            "...) or a module containing torch.nn.MultiheadAttention layers, found neither"
        )
    for module in mha:
        _enable_mha(module, config)
    for layer in model.modules():
        # nn.TransformerEncoderLayer's inference fast path calls a fused kernel instead of self_attn.forward;
        # this flag is one of its conditions and changes nothing else (the slow path uses self.activation).
        if isinstance(layer, torch.nn.TransformerEncoderLayer) and _FASTPATH_ATTR not in layer.__dict__:
            layer.__dict__[_FASTPATH_ATTR] = layer.activation_relu_or_gelu
            layer.activation_relu_or_gelu = 0
    return model


def disable_flash_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_flash_attention`: the previous attention implementation and forwards come back."""
    previous = getattr(model, _PREVIOUS_IMPL_ATTR, None)
    if previous is not None and _is_transformers_model(model):
        model.set_attn_implementation(previous)  # type: ignore[operator]
        delattr(model, _PREVIOUS_IMPL_ATTR)
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL_FORWARD_ATTR, None)
        if original is not None:
            module.__dict__.pop("forward", None)
        module.__dict__.pop(_CONFIG_ATTR, None)
        if _FASTPATH_ATTR in module.__dict__:
            module.activation_relu_or_gelu = module.__dict__.pop(_FASTPATH_ATTR)
    return model
