"""The representative shapes and type names of the ahead-of-time builds (see :mod:`llamatelemetry_triton.aot`):
each operation's module yields its own builds for them."""

from __future__ import annotations

import torch

HIDDEN_SIZES = (768, 4096, 8192, 16384)
VOCAB_SIZE = 128256
HEAD_DIMS = (64, 128)
ROWS = 4096
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
