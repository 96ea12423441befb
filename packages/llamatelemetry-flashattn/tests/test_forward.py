"""flash_attention_forward against the fp64 reference, on every implementation that runs here.

CPU: ``reference`` and ``sdpa_cpu`` always; ``triton`` in the interpreter (``TRITON_INTERPRET=1``), on small
shapes. GPU (``gpu`` marker): every implementation that runs on this GPU, forced with ``backend=``, on the same
cases with longer sequences, plus the Triton kernel with the tiles a T4 would get.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import pytest
import torch

from llamatelemetry_core.device import get_device_info, simulate_device
from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.errors import BackendUnavailableError
from llamatelemetry_core.selection import BackendFallbackWarning, record_selections, reset_fallback_warnings
from llamatelemetry_core.testing import Tolerance, assert_close, tolerance_for
from llamatelemetry_flashattn import (
    ATTENTION,
    attention_backend_report,
    attention_reference,
    flash_attention_forward,
)


@dataclass(frozen=True)
class Case:
    """One call: q ``[batch, q_len, heads, head_dim]``, k/v ``[batch, kv_len, kv_heads, head_dim]``."""

    name: str
    batch: int = 2
    q_len: int = 37
    kv_len: int = 37
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    causal: bool = True
    window: tuple[int, int] | None = None
    softcap: float | None = None

    def inputs(
        self, generator: torch.Generator, dtype: torch.dtype, device: str | torch.device = "cpu", *, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def make(shape: tuple[int, ...]) -> torch.Tensor:
            return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(device, dtype)

        q = make((self.batch, self.q_len, self.heads, self.head_dim))
        k = make((self.batch, self.kv_len, self.kv_heads, self.head_dim))
        v = make((self.batch, self.kv_len, self.kv_heads, self.head_dim))
        return q, k, v

    def scaled(self, factor: int) -> Case:
        """The same case with sequences and window sides ``factor`` times longer (GPU runs); -1 stays unbounded."""
        window = (
            None if self.window is None else (self._side(self.window[0], factor), self._side(self.window[1], factor))
        )
        return replace(self, q_len=self.q_len * factor, kv_len=self.kv_len * factor, window=window)

    @staticmethod
    def _side(side: int, factor: int) -> int:
        return side if side == -1 else side * factor


CASES = [
    Case("causal"),
    Case("full", causal=False, q_len=29, kv_len=45),
    Case("gqa", heads=8, kv_heads=2),
    Case("mqa", heads=4, kv_heads=1, causal=False),
    Case("decode", q_len=1, kv_len=50, heads=8, kv_heads=2),
    Case("chunked-prefill", q_len=13, kv_len=50, heads=4, kv_heads=2),
    Case("window", q_len=40, kv_len=40, window=(7, -1)),
    Case("window-both-sides", causal=False, q_len=33, kv_len=48, window=(5, 3)),
    Case("softcap", softcap=5.0, heads=4, kv_heads=2),
    Case("window-softcap-gqa", q_len=24, kv_len=41, heads=4, kv_heads=2, window=(9, -1), softcap=20.0),
    Case("d80", head_dim=80, batch=1),
    Case("d96", head_dim=96, batch=1, heads=2, kv_heads=1),
    Case("d128", head_dim=128, batch=1, heads=2, kv_heads=2),
    Case("d256", head_dim=256, batch=1, heads=2, kv_heads=1, q_len=20, kv_len=20),
]

EMPTY_ROWS = Case("more-queries-than-keys", q_len=40, kv_len=23, heads=2, kv_heads=1)

CASE_IDS = [c.name for c in CASES]


def tolerance(dtype: torch.dtype) -> Tolerance:
    """Attention outputs vs an fp64 reference: the shared table, widened for half types.

    The probabilities enter the second matmul rounded to the input dtype (as in every FlashAttention kernel),
    which adds an error of a few ulps of the output on top of the final rounding.
    """
    base = tolerance_for(dtype)
    return base.scaled(4.0) if dtype in (torch.float16, torch.bfloat16) else base.scaled(10.0)


def _expected(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_reference(
        q.double(), k.double(), v.double(), causal=case.causal, window_size=case.window, softcap=case.softcap
    )


def _check(case: Case, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    with record_selections() as record:
        out = flash_attention_forward(
            q, k, v, causal=case.causal, window_size=case.window, softcap=case.softcap, backend=backend
        )
    assert record.last("flash_attention") == backend
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    tol = tolerance(q.dtype)
    assert_close(out, _expected(case, q, k, v), atol=tol.atol, rtol=tol.rtol, name=f"{backend}/{case.name}")


def _cpu_backends() -> list[str]:
    names = ["reference", "sdpa_cpu"]
    return [*names, "triton"] if triton_interpreter_enabled() else names


def _supported(backend: str, case: Case, q: torch.Tensor, k: torch.Tensor) -> bool:
    from llamatelemetry_core.selection import CallSpec
    from llamatelemetry_flashattn.backends import AttentionCall

    facts = AttentionCall(
        batch=case.batch,
        q_len=case.q_len,
        kv_len=case.kv_len,
        num_heads=case.heads,
        num_kv_heads=case.kv_heads,
        head_dim=case.head_dim,
        causal=case.causal,
        window_size=case.window,
        softcap=case.softcap,
        dropout_p=0.0,
        needs_grad=False,
    )
    call = CallSpec.from_tensors(q, k, facts=facts)
    return ATTENTION.implementation(backend).unsupported_reason(call) is None


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_backends_match_the_reference(backend: str, case: Case, rng: torch.Generator) -> None:
    q, k, v = case.inputs(rng, torch.float32)
    if not _supported(backend, case, q, k):
        with pytest.raises(BackendUnavailableError, match=backend):
            flash_attention_forward(
                q, k, v, causal=case.causal, window_size=case.window, softcap=case.softcap, backend=backend
            )
        return
    _check(case, backend, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_cpu_half_precision(backend: str, dtype: torch.dtype, rng: torch.Generator) -> None:
    case = Case("gqa-half", heads=4, kv_heads=2, q_len=20, kv_len=33)
    q, k, v = case.inputs(rng, dtype)
    if backend == "triton" and dtype == torch.bfloat16:
        with pytest.raises(BackendUnavailableError, match="bfloat16"):
            flash_attention_forward(q, k, v, backend=backend)
        return
    _check(case, backend, q, k, v)


def test_query_that_sees_no_key_gets_zeros(rng: torch.Generator) -> None:
    case = EMPTY_ROWS
    q, k, v = case.inputs(rng, torch.float32)
    backends = ["reference", "triton"] if triton_interpreter_enabled() else ["reference"]
    for backend in backends:
        out = flash_attention_forward(q, k, v, causal=True, backend=backend)
        assert torch.equal(out[:, : case.q_len - case.kv_len], torch.zeros_like(out[:, : case.q_len - case.kv_len]))
        _check(case, backend, q, k, v)
    with pytest.raises(BackendUnavailableError, match="sees no key"):
        flash_attention_forward(q, k, v, causal=True, backend="sdpa_cpu")


def test_non_contiguous_inputs(rng: torch.Generator) -> None:
    case = Case("strided", heads=4, kv_heads=2, q_len=21, kv_len=30)
    # [B, H, S, D] storage seen as [B, S, H, D]: what a transformers model hands over.
    q = torch.randn(2, 4, 21, 64, generator=rng).transpose(1, 2)
    k = torch.randn(2, 2, 30, 64, generator=rng).transpose(1, 2)
    v = torch.randn(2, 30, 2, 128, generator=rng)[..., ::2]
    assert not q.is_contiguous() and not v.is_contiguous()
    for backend in _cpu_backends():
        _check(case, backend, q, k, v)


def test_automatic_choice_on_cpu(rng: torch.Generator) -> None:
    q, k, v = Case("auto").inputs(rng, torch.float32)
    with record_selections() as record:
        flash_attention_forward(q, k, v)
    assert record.last("flash_attention") == ("triton" if triton_interpreter_enabled() else "sdpa_cpu")
    report = attention_backend_report(get_device_info("cpu"))
    assert [r.name for r in report if r.selected] == [record.last("flash_attention")]


def test_dropout_only_in_training(rng: torch.Generator) -> None:
    case = Case("dropout", batch=1, heads=2, kv_heads=2, q_len=16, kv_len=16, head_dim=16)
    q, k, v = case.inputs(rng, torch.float32)
    exact = flash_attention_forward(q, k, v, backend="reference")
    torch.testing.assert_close(
        flash_attention_forward(q, k, v, dropout_p=0.5, training=False, backend="reference"), exact
    )
    torch.manual_seed(0)
    samples = torch.stack([flash_attention_forward(q, k, v, dropout_p=0.3, backend="reference") for _ in range(400)])
    assert not torch.allclose(samples[0], exact)
    # Inverted dropout keeps the expectation: the mean of many draws approaches the exact output.
    assert (samples.mean(0) - exact).abs().max() < 0.25
    with pytest.raises(BackendUnavailableError, match="dropout" if triton_interpreter_enabled() else "cuda"):
        flash_attention_forward(q, k, v, dropout_p=0.3, backend="triton")


# --- GPU ---------------------------------------------------------------------------------------------------------


def _gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return ["reference"]
    return [r.name for r in attention_backend_report(get_device_info()) if r.runs]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_every_backend_matches_the_reference(case: Case, dtype: torch.dtype, rng: torch.Generator) -> None:
    if dtype == torch.bfloat16 and not get_device_info().supports_bf16:
        pytest.skip("no bf16 on this GPU")
    big = case.scaled(8)
    q, k, v = big.inputs(rng, dtype, "cuda")
    ran = []
    for backend in _gpu_backends():
        if backend == "reference" and big.q_len * big.kv_len > 1 << 20:
            continue
        if not _supported(backend, big, q, k):
            with pytest.raises(BackendUnavailableError):
                flash_attention_forward(
                    q, k, v, causal=big.causal, window_size=big.window, softcap=big.softcap, backend=backend
                )
            continue
        _check(big, backend, q, k, v)
        ran.append(backend)
    assert ran, "no backend ran this case"


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("device_key", ["t4", "a100", "h100"])
def test_gpu_triton_with_each_devices_tiles(case: Case, device_key: str, rng: torch.Generator) -> None:
    """The tiles chosen for a T4 (and A100, H100) compute the right thing, on whatever GPU is here."""
    from llamatelemetry_flashattn.tiles import choose_tiles
    from llamatelemetry_flashattn.triton_kernel import triton_attention

    big = case.scaled(8)
    q, k, v = big.inputs(rng, torch.float16, "cuda")
    with simulate_device(device_key) as target:
        tiles = choose_tiles(big.head_dim, q.dtype, target, rows_per_program=big.q_len * big.heads // big.kv_heads)
    here = get_device_info()
    if tiles.shared_memory_estimate(2) > (here.shared_memory_per_block_bytes or 0):
        pytest.skip(f"{device_key}'s tiles need more shared memory than {here.name} has")
    out = triton_attention(q, k, v, causal=big.causal, window_size=big.window, softcap=big.softcap, tiles=tiles)
    tol = tolerance(q.dtype)
    assert_close(out, _expected(big, q, k, v), atol=tol.atol, rtol=tol.rtol, name=f"triton[{device_key}]/{case.name}")


@pytest.mark.gpu
def test_gpu_automatic_choice_prefers_the_fastest(rng: torch.Generator) -> None:
    q, k, v = Case("guide", batch=2, q_len=256, kv_len=256, heads=8, kv_heads=8).inputs(rng, torch.float16, "cuda")
    reset_fallback_warnings()
    with record_selections() as record, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BackendFallbackWarning)
        flash_attention_forward(q, k, v, causal=True)
    # flash-attn is an optional extra: leaving it out is not worth a warning (the skip is still recorded).
    assert not caught, [str(w.message) for w in caught]
    chosen = record.last("flash_attention")
    runs = _gpu_backends()
    assert chosen == runs[0], f"chose {chosen}, the best that runs here is {runs[0]}"
    assert chosen != "reference"
