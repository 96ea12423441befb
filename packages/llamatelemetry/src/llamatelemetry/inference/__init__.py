"""Inference-side optimizations: :mod:`~llamatelemetry.inference.flash_attn`,
:mod:`~llamatelemetry.inference.kv_cache`, :mod:`~llamatelemetry.inference.batch`. Each is a separately installed
component; nothing is imported here."""
