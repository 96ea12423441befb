"""The checks every Triton implementation shares (``llamatelemetry_core.kernel_checks``)."""

from __future__ import annotations

import torch

from llamatelemetry_core.callspec import CallSpec, Check, is_gate
from llamatelemetry_core.device import get_device_info, simulate_device
from llamatelemetry_core.environment import triton_devices, triton_status
from llamatelemetry_core.kernel_checks import (
    bf16_on_device,
    kernel_dtypes,
    register_triton_kernel,
    triton_checks,
    triton_runs,
)
from llamatelemetry_core.selection import Implementation, Operation


def _reasons(checks: list[Check], call: CallSpec) -> list[str]:
    impl = Implementation("k", lambda: None, 1, frozenset({"cpu", "cuda"}), tuple(checks))
    return impl.unsupported_reasons(call)


def test_kernel_dtypes_name_what_each_device_kind_computes() -> None:
    check = kernel_dtypes()
    with simulate_device("h100") as h100:
        assert check(CallSpec.for_device(h100, torch.float16)) is None
        assert check(CallSpec.for_device(h100, torch.bfloat16)) is None
        assert check(CallSpec.for_device(h100, torch.float32)) == (
            "supports dtypes {float16, bfloat16} on cuda, not float32"
        )
    cpu = get_device_info("cpu")
    assert check(CallSpec.for_device(cpu, torch.float32)) is None
    assert check(CallSpec.for_device(cpu, torch.bfloat16)) == "supports dtypes {float16, float32} on cpu, not bfloat16"
    named = kernel_dtypes(what="query dtypes")
    assert named(CallSpec.for_device(cpu, torch.float64)) == (
        "supports query dtypes {float16, float32} on cpu, not float64"
    )
    assert check(CallSpec(device=cpu, dtype=None)) is None


def test_bf16_on_device_refuses_bf16_where_the_gpu_has_none() -> None:
    with simulate_device("t4") as t4:
        assert (
            bf16_on_device(CallSpec.for_device(t4, torch.bfloat16))
            == "Tesla T4 (simulated) has no bf16 support (Turing); use fp16"
        )
        assert bf16_on_device(CallSpec.for_device(t4, torch.float16)) is None
    with simulate_device("a100") as a100:
        assert bf16_on_device(CallSpec.for_device(a100, torch.bfloat16)) is None
    assert bf16_on_device(CallSpec.for_device(get_device_info("cpu"), torch.bfloat16)) is None


def test_triton_runs_probes_real_devices_only() -> None:
    with simulate_device("t4") as t4:
        assert triton_runs(CallSpec.for_device(t4)) is None
    cpu = get_device_info("cpu", refresh_memory=False)
    status = triton_status(cpu)
    assert triton_runs(CallSpec.for_device(cpu)) == (None if status.usable else status.reason)


def test_triton_checks_gate_first_the_kernels_own_between_and_the_probe_last() -> None:
    def own(call: CallSpec) -> str | None:
        return "own reason"

    checks = triton_checks(own)
    assert len(checks) == 4 and is_gate(checks[0]) and checks[2] is own and checks[3] is triton_runs
    with simulate_device("v100") as v100:  # SM 7.0: below the kernels' 7.5; simulated: not probed
        reasons = _reasons(checks, CallSpec.for_device(v100))
    if reasons and "triton is not installed" in reasons[0]:
        assert len(reasons) == 1  # the gate ends the list
    else:
        assert reasons == ["needs compute capability >= 7.5, Tesla V100-SXM2 (simulated) has 7.0", "own reason"]


def test_register_triton_kernel_registers_triton_with_the_shared_checks() -> None:
    def reference(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    def own(call: CallSpec) -> str | None:
        return None

    op = Operation("tests.kernel_checks_register", reference, replace=True)
    impl = register_triton_kernel(op, reference, own, priority=7, traced=reference)
    assert impl.name == "triton" and impl.priority == 7 and impl.traced is reference
    assert impl.devices is triton_devices
    assert is_gate(impl.checks[0]) and impl.checks[2] is own and impl.checks[-1] is triton_runs
    assert [i.name for i in op.implementations] == ["triton", "reference"]
    x = torch.ones(2)
    assert torch.equal(op.run((x,), x), x + 1)  # a CPU tensor: the reference (or the interpreter's triton)
