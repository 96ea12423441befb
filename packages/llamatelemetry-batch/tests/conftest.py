"""Shared fixtures of the llamatelemetry-batch tests: the block managers every scheduler test runs against, and a
real OpenAI-compatible server on the loopback address for the batch-inference tests.

``BLOCK_MANAGERS`` maps a name to a factory ``(num_blocks, page_size) -> KVBlockManager``. Any implementation of
``llamatelemetry_core.serving.KVBlockManager`` can be added here, and every parametrized test (the protocol
contract, the scheduler and engine property tests) runs against it too. ``llamatelemetry-kvcache``'s
``BlockManager`` is included whenever that component is importable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from llamatelemetry_batch.serving import SimpleBlockManager
from llamatelemetry_batch.serving.testing import PrefixCachingBlockManager
from llamatelemetry_batch.testing import EchoServer
from llamatelemetry_core.serving import KVBlockManager

BlockManagerFactory = Callable[[int, int], KVBlockManager]

BLOCK_MANAGERS: dict[str, BlockManagerFactory] = {
    "simple": SimpleBlockManager,
    "prefix-caching": PrefixCachingBlockManager,
}
try:  # the paged cache's own manager, when that component is installed (never a dependency of this package)
    from llamatelemetry_kvcache import BlockManager as KVCacheBlockManager
except ImportError:  # pragma: no cover - llamatelemetry-kvcache absent
    pass
else:
    BLOCK_MANAGERS["kvcache"] = KVCacheBlockManager


@pytest.fixture(scope="module", params=sorted(BLOCK_MANAGERS))
def block_manager_factory(request: pytest.FixtureRequest) -> BlockManagerFactory:
    """A factory of one block manager implementation (module-scoped, so hypothesis tests may use it)."""
    factory: BlockManagerFactory = BLOCK_MANAGERS[request.param]
    return factory


@pytest.fixture(scope="module")
def single_thread_torch() -> Iterator[None]:
    """Torch on one intra-op thread for tests of tiny tensors: on a busy machine, waking a thread pool for
    16-wide matrices costs far more than the work. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def server() -> Iterator[EchoServer]:
    """A real OpenAI-compatible server on 127.0.0.1 (a free port) that echoes prompts."""
    with EchoServer() as echo_server:
        yield echo_server
