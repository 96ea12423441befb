"""The kernel registry: configs, registration rules, launching (the guide's relu example), thread safety."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator

import pytest
import torch

from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.toolchain import TRITON_INSTALL
from llamatelemetry_triton import HAS_TRITON, KernelConfig, get_kernel, list_kernels, register_kernel, unregister_kernel
from llamatelemetry_triton._compat import TritonMissingError

BUILTINS = {
    "add",
    "fused_add_layernorm",
    "fused_add_rmsnorm",
    "geglu",
    "layernorm",
    "linear",
    "rmsnorm",
    "rope",
    "rope_paged_write",
    "softmax",
    "swiglu",
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if HAS_TRITON:
    import triton
    import triton.language as tl

    # The guide's kernel, as written there.
    @triton.jit  # type: ignore[untyped-decorator]
    def relu_kernel(x_ptr, output_ptr, n_elements, BLOCK_SIZE: tl.constexpr):  # type: ignore[no-untyped-def]
        pid = tl.program_id(0)
        offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=mask)
        output = tl.where(x > 0, x, 0.0)
        tl.store(output_ptr + offsets, output, mask=mask)

    @triton.jit  # type: ignore[untyped-decorator]
    def scale_kernel(x_ptr, out_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * SCALE, mask=mask)


@pytest.fixture
def clean_names() -> Iterator[list[str]]:
    """Names registered by a test, unregistered afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(KeyError):
            unregister_kernel(name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "non-empty string"),
        ({"name": "k", "block_size": 100}, "power of two"),
        ({"name": "k", "block_size": 0}, "positive integer"),
        ({"name": "k", "num_warps": 3}, "power of two from 1 to 32"),
        ({"name": "k", "num_warps": 64}, "power of two from 1 to 32"),
        ({"name": "k", "num_stages": 0}, "positive integer"),
        ({"name": "k", "block_size": True}, "positive integer"),
        ({"name": "k", "meta": {"BLOCK_SIZE": 4}}, "must not set"),
    ],
)
def test_kernel_config_is_validated(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        KernelConfig(**kwargs)  # type: ignore[arg-type]


def test_kernel_config_defaults_and_frozen_meta() -> None:
    config = KernelConfig("relu", meta={"SCALE": 2})
    assert (config.block_size, config.num_warps, config.num_stages) == (128, 4, 2)
    with pytest.raises(TypeError):
        config.meta["SCALE"] = 3  # type: ignore[index]


def test_unknown_kernel_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="no kernel named 'nope' is registered; registered: "):
        get_kernel("nope")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton to define kernels")
def test_builtins_are_registered() -> None:
    assert set(list_kernels(runnable_only=False)) >= BUILTINS
    assert {"add", "layernorm", "softmax"} <= set(list_kernels(runnable_only=False))
    assert get_kernel("layernorm").config.name == "layernorm"
    runnable = list_kernels()
    assert runnable == sorted(runnable)
    assert set(runnable) in (set(), set(list_kernels(runnable_only=False)))


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton to define kernels")
def test_register_rules(clean_names: list[str]) -> None:
    clean_names.append("test_relu_rules")
    entry = register_kernel("test_relu_rules", relu_kernel)
    assert get_kernel("test_relu_rules") is entry
    assert entry.config == KernelConfig("test_relu_rules")
    with pytest.raises(ConfigurationError, match="already registered; pass replace=True"):
        register_kernel("test_relu_rules", relu_kernel)
    replaced = register_kernel("test_relu_rules", relu_kernel, KernelConfig("test_relu_rules", 256), replace=True)
    assert get_kernel("test_relu_rules") is replaced and replaced.config.block_size == 256
    with pytest.raises(ConfigurationError, match="config's name to match"):
        register_kernel("other_name", relu_kernel, KernelConfig("relu"))
    with pytest.raises(ConfigurationError, match="Triton kernel"):
        register_kernel("not_a_kernel", lambda x: x)
    assert unregister_kernel("test_relu_rules") is replaced
    with pytest.raises(KeyError):
        get_kernel("test_relu_rules")


