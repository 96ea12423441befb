"""Every ```python block of the documentation runs, page by page, in one namespace per page.

A block preceded by the line ``<!-- requires: gpu -->`` runs only where CUDA is available.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).parent
_BLOCK = re.compile(r"(?P<marker><!-- requires: gpu -->\s*\n)?```python\n(?P<code>.*?)```", re.DOTALL)
PAGES = sorted(p for p in DOCS.rglob("*.md") if "site" not in p.parts and _BLOCK.search(p.read_text("utf-8")))


def test_pages_with_examples_exist() -> None:
    assert PAGES, "the documentation has runnable examples"


@pytest.fixture(autouse=True)
def _restore_torch_switches() -> Iterator[None]:
    """Pages may switch cuDNN benchmark mode or TF32 on, as the guide does; later tests must not inherit that."""
    benchmark = torch.backends.cudnn.benchmark
    precision = torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.benchmark = benchmark
    torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for number, match in enumerate(_BLOCK.finditer(page.read_text("utf-8")), start=1):
        if match.group("marker") and not torch.cuda.is_available():
            continue
        # From a file: Triton's compiler reads a @triton.jit function's source back with inspect.
        source = tmp_path / f"{page.stem}_block{number}.py"
        source.write_text(match.group("code"), "utf-8")
        code = compile(match.group("code"), str(source), "exec")
        exec(code, namespace)
        ran += 1
    if ran == 0:
        pytest.skip(f"every example of {page.name} needs a GPU")
