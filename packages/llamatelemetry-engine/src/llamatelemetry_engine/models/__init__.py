"""Model families the engine runs (one file each)."""

from llamatelemetry_engine.models.llama import DecoderLayer, LlamaForCausalLM, LlamaModel

__all__ = ["DecoderLayer", "LlamaForCausalLM", "LlamaModel"]
