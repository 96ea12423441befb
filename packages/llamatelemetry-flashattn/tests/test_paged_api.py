"""paged_attention's input errors, its selection policy per device, its tiles and its ahead-of-time builds."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_core.aot import KernelBuild
from llamatelemetry_core.device import DeviceInfo, get_device_info, simulate_device
from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.gpu_specs import GPU_SPECS
from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_flashattn import paged_attention, paged_backend_report, paged_decode, selected_paged_backend
from llamatelemetry_flashattn.paged_backends import kv_dtype_unsupported_reason
from llamatelemetry_flashattn.paged_tiles import MAX_SPLITS, choose_num_splits, choose_paged_tiles

FP8 = getattr(torch, "float8_e4m3fn", None)
HAS_TRITON = importlib.util.find_spec("triton") is not None
Inputs = dict[str, object]


def inputs() -> Inputs:
    """A valid call: two sequences of 5 and 20 cached tokens (1 and 3 queries), page size 8, 4 heads over 2."""
    return {
        "q": torch.randn(4, 4, 16),
        "kv": PagedKV(torch.randn(6, 8, 2, 16), torch.randn(6, 8, 2, 16)),
        "block_tables": torch.tensor([[4, 0, 0], [1, 5, 2]], dtype=torch.int32),
        "seq_lens": torch.tensor([5, 20], dtype=torch.int32),
        "cu_seqlens_q": torch.tensor([0, 1, 4], dtype=torch.int32),
        "max_seqlen_q": 3,
    }


def call(args: Inputs, **options: object) -> torch.Tensor:
    kwargs = {**args, **options}
    return paged_attention(
        kwargs.pop("q"),  # type: ignore[arg-type]
        kwargs.pop("kv"),  # type: ignore[arg-type]
        kwargs.pop("block_tables"),  # type: ignore[arg-type]
        kwargs.pop("seq_lens"),  # type: ignore[arg-type]
        kwargs.pop("cu_seqlens_q"),  # type: ignore[arg-type]
        backend="reference",
        **kwargs,  # type: ignore[arg-type]
    )


def _with(**changes: object) -> Inputs:
    return {**inputs(), **changes}


def i32(values: list[int] | list[list[int]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


BAD: list[tuple[str, Callable[[], Inputs], type[Exception], str]] = [
    ("q not 3-d", lambda: _with(q=torch.randn(1, 4, 4, 16)), ConfigurationError, "num_tokens, num_heads, head_dim"),
    ("kv not PagedKV", lambda: _with(kv=(torch.randn(6, 8, 2, 16),) * 2), TypeError, "PagedKV"),
    ("int64 block table", lambda: _with(block_tables=torch.zeros(2, 3, dtype=torch.long)), ConfigurationError, "int32"),
    ("seq_lens of wrong batch", lambda: _with(seq_lens=i32([5])), ConfigurationError, "[2]"),
    ("cu_seqlens_q of wrong batch", lambda: _with(cu_seqlens_q=i32([0, 4])), ConfigurationError, "[3]"),
    ("head dim mismatch", lambda: _with(q=torch.randn(4, 4, 32)), ConfigurationError, "head_dim|16"),
    ("heads not a multiple", lambda: _with(q=torch.randn(4, 3, 16)), ConfigurationError, "H % num_kv_heads"),
    ("kv dtype mismatch", lambda: _with(q=torch.randn(4, 4, 16, dtype=torch.float16)), ConfigurationError, "q's dtype"),
    ("int q", lambda: _with(q=torch.zeros(4, 4, 16, dtype=torch.int32)), ConfigurationError, "dtype"),
    ("cu not reaching num_tokens", lambda: _with(cu_seqlens_q=i32([0, 1, 3])), ConfigurationError, "num_tokens = 4"),
    ("cu falling", lambda: _with(cu_seqlens_q=i32([0, 5, 4])), ConfigurationError, "rise"),
    ("max_seqlen_q too small", lambda: _with(max_seqlen_q=2), ConfigurationError, "sequence 1 has 3 queries"),
    ("max_seqlen_q negative", lambda: _with(max_seqlen_q=-1), ConfigurationError, "max_seqlen_q"),
    ("seq_len past the table", lambda: _with(seq_lens=i32([5, 25])), ConfigurationError, "<= 24"),
    ("more queries than tokens", lambda: _with(seq_lens=i32([5, 2])), ConfigurationError, "3 queries but only 2"),
    ("bad block", lambda: _with(block_tables=i32([[4, 0, 0], [1, 6, 2]])), ConfigurationError, r"\[1, 1\] = 6"),
    ("out of wrong shape", lambda: _with(out=torch.empty(4, 4, 8)), ConfigurationError, "expected out"),
    ("causal not bool", lambda: _with(causal=1), ConfigurationError, "causal"),
    ("bad window", lambda: _with(window_size=(3,)), ConfigurationError, "window_size"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "make", "error", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_actionable_error(
    name: str, make: Callable[[], Inputs], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call(make())


def test_valid_call_and_padding_entries_are_not_read() -> None:
    args = inputs()
    out = call(args)
    assert out.shape == (4, 4, 16) and out.dtype == torch.float32
    # Entries past a sequence's last block are padding: garbage there changes nothing.
    garbage = _with(block_tables=torch.tensor([[4, -7, 99], [1, 5, 2]], dtype=torch.int32))
    torch.testing.assert_close(call({**garbage, "q": args["q"], "kv": args["kv"]}), out)


def test_padding_sequence_gets_zeros_and_empty_batches_work() -> None:
    args = _with(seq_lens=torch.tensor([0, 20], dtype=torch.int32))
    out = call(args)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    empty = _with(q=torch.randn(0, 4, 16), cu_seqlens_q=torch.zeros(3, dtype=torch.int32), max_seqlen_q=0)
    assert call(empty).shape == (0, 4, 16)


def test_paged_decode_checks_its_batch() -> None:
    args = inputs()
    with pytest.raises(ConfigurationError, match=r"\[3, \*\]"):
        paged_decode(torch.randn(3, 4, 16), args["kv"], args["block_tables"], args["seq_lens"])  # type: ignore[arg-type]


def test_selected_backend_and_report_on_cpu() -> None:
    args = inputs()
    name = selected_paged_backend(
        args["q"],  # type: ignore[arg-type]
        args["kv"],  # type: ignore[arg-type]
        args["block_tables"],  # type: ignore[arg-type]
        args["seq_lens"],  # type: ignore[arg-type]
        args["cu_seqlens_q"],  # type: ignore[arg-type]
        max_seqlen_q=3,
    )
    assert name == ("triton" if triton_interpreter_enabled() else "reference")
    report = paged_backend_report(get_device_info("cpu"))
    assert [r.name for r in report] == ["triton", "reference"]
    assert [r.name for r in report if r.selected] == [name]


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
def test_fp8_is_refused_on_a_t4_with_a_reason_and_runs_on_hopper() -> None:
    assert FP8 is not None
    with simulate_device("t4") as t4:
        reason = kv_dtype_unsupported_reason(t4, FP8)
        assert reason is not None and "8.9" in reason and "int8" in reason and "sm_75" in reason
        report = {r.name: r for r in paged_backend_report(t4, kv_dtype=FP8)}
        assert not report["triton"].runs and report["reference"].selected
        if HAS_TRITON:
            assert "fp8" in str(report["triton"].reason)
            assert {r.name: r.runs for r in paged_backend_report(t4, kv_dtype=torch.int8)}["triton"]
    with simulate_device("h100") as h100:
        assert kv_dtype_unsupported_reason(h100, FP8) is None
        assert {r.name: r for r in paged_backend_report(h100, kv_dtype=FP8)}["triton"].selected == HAS_TRITON


def test_fp8_refusal_is_a_capability_error_before_dispatch() -> None:
    """The public function raises the reason as ``CapabilityError``; checked through a simulated T4 here."""
    assert issubclass(CapabilityError, RuntimeError)
    if FP8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    with simulate_device("t4") as t4:
        # CPU tensors answer with the CPU even under simulation, so the GPU path is asked directly.
        assert kv_dtype_unsupported_reason(t4, FP8) is not None
        assert kv_dtype_unsupported_reason(get_device_info("cpu"), FP8) is None


def test_bf16_is_refused_on_a_t4() -> None:
    with simulate_device("t4") as t4:
        report = {r.name: r for r in paged_backend_report(t4, dtype=torch.bfloat16)}
        assert not report["triton"].runs
        assert "bf16" in str(report["triton"].reason) or not HAS_TRITON
        assert report["reference"].selected


# --- tiles and splits -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [s.key for s in GPU_SPECS])
def test_tiles_fit_every_known_gpu(key: str) -> None:
    with simulate_device(key) as device:
        limit = device.shared_memory_per_block_bytes
        assert limit is not None
        kv_dtypes = [torch.float16, torch.int8] + ([FP8] if FP8 is not None else [])
        for head_dim in (64, 80, 128, 256, 24):
            for kv_dtype in kv_dtypes:
                for rows in (None, 1, 4, 8, 37, 64, 65, 4096):
                    for max_kv_len in (None, 512):  # the long-range tables and the short-range one
                        tiles = choose_paged_tiles(
                            head_dim, torch.float16, kv_dtype, device, rows_per_program=rows, max_kv_len=max_kv_len
                        )
                        kv_size = torch.empty((), dtype=kv_dtype).element_size()
                        assert tiles.shared_memory_estimate(2, kv_size) <= limit, (key, head_dim, rows, tiles)
                        assert tiles.block_d >= head_dim and min(tiles.block_m, tiles.block_n) >= 16


def test_decode_tiles_are_small_and_prefill_tiles_large() -> None:
    with simulate_device("h100") as h100:
        decode = choose_paged_tiles(128, torch.float16, torch.float16, h100, rows_per_program=4)
        prefill = choose_paged_tiles(128, torch.float16, torch.float16, h100)
        assert decode.block_m == 16 and decode.num_stages >= 3
        assert prefill.block_m == 128
    with simulate_device("t4") as t4:
        assert choose_paged_tiles(128, torch.float16, torch.float16, t4).block_m <= 64


def test_short_key_ranges_take_their_own_decode_tiles() -> None:
    from llamatelemetry_flashattn.paged_tiles import SHORT_KEY_RANGE, paged_launch_config

    with simulate_device("h100") as h100:

        def decode(head_dim: int, max_kv_len: int | None) -> tuple[int, int, bool]:
            t = choose_paged_tiles(
                head_dim, torch.float16, torch.float16, h100, rows_per_program=4, max_kv_len=max_kv_len
            )
            return t.block_n, t.num_stages, t.page_ids

        long_range = decode(64, None)
        assert decode(64, SHORT_KEY_RANGE + 16) == long_range == (128, 2, True)
        assert decode(64, SHORT_KEY_RANGE) == decode(64, 16) == (64, 1, True)
        # Rows without a short-range entry keep their long-range tiles; prefill never reads the short table.
        assert decode(128, 256) == decode(128, None)
        prefill = choose_paged_tiles(64, torch.float16, torch.float16, h100, max_kv_len=256)
        assert prefill == choose_paged_tiles(64, torch.float16, torch.float16, h100)
        with pytest.raises(ValueError, match="max_kv_len"):
            choose_paged_tiles(64, torch.float16, torch.float16, h100, rows_per_program=4, max_kv_len=-1)
        # The launch reads the bound from the block table's width: 32 pages of 16 keys is short, 33 is not.
        q = torch.empty(3, 32, 64, dtype=torch.float16)
        kv = PagedKV(torch.empty(80, 16, 8, 64, dtype=torch.float16), torch.empty(80, 16, 8, 64, dtype=torch.float16))
        short = paged_launch_config(q, kv, torch.zeros(3, 32, dtype=torch.int32), 1, device=h100)
        wide = paged_launch_config(q, kv, torch.zeros(3, 33, dtype=torch.int32), 1, device=h100)
        assert (short.tiles.block_n, short.tiles.num_stages) == (64, 1)
        assert (wide.tiles.block_n, wide.tiles.num_stages) == (128, 2)
        # Splits of one sequence's 8 programs (132 SMs want 17 parts): one tile of keys per part on the short range
        # (512 keys / 64: 8 parts), 256 keys per part on the long one (528 keys: 2 parts).
        one = torch.zeros(1, 32, dtype=torch.int32)
        assert paged_launch_config(q[:1], kv, one, 1, device=h100).num_splits == 8
        assert paged_launch_config(q[:1], kv, torch.zeros(1, 33, dtype=torch.int32), 1, device=h100).num_splits == 2
        with pytest.raises(ValueError, match="min_tokens_per_split"):
            choose_num_splits(8, 512, h100, min_tokens_per_split=0)


def test_long_decode_with_few_programs_double_buffers_its_tiles() -> None:
    from llamatelemetry_flashattn.paged_tiles import (
        DEEP_PIPELINE_MIN_TILES,
        DEEP_PIPELINE_PROGRAMS_PER_SM,
        paged_launch_config,
    )

    def launch(
        batch: int, pages: int, kv_dtype: torch.dtype = torch.float16, key: str = "h100", queries: int = 1
    ) -> tuple[int, int]:
        with simulate_device(key) as device:
            q = torch.empty(batch * queries, 32, 64, dtype=torch.float16)  # 32 query heads over 8 KV heads of 64
            shape = (batch * pages + 1, 16, 8, 64)
            kv = PagedKV(torch.empty(shape, dtype=kv_dtype), torch.empty(shape, dtype=kv_dtype))
            if kv_dtype != torch.float16:
                scales = torch.empty(shape[:3], dtype=torch.float32)
                kv = PagedKV(kv.key_cache, kv.value_cache, scales, scales.clone())
            table = torch.zeros(batch, pages, dtype=torch.int32)
            chosen = paged_launch_config(q, kv, table, queries, device=device)
            return chosen.tiles.num_stages, chosen.num_splits

    # An H100 has 132 SMs and 8 programs per sequence: batches 17..32 run 136..256 unsplit programs (under 2 per
    # SM) and take the stages that double-buffer K and V; 33 and more keep 2 stages.
    assert (DEEP_PIPELINE_PROGRAMS_PER_SM, DEEP_PIPELINE_MIN_TILES) == (2.0, 4)
    assert launch(32, 132) == (5, 1)
    assert launch(17, 132) == (5, 1)
    assert launch(33, 132) == (2, 1)
    assert launch(64, 132) == (2, 1)
    # Split launches count their splits: batch 4 at 4096 keys (5 splits of 819, 160 programs) goes deep; one
    # sequence in 2112 keys (8 splits of 264: under 4 tiles of 128 each) does not.
    assert launch(4, 256) == (5, 5)
    assert launch(1, 132) == (2, 8)
    # Measured with one row tile of 16 only: 4 queries per sequence (16 rows) go deep, 8 (32 rows) do not.
    assert launch(32, 132, queries=4) == (5, 1)
    assert launch(32, 132, queries=8) == (2, 1)
    # Short ranges keep their own tiles; quantized storage (not measured deep) and other devices keep the table's.
    assert launch(32, 32) == (1, 1)
    assert launch(32, 132, torch.int8) == (2, 1)
    with simulate_device("a100") as a100:
        table = choose_paged_tiles(64, torch.float16, torch.float16, a100, rows_per_program=4).num_stages
    assert launch(32, 132, key="a100")[0] == table


@given(
    programs=st.integers(1, 5000),
    max_kv_len=st.integers(1, 1 << 20),
    key=st.sampled_from([s.key for s in GPU_SPECS]),
    min_tokens=st.sampled_from([16, 64, 256]),
)
def test_split_count_properties(programs: int, max_kv_len: int, key: str, min_tokens: int) -> None:
    with simulate_device(key) as device:
        splits = choose_num_splits(programs, max_kv_len, device)
        given_min = choose_num_splits(programs, max_kv_len, device, min_tokens_per_split=min_tokens)
    assert 1 <= splits <= MAX_SPLITS and 1 <= given_min <= MAX_SPLITS
    if programs >= device.sm_count:
        assert splits == given_min == 1  # the GPU is already full
    if splits > 1:
        assert max_kv_len // splits >= 256  # every part still reads a useful number of keys
    if given_min > 1:
        assert max_kv_len // given_min >= min_tokens
    assert choose_num_splits(programs, max_kv_len, get_device_info("cpu")) == 1


def test_small_batch_long_context_splits_and_large_batch_does_not() -> None:
    with simulate_device("h200") as h200:
        assert choose_num_splits(1 * 8, 4096, h200) >= 8
        assert choose_num_splits(32 * 8, 4096, h200) == 1


# --- ahead-of-time builds -----------------------------------------------------------------------------------------


def test_provider_is_registered_and_builds_match_the_tiles() -> None:
    pytest.importorskip("triton")
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="llamatelemetry.kernel_builds")}
    assert "flashattn" in eps

    def provider(device: DeviceInfo) -> list[KernelBuild]:
        return [b for b in eps["flashattn"].load()(device) if b.name.startswith("flashattn.paged")]

    with simulate_device("t4") as t4:
        builds = provider(t4)
        names = [b.name for b in builds]
        assert sum("paged_merge" in n for n in names) == 3  # head dims 64, 128, 256
        assert all("bf16" not in n and "fp8" not in n for n in names)  # no bf16 or fp8 on a T4
        assert any("kv=i8" in n for n in names) and any("decode-split" in n for n in names)
        for build in builds:
            if "paged_merge" in build.name:
                continue
            kv = torch.int8 if "kv=i8" in build.name else torch.float16
            rows = None if "prefill" in build.name else 4
            tiles = choose_paged_tiles(int(build.constexprs["HEAD_DIM"]), torch.float16, kv, t4, rows_per_program=rows)
            assert (build.constexprs["BLOCK_M"], build.constexprs["BLOCK_N"], build.num_warps, build.num_stages) == (
                tiles.block_m,
                tiles.block_n,
                tiles.num_warps,
                tiles.num_stages,
            )
    with simulate_device("h100") as h100:
        names = [b.name for b in provider(h100)]
        assert any("bf16" in n for n in names) and any("kv=fp8e4nv" in n for n in names)


@pytest.mark.triton_compiler
@pytest.mark.parametrize(
    ("head_dim", "kv_dtype", "kind"),
    [(128, torch.int8, "decode"), (256, torch.float16, "prefill")],
    ids=["d128-int8-decode", "d256-fp16-prefill"],
)
def test_t4_builds_compile_within_64_kib(head_dim: int, kv_dtype: torch.dtype, kind: str) -> None:
    from llamatelemetry_core.aot import compile_build
    from llamatelemetry_flashattn.paged_kernel import aot_build

    with simulate_device("t4") as t4:
        report = compile_build(aot_build(head_dim, torch.float16, kv_dtype, t4, kind=kind), t4)
    assert report.ok, report.problems
    assert report.target == "sm_75"
    assert report.shared_memory_bytes <= 64 * 1024 == report.shared_memory_limit_bytes


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_paged_attention_compiles_fullgraph_and_honours_the_backend(
    compiler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamatelemetry_core import record_selections
    from llamatelemetry_core.selection import BACKEND_ENV, reload_environment

    args = inputs()
    expected = call(args, window_size=(4, 0), softcap=30.0)
    out = torch.empty_like(expected)

    kv, cu = args["kv"], args["cu_seqlens_q"]
    assert isinstance(kv, PagedKV) and isinstance(cu, torch.Tensor)

    def step(q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        result = paged_attention(
            q, kv, block_tables, seq_lens, cu, max_seqlen_q=3, window_size=(4, 0), softcap=30.0, out=out
        )
        return result * 2

    q, tables, lens = args["q"], args["block_tables"], args["seq_lens"]
    assert isinstance(q, torch.Tensor) and isinstance(tables, torch.Tensor) and isinstance(lens, torch.Tensor)
    explained = torch._dynamo.explain(step)(q, tables, lens)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    monkeypatch.setenv(BACKEND_ENV, "flashattn.paged_attention=reference")
    reload_environment()
    with record_selections() as record:
        got = compiled(q, tables, lens)
    torch.testing.assert_close(got, expected * 2)
    torch.testing.assert_close(out, expected)  # out= is written under compile too
    assert record.implementations("flashattn.paged_attention") == ["reference"]
    monkeypatch.delenv(BACKEND_ENV)
    reload_environment()
    torch._dynamo.reset()
