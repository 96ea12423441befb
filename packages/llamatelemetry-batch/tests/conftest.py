from __future__ import annotations

from collections.abc import Iterator

import pytest

from llamatelemetry_batch.testing import EchoServer


@pytest.fixture
def server() -> Iterator[EchoServer]:
    """A real OpenAI-compatible server on 127.0.0.1 (a free port) that echoes prompts."""
    with EchoServer() as echo_server:
        yield echo_server
