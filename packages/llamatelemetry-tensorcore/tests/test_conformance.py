"""``matmul_tensor_core`` through core's conformance suite."""

from __future__ import annotations

from typing import Any

import torch

from llamatelemetry_core.testing.conformance import Conformance, conformance_tests
from llamatelemetry_tensorcore import matmul_tensor_core
from llamatelemetry_tensorcore.matmul import MATMUL_OPERATION

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ab(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    return torch.randn(3, 17, 9, generator=gen).to(dtype).to(device), torch.randn(9, 5, generator=gen).to(dtype).to(
        device
    )


SUITE = Conformance(MATMUL_OPERATION, matmul_tensor_core, _ab)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
(
    test_every_implementation_matches_the_reference,
    test_fullgraph_compile_and_the_backend_variable,
    test_cuda_graph_capture_and_replay,
) = conformance_tests({"matmul": SUITE}, DTYPES, DEVICE)
