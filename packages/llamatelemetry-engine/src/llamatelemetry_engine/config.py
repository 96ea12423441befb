"""The architecture of a Llama-family decoder: what the model code needs, read from any weight source.

Llama, Mistral, Qwen2 and SmolLM share one layout (RMSNorm, rotary positions, grouped-query attention, a SwiGLU
MLP); they differ in a few switches kept here: rotary scaling (``linear``, ``llama3``), bias on the q/k/v
projections (Qwen2), a sliding attention window (Mistral), tied input and output embeddings (SmolLM, small
Llamas). :meth:`ModelConfig.from_hf` reads a transformers ``config.json`` dictionary, and the presets give the
shapes the benchmarks use when no weights can be downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llamatelemetry_core.errors import ConfigurationError

__all__ = ["ARCHITECTURES", "PRESETS", "ModelConfig", "RopeScaling"]

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
"""Supported ``model_type`` values and the transformers class each corresponds to."""

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling as transformers configures it (``rope_type`` plus its parameters)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in _ROPE_TYPES:
            raise ConfigurationError(
                f"expected rope scaling type in {_ROPE_TYPES}, got {self.rope_type!r}; this engine does not "
                "implement it, so it would compute different positions than the model was trained with"
            )
        if self.factor <= 0:
            raise ConfigurationError(f"expected a positive rope scaling factor, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigurationError(
                f"expected llama3 high_freq_factor > low_freq_factor, got {self.high_freq_factor} and "
                f"{self.low_freq_factor}"
            )


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"expected {name} to be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a Llama-family decoder.

    ``head_dim`` defaults to ``hidden_size // num_heads``; ``num_heads`` must be a multiple of ``num_kv_heads``
    (grouped-query attention of any ratio). ``sliding_window`` is the number of most recent tokens (the current
    one included) a query sees, as transformers' Mistral counts it; ``None`` is full causal attention.
    Raises :class:`ConfigurationError` for inconsistent values.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ConfigurationError(
                f"unsupported architecture {self.model_type!r}: this engine runs {sorted(ARCHITECTURES)} "
                "(Llama-family decoders; SmolLM is a Llama); convert the model or run it with transformers"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _positive(name, getattr(self, name))
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigurationError(
                    f"expected hidden_size divisible by num_heads when head_dim is not given, got "
                    f"{self.hidden_size} and {self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _positive("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigurationError(f"expected an even head_dim (rotary pairs), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigurationError(
                f"expected num_heads divisible by num_kv_heads (grouped-query attention), got {self.num_heads} "
                f"query heads over {self.num_kv_heads} KV heads"
            )
        _positive("max_position_embeddings", self.max_position_embeddings)
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window)
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigurationError(
                f"expected positive rms_norm_eps and rope_theta, got {self.rms_norm_eps} and {self.rope_theta}"
            )

    @property
    def q_size(self) -> int:
        """Width of the query projection."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (and value) projection."""
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameters of the model (the tied output embedding counted once)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        attn += h if self.o_bias else 0
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + h

    def with_overrides(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Read a transformers ``config.json`` dictionary (transformers 4.x and 5.x spellings).

        Raises :class:`ConfigurationError` for an architecture or rope scaling this engine does not run.
        """
        model_type = str(config.get("model_type", ""))
        if model_type not in ARCHITECTURES:
            archs = config.get("architectures") or [model_type or "unknown"]
            raise ConfigurationError(
                f"unsupported architecture {archs[0]!r} (model_type {model_type!r}): this engine runs "
                f"{sorted(ARCHITECTURES.values())}; use transformers for other models"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigurationError(f"expected hidden_act 'silu' (SwiGLU), got {config['hidden_act']!r}")
        if model_type == "qwen2" and config.get("use_sliding_window", False):
            raise ConfigurationError(
                "Qwen2 with use_sliding_window=true (a window on some layers only) is not supported; "
                "set use_sliding_window to false or run the model with transformers"
            )
        rope = dict(config.get("rope_parameters") or {})
        legacy = config.get("rope_scaling") or {}
        rope.update({k: v for k, v in legacy.items() if k not in rope})
        rope_type = str(rope.get("rope_type", rope.get("type", "default")))
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        eos = config.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        heads = int(config["num_attention_heads"])
        bias = bool(config.get("attention_bias", False))
        window = config.get("sliding_window") if model_type == "mistral" else None
        return cls(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or 0),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bias,
            o_bias=bias and model_type != "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=None if window is None else int(window),
            bos_token_id=None if config.get("bos_token_id") is None else int(config["bos_token_id"]),
            eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``config.json`` dictionary of this configuration (to build a reference model)."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.rope_type == "llama3":
            rope["low_freq_factor"] = self.rope_scaling.low_freq_factor
            rope["high_freq_factor"] = self.rope_scaling.high_freq_factor
            rope["original_max_position_embeddings"] = self.rope_scaling.original_max_position_embeddings
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.rope_scaling.rope_type != "default":
            out["rope_scaling"] = dict(rope)
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        "llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=512, eos_token_ids=(2,), bos_token_id=1,
    ),
    "smollm2-135m": ModelConfig(
        "llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-3.2-1b": ModelConfig(
        "llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
}  # fmt: skip
"""Shapes without weights: ``tiny`` for tests, SmolLM2-135M and Llama-3.2-1B for benchmarks (random weights)."""
