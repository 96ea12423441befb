"""GraphPool: the guide's calls, name management, errors listing names, replace, memory report, threads."""

from __future__ import annotations

import threading

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.testing import assert_close
from llamatelemetry_graphs import CUDAGraph, GraphPool

# The eager emulation, also on a GPU machine (CPU tensors there would otherwise be refused).
pytestmark = pytest.mark.usefixtures("eager_emulation")


@pytest.fixture
def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(11, 19), torch.nn.SiLU(), torch.nn.Linear(19, 11)).eval()


def test_guide_example(model: torch.nn.Module, rng: torch.Generator) -> None:
    input_batch_1 = torch.randn(1, 11, generator=rng)
    input_batch_4 = torch.randn(4, 11, generator=rng)
    pool = GraphPool()
    with torch.no_grad():
        pool.capture("batch_1", lambda: model(input_batch_1))
        pool.capture("batch_4", lambda: model(input_batch_4))
        result = pool.replay("batch_1")
        assert_close(result, model(input_batch_1))
    assert pool.list_graphs() == ["batch_1", "batch_4"]
    pool.remove("batch_1")
    assert pool.list_graphs() == ["batch_4"]
    pool.clear()
    assert pool.list_graphs() == [] and len(pool) == 0


def test_capture_returns_the_output_and_replay_takes_new_inputs(model: torch.nn.Module, rng: torch.Generator) -> None:
    x = torch.randn(3, 11, generator=rng)
    pool = GraphPool()
    with torch.no_grad():
        output = pool.capture("step", model, inputs=(x,))
        assert_close(output, model(x))
        new = torch.randn(3, 11, generator=rng)
        assert_close(pool.replay("step", new), model(new))
        kept = pool.replay("step", x, copy=True)
        assert kept is not pool.get("step").output


def test_container_protocol_and_capture_order(rng: torch.Generator) -> None:
    pool = GraphPool()
    for name in ["zeta", "alpha", "mid"]:
        pool.capture(name, lambda: torch.randn(2, generator=rng))
    assert "alpha" in pool and "beta" not in pool and 3 not in pool
    assert len(pool) == 3
    assert list(pool) == pool.list_graphs() == ["zeta", "alpha", "mid"]
    assert isinstance(pool.get("mid"), CUDAGraph)
    assert "'zeta', 'alpha', 'mid'" in repr(pool)


def test_unknown_names_raise_key_error_listing_the_names() -> None:
    pool = GraphPool()
    with pytest.raises(KeyError, match=r"no graph named 'x' in this pool; it holds no graphs"):
        pool.replay("x")
    pool.capture("batch_1", lambda: torch.zeros(1))
    pool.capture("batch_2", lambda: torch.zeros(2))
    for call in (pool.replay, pool.get, pool.remove):
        with pytest.raises(KeyError, match=r"no graph named 'batch_3' in this pool; it holds \['batch_1', 'batch_2'\]"):
            call("batch_3")


def test_an_existing_name_needs_replace(rng: torch.Generator) -> None:
    pool = GraphPool()
    pool.capture("a", lambda: torch.zeros(2))
    pool.capture("b", lambda: torch.zeros(2))
    with pytest.raises(ConfigurationError, match=r"already holds \(graphs: \['a', 'b'\]\); pass replace=True"):
        pool.capture("a", lambda: torch.ones(2))
    old = pool.get("a")
    x = torch.randn(2, generator=rng)
    pool.capture("a", torch.exp, inputs=(x,), replace=True)
    assert pool.list_graphs() == ["a", "b"]  # the replaced graph keeps its place
    assert pool.get("a") is not old and not old.is_captured
    assert_close(pool.replay("a", x), torch.exp(x))


def test_a_failed_replacement_keeps_the_old_graph() -> None:
    pool = GraphPool()
    pool.capture("a", lambda: torch.full((2,), 3.0))

    def broken() -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        pool.capture("a", broken, replace=True)
    assert_close(pool.replay("a"), torch.full((2,), 3.0))


@pytest.mark.parametrize("name", ["", None, 3])
def test_names_must_be_non_empty_strings(name: object) -> None:
    with pytest.raises(ConfigurationError, match="non-empty str"):
        GraphPool().capture(name, lambda: torch.zeros(1))  # type: ignore[arg-type]


def test_memory_usage_and_pool_handle_without_cuda(rng: torch.Generator) -> None:
    pool = GraphPool()
    assert pool.memory_usage().reserved_bytes == 0
    pool.capture("a", lambda: torch.randn(8, 4, generator=rng))
    pool.capture("b", lambda: torch.randn(3, generator=rng, dtype=torch.float64))
    assert pool.memory_usage().reserved_bytes == 8 * 4 * 4 + 3 * 8
    assert pool.pool_handle is None
    pool.remove("a")
    assert pool.memory_usage().reserved_bytes == 3 * 8


def test_threads_capture_and_replay_concurrently(model: torch.nn.Module) -> None:
    pool = GraphPool()
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(index: int) -> None:
        try:
            generator = torch.Generator().manual_seed(1000 + index)
            x = torch.randn(index + 1, 11, generator=generator)
            barrier.wait()
            with torch.no_grad():
                pool.capture(f"worker_{index}", model, inputs=(x,))
                for _ in range(20):
                    new = torch.randn(index + 1, 11, generator=generator)
                    assert_close(pool.replay(f"worker_{index}", new, copy=True), model(new))
                    assert f"worker_{index}" in pool
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(pool.list_graphs()) == [f"worker_{i}" for i in range(4)]
