"""Which implementation runs where: simulated GPUs (a T4 never gets flash-attn), and input validation."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
import warnings

import pytest
import torch

from llamatelemetry_core import callspec, selection
from llamatelemetry_core.device import DeviceInfo, simulate_device
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.selection import CallSpec, reset_fallback_warnings
from llamatelemetry_flashattn import (
    ATTENTION,
    attention_backend_report,
    check_flash_attention_available,
    flash_attention_forward,
)
from llamatelemetry_flashattn.backends import AttentionCall

TRITON = importlib.util.find_spec("triton") is not None


def _call(
    device: DeviceInfo,
    dtype: torch.dtype = torch.float16,
    *,
    q_len: int = 2048,
    kv_len: int = 2048,
    heads: int = 32,
    kv_heads: int = 32,
    head_dim: int = 64,
    causal: bool = True,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    needs_grad: bool = False,
) -> CallSpec:
    facts = AttentionCall(
        batch=2,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        causal=causal,
        window_size=window,
        softcap=softcap,
        dropout_p=dropout,
        needs_grad=needs_grad,
    )
    return CallSpec(device=device, dtype=dtype, facts=facts)


@pytest.fixture
def fake_flash_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the flash-attn package is installed (it is never called: only selection is asked)."""
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.__version__ = "2.7.0"  # type: ignore[attr-defined]

    def flash_attn_func(*args: object, softcap: float = 0.0, **kwargs: object) -> None:
        raise AssertionError("the fake flash-attn is never run")

    module.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setitem(callspec._module_cache, "flash_attn", True)


T4_CALLS = {
    "guide-prefill": {},
    "decode-gqa": {"q_len": 1, "kv_len": 4096, "kv_heads": 8},
    "chunked-prefill": {"q_len": 512, "kv_len": 4096},
    "window": {"window": (1023, -1)},
    "softcap": {"softcap": 50.0},
    "d256": {"head_dim": 256},
    "training-dropout": {"dropout": 0.1, "needs_grad": True},
}


@pytest.mark.parametrize("installed", [False, True], ids=["flash-attn-absent", "flash-attn-present"])
@pytest.mark.parametrize("name", list(T4_CALLS))
def test_t4_never_gets_flash_attn(name: str, installed: bool, request: pytest.FixtureRequest) -> None:
    if installed:
        request.getfixturevalue("fake_flash_attn")
    with simulate_device("t4") as t4:
        call = _call(t4, **T4_CALLS[name])  # type: ignore[arg-type]
        chosen = ATTENTION.select(call).name
        reasons = {c.name: c.reason for c in ATTENTION.explain(call)}
    assert chosen != "flash_attn"
    assert reasons["flash_attn"] is not None
    if installed:
        assert "compute capability >= 8.0" in reasons["flash_attn"]
    assert "needs compute capability >= 8.0" in (reasons["sdpa_flash"] or "")
    assert "needs compute capability >= 8.0" in (reasons["sdpa_cudnn"] or "")
    if name in ("softcap", "training-dropout"):
        # No fused SDPA kernel caps logits; our kernel has no backward: the exact reference is what is left.
        expected = {"softcap": "triton" if TRITON else "reference", "training-dropout": "sdpa_efficient"}[name]
        assert chosen == expected
    else:
        assert chosen == ("triton" if TRITON else "sdpa_efficient"), reasons


def test_flash_attn_is_first_where_it_can_run(fake_flash_attn: None) -> None:
    for key in ("a100", "h100", "rtx4090"):
        with simulate_device(key) as device:
            assert ATTENTION.select(_call(device)).name == "flash_attn"
            assert ATTENTION.select(_call(device, softcap=30.0, window=(255, 0))).name == "flash_attn"


def test_without_flash_attn_sdpa_and_triton_share_the_work() -> None:
    with simulate_device("h100") as h100:
        assert ATTENTION.select(_call(h100)).name == "sdpa_cudnn"
        second = "triton" if TRITON else "sdpa_flash"  # measured: our kernel beats SDPA's flash on an H100
        assert ATTENTION.select(_call(h100, kv_heads=8)).name == second  # GQA: not cuDNN
        assert ATTENTION.select(_call(h100, q_len=1, kv_len=4096, kv_heads=8)).name == second  # decode
        assert ATTENTION.select(_call(h100, head_dim=256)).name == second
        assert ATTENTION.select(_call(h100, kv_heads=8, needs_grad=True)).name == "sdpa_flash"  # training
        masked = "triton" if TRITON else "sdpa_efficient"
        # SDPA's is_causal is top-left aligned: chunked prefill needs a mask, so not its fused flash/cuDNN.
        assert ATTENTION.select(_call(h100, q_len=512, kv_len=4096)).name == masked
        assert ATTENTION.select(_call(h100, window=(4095, -1))).name == masked
        assert ATTENTION.select(_call(h100, softcap=50.0)).name == ("triton" if TRITON else "reference")
        assert ATTENTION.select(_call(h100, torch.float32)).name == "sdpa_efficient"


