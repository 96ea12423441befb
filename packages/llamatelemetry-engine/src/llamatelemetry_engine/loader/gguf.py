"""Weights, configuration, tokenizer and chat template from a GGUF file, with the ``gguf`` package.

Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized to fp32 by ``gguf.quants.dequantize`` and
cast to the engine's dtype later. llama.cpp stores the query and key projections of ``llama`` models with rows
permuted for its interleaved rotary layout; they are permuted back to transformers' half-split layout here, so
one model code serves every source. The tokenizer and chat template come from the file's metadata, through
transformers' GGUF tokenizer support. Nothing is unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from llamatelemetry_engine.config import ModelConfig, RopeScaling
from llamatelemetry_engine.errors import ModelLoadError
from llamatelemetry_engine.loader.weights import LoadedModel, check_state_dict

__all__ = ["load_gguf", "load_gguf_tokenizer"]

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a q/k projection (interleaved rotary pairs back to halves)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _reader(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"missing weight file {path}")
    try:
        import gguf
    except ImportError as exc:
        raise ModelLoadError(
            'reading a GGUF file needs the gguf package: pip install "llamatelemetry-engine[gguf]"'
        ) from exc
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelLoadError(f"corrupt GGUF file {path}: {exc}; download it again") from exc


def _config(fields: dict[str, Any], names: set[str], path: Path) -> ModelConfig:
    arch = str(fields.get("general.architecture", ""))
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r}; this engine runs GGUF files of {sorted(_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in names:
        raise ModelLoadError(
            f"{path}: rotary scaling stored as a rope_freqs tensor (llama3 scaling in GGUF) is not supported; "
            "load the transformers checkpoint folder of this model instead"
        )

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling_type = str(get("rope.scaling.type", "none"))
    scaling = (
        RopeScaling()
        if scaling_type in ("none", "")
        else RopeScaling(scaling_type, float(get("rope.scaling.factor", 1.0)))
    )
    vocab = get("vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    eos = fields.get("tokenizer.ggml.eos_token_id")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        model_type=_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def load_gguf(path: str | Path, *, tokenizer: bool = True) -> LoadedModel:
    """Read ``path`` (a ``.gguf`` file): configuration, fp32 weights, and (``tokenizer``) its tokenizer.

    Raises :class:`ModelLoadError` for a missing, corrupt or unsupported file.
    """
    path = Path(path)
    reader = _reader(path)
    from gguf.quants import dequantize

    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.tokens"):
        if key in reader.fields:
            fields[key] = reader.fields[key].contents() if key != "tokenizer.ggml.tokens" else reader.fields[key].data
    names = {t.name for t in reader.tensors}
    config = _config(fields, names, path)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            continue
        try:
            array = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {exc}") from exc
        w = torch.from_numpy(array.copy()).float()
        if config.model_type == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute(w, config.num_heads if "q_proj" in hf else config.num_kv_heads)
        state[hf] = w
    check_state_dict(config, state, str(path))
    tok = load_gguf_tokenizer(path) if tokenizer else None
    template = fields.get("tokenizer.chat_template")
    return LoadedModel(config, state, source=str(path), tokenizer=tok, extra={"chat_template": template})


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The transformers tokenizer (chat template included) built from a GGUF file's metadata."""
    path = Path(path)
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError(
            'the tokenizer of a GGUF file is built by transformers: pip install "llamatelemetry-engine[gguf]"'
        ) from exc
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
