"""Register ``attn_implementation="llamatelemetry"`` with transformers when transformers' modeling code loads.

Importing transformers' modeling code costs seconds, so importing this component does not do it. Instead, when
the component is imported: if ``transformers.modeling_utils`` is already loaded, the attention function is
registered at once; otherwise a finder on ``sys.meta_path`` waits for that module, lets it load, removes itself
and registers the attention with ``AttentionInterface`` (and its mask with ``AttentionMaskInterface``); a
registration that fails is a warning, never a failed import of transformers. Either
way ``from_pretrained(..., attn_implementation="llamatelemetry")`` then works with no other call.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

__all__ = ["install"]

_TARGET = "transformers.modeling_utils"
_lock = threading.Lock()


class _RegisteringLoader(importlib.abc.Loader):
    """Loads the module with the real loader, then registers the attention."""

    def __init__(self, loader: importlib.abc.Loader, register: Callable[[], None]) -> None:
        self._loader = loader
        self._register = register

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _remove_finders()  # loaded: the registration below happens once
        try:
            self._register()
        except Exception as exc:  # never let our registration break the user's import of transformers
            warnings.warn(
                f"llamatelemetry could not register attn_implementation='llamatelemetry' with transformers "
                f"({type(exc).__name__}: {exc}); enable_flash_attention(model) still routes a model's attention",
                RuntimeWarning,
                stacklevel=2,
            )


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, register: Callable[[], None]) -> None:
        self._register = register

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        spec: importlib.machinery.ModuleSpec | None = None
        for finder in list(sys.meta_path):  # whichever finder would have found it without this one
            if isinstance(finder, _Finder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or isinstance(spec.loader, _RegisteringLoader):
            return spec
        # A probe (importlib.util.find_spec) gets this spec too and loads nothing: the finder stays until the
        # module is actually executed.
        spec.loader = _RegisteringLoader(spec.loader, self._register)
        return spec


def _remove_finders() -> None:
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def install(register: Callable[[], None]) -> None:
    """Run ``register`` now if transformers' modeling code is loaded, else right after it loads."""
    if _TARGET in sys.modules:
        register()
        return
    with _lock:
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder(register))