def test_bf16_on_a_t4_is_not_sent_to_kernels_that_lack_it() -> None:
    with simulate_device("t4") as t4:
        reasons = {c.name: c.reason for c in ATTENTION.explain(_call(t4, torch.bfloat16))}
    assert "bf16" in (reasons["triton"] or "") if TRITON else True
    assert "bf16" in (reasons["sdpa_efficient"] or "")


def test_report_lists_every_backend_with_a_reason() -> None:
    with simulate_device("t4") as t4:
        report = attention_backend_report(t4)
    names = [r.name for r in report]
    assert names == [i.name for i in ATTENTION.implementations]
    assert {"flash_attn", "sdpa_cudnn", "sdpa_flash", "triton", "sdpa_efficient", "sdpa_cpu", "reference"} <= set(names)
    assert sum(r.selected for r in report) == 1
    assert all((r.reason is None) == r.runs for r in report)
    assert next(r for r in report if r.selected).name == ("triton" if TRITON else "sdpa_efficient")


def test_doctor_typical_call_has_an_answer() -> None:
    # ``doctor`` asks with no call attributes at all: every check must cope.
    for key in ("t4", "h100", "cpu"):
        with simulate_device(key) as device:
            assert ATTENTION.select(CallSpec.for_device(device)).name


def test_check_flash_attention_available_is_false_without_the_package_or_on_a_t4(
    fake_flash_attn: None,
) -> None:
    with simulate_device("t4"):
        assert check_flash_attention_available() is False
    with simulate_device("a100"):
        assert check_flash_attention_available() is True
    with simulate_device("cpu"):
        assert check_flash_attention_available() is False


def test_not_available_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with simulate_device("h100"):
        assert check_flash_attention_available() is False


def test_an_automatic_fallback_is_recorded_without_a_warning() -> None:
    reset_fallback_warnings()
    q = torch.randn(1, 40, 2, 16)
    k = torch.randn(1, 23, 2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the library choosing for the user is not worth a warning
        # More queries than keys: sdpa_cpu cannot define empty rows (and the Triton kernel has no dropout).
        flash_attention_forward(q, k, k, causal=True, dropout_p=0.1)
    last = selection.last_selection("flash_attention")
    assert last is not None and last.implementation == "reference"
    assert "sdpa_cpu" in dict(last.skipped)


# --- validation --------------------------------------------------------------------------------------------------


def test_messages_say_what_was_expected_and_got() -> None:
    q = torch.randn(2, 16, 32, 64)
    with pytest.raises(
        ConfigurationError, match=r"expected k of shape \[B, S, H_kv, D\].*got \[2, 16, 5, 64\] for q heads 32"
    ):
        flash_attention_forward(q, torch.randn(2, 16, 5, 64), torch.randn(2, 16, 5, 64))
    with pytest.raises(ConfigurationError, match="4 dimensions"):
        flash_attention_forward(q[0], q[0], q[0])
    with pytest.raises(ConfigurationError, match="same shape as k"):
        flash_attention_forward(q, q, q[:, :8])
    with pytest.raises(ConfigurationError, match="one dtype"):
        flash_attention_forward(q, q.double(), q)
    with pytest.raises(ConfigurationError, match="window_size"):
        flash_attention_forward(q, q, q, window_size=(-2, 0))
    with pytest.raises(ConfigurationError, match="softcap"):
        flash_attention_forward(q, q, q, softcap=-1.0)
    with pytest.raises(ConfigurationError, match="dropout_p"):
        flash_attention_forward(q, q, q, dropout_p=1.0)
    with pytest.raises(ConfigurationError, match="softmax_scale"):
        flash_attention_forward(q, q, q, softmax_scale=0.0)
    with pytest.raises(ConfigurationError, match="no implementation 'nope'"):
        flash_attention_forward(q, q, q, backend="nope")
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        flash_attention_forward(q, q, "v")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="dtype"):
        flash_attention_forward(q.int(), q.int(), q.int())


def test_missing_flash_attn_names_a_command_that_works_from_a_clone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The component's own extra cannot resolve from a clone (the packages are not on a package index); the
    # flash-attn package itself can, the same command doctor gives.
    monkeypatch.setitem(callspec._module_cache, "flash_attn", False)
    with simulate_device("a100") as a100:
        reasons = {c.name: c.reason for c in ATTENTION.explain(_call(a100))}
    assert reasons["flash_attn"] == "flash_attn is not installed (pip install flash-attn --no-build-isolation)"
