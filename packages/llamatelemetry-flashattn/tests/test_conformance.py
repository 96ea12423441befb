"""``flash_attention_forward`` through core's conformance suite (grouped-query heads, lengths that end mid-tile)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llamatelemetry_core.testing.conformance import Conformance, conformance_tests
from llamatelemetry_flashattn import ATTENTION, flash_attention_forward

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _qkv(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    q = torch.randn(2, 9, 4, 16, generator=gen).to(dtype).to(device)
    k, v = (torch.randn(2, 13, 2, 16, generator=gen).to(dtype).to(device) for _ in range(2))
    return q, k, v


SUITE = Conformance(ATTENTION, flash_attention_forward, _qkv)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
(
    test_every_implementation_matches_the_reference,
    test_fullgraph_compile_and_the_backend_variable,
    test_cuda_graph_capture_and_replay,
) = conformance_tests({"attention": SUITE}, DTYPES, DEVICE)


@pytest.mark.triton
def test_the_triton_kernels_custom_op_passes_opcheck() -> None:
    q, k, v = _qkv(torch.Generator().manual_seed(0), torch.float32, DEVICE)
    Conformance.check_opcheck(torch.ops.llamatelemetry.flashattn_triton.default, (q, k, v, True, 0.25, None, None))