@pytest.mark.skipif(HAS_TRITON, reason="Triton is installed")
def test_register_without_triton_says_what_to_install() -> None:
    with pytest.raises(CapabilityError, match=re.escape(TRITON_INSTALL)):
        register_kernel("relu", object())


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton to define kernels")
def test_concurrent_registration_is_consistent(clean_names: list[str]) -> None:
    names = [f"test_thread_{i}" for i in range(32)]
    clean_names.extend(names)
    errors: list[BaseException] = []

    def worker(chunk: list[str]) -> None:
        try:
            for name in chunk:
                register_kernel(name, relu_kernel)
                assert get_kernel(name).name == name
                list_kernels()
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(names) <= set(list_kernels(runnable_only=False))
    # Racing registrations of one name: exactly one wins, the others are told the name is taken.
    outcomes: list[str] = []
    lock = threading.Lock()

    def race() -> None:
        try:
            register_kernel("test_thread_race", relu_kernel)
            result = "won"
        except ConfigurationError:
            result = "taken"
        with lock:
            outcomes.append(result)

    clean_names.append("test_thread_race")
    racers = [threading.Thread(target=race) for _ in range(8)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert sorted(outcomes) == ["taken"] * 7 + ["won"]


@pytest.mark.triton
def test_guide_relu_example_runs(clean_names: list[str]) -> None:
    clean_names.append("relu")
    x = torch.randn(1000, device=DEVICE)
    output = torch.empty_like(x)
    n_elements = x.numel()
    n_blocks = triton.cdiv(n_elements, 256)
    # As in the guide:
    config = KernelConfig(name="relu", block_size=256, num_warps=4)
    register_kernel("relu", relu_kernel, config, replace=True)
    kernel = get_kernel("relu")
    kernel.launch(x, output, n_elements, grid=(n_blocks,))
    assert torch.equal(output, torch.relu(x))
    assert "relu" in list_kernels()


@pytest.mark.triton
def test_launch_meta_parameters_and_callable_grid(clean_names: list[str]) -> None:
    clean_names.append("test_scale")
    entry = register_kernel("test_scale", scale_kernel, KernelConfig("test_scale", 64, meta={"SCALE": 3, "BLOCK": 32}))
    x = torch.randn(100, device=DEVICE)
    out = torch.zeros_like(x)
    seen: list[dict[str, object]] = []

    def grid(meta: dict[str, object]) -> tuple[int]:
        seen.append(dict(meta))
        return (triton.cdiv(100, int(meta["BLOCK"])),)  # type: ignore[call-overload]

    entry.launch(x, out, x.numel(), grid=grid)
    assert torch.allclose(out, x * 3)
    assert seen and seen[0]["BLOCK"] == 32 and seen[0]["SCALE"] == 3
    entry.launch(x, out, x.numel(), grid=grid, SCALE=-1)  # the caller's meta-parameter wins over the config's
    assert torch.allclose(out, -x)
    entry.launch(x, out, 0, grid=(0,))  # an empty grid launches nothing


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton to define kernels")
@pytest.mark.parametrize("grid", [(), (1, 2, 3, 4), (-1,), (1.5,), [True], "4"])
def test_launch_rejects_malformed_grids(grid: object, clean_names: list[str]) -> None:
    clean_names.append("test_grid")
    entry = register_kernel("test_grid", relu_kernel, replace=True)
    with pytest.raises(ConfigurationError, match="expected grid"):
        entry.launch(torch.zeros(4), torch.zeros(4), 4, grid=grid)  # type: ignore[arg-type]


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton to define kernels")
def test_compiled_kernel_refuses_cpu_tensors(clean_names: list[str]) -> None:
    from triton.runtime.jit import JITFunction

    # A kernel compiled for the GPU, whatever TRITON_INTERPRET says (decorated kernels follow it).
    compiled = JITFunction(getattr(relu_kernel, "fn", relu_kernel))
    clean_names.append("test_compiled_relu")
    entry = register_kernel("test_compiled_relu", compiled)
    x = torch.zeros(8)
    with pytest.raises(ConfigurationError, match=r"expected CUDA tensors, got x_ptr, output_ptr on cpu"):
        entry.launch(x, torch.empty_like(x), 8, grid=(1,))


def test_missing_triton_stand_in_explains_itself() -> None:
    from llamatelemetry_triton._compat import _MissingTriton

    stand_in = _MissingTriton()
    kernel = stand_in.jit(lambda x: x)
    with pytest.raises(TritonMissingError, match=re.escape(TRITON_INSTALL)):
        kernel[(1,)]
    with pytest.raises(TritonMissingError):
        stand_in.cdiv  # noqa: B018
