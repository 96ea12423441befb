"""An optional progress bar over the prompts of a run, drawn by tqdm or rich (neither is required).

Install one with ``pip install "llamatelemetry-batch[progress]"`` (tqdm) or ``pip install rich``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from llamatelemetry_batch.config import ProgressOption

__all__ = ["ProgressBar", "open_progress"]


class ProgressBar(Protocol):
    def update(self, finished: int) -> None:
        """Count ``finished`` more prompts as done (succeeded or failed for good)."""

    def close(self) -> None: ...


class _NoProgress:
    def update(self, finished: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Tqdm:
    def __init__(self, module: Any, total: int) -> None:
        self._bar = module.tqdm(total=total, unit="prompt", desc="batch_infer", dynamic_ncols=True)

    def update(self, finished: int) -> None:
        if finished:
            self._bar.update(finished)

    def close(self) -> None:
        self._bar.close()


class _Rich:
    def __init__(self, module: Any, total: int) -> None:
        self._progress = module.Progress(transient=False)
        self._task = self._progress.add_task("batch_infer", total=total)
        self._progress.start()

    def update(self, finished: int) -> None:
        if finished:
            self._progress.update(self._task, advance=finished)

    def close(self) -> None:
        self._progress.stop()


_INSTALL = 'install one: pip install "llamatelemetry-batch[progress]" (tqdm) or pip install rich'


def open_progress(option: ProgressOption, total: int) -> ProgressBar:
    """A bar counting to ``total``, drawn by the library ``option`` names (``True``: tqdm, else rich).

    Raises:
        ImportError: the library asked for is not installed (the message says what to install).
    """
    if option is False:
        return _NoProgress()
    candidates = ["tqdm", "rich"] if option is True else [option]
    for name in candidates:
        try:
            module = importlib.import_module("tqdm.auto" if name == "tqdm" else "rich.progress")
        except ImportError:
            continue
        return _Tqdm(module, total) if name == "tqdm" else _Rich(module, total)
    wanted = "tqdm or rich" if option is True else str(option)
    raise ImportError(f"BatchConfig(progress={option!r}) needs {wanted}, which is not installed; {_INSTALL}")
