"""The components behind the documented import paths, and the errors raised when one is missing."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from llamatelemetry_core.errors import CapabilityError

__all__ = [
    "COMPONENTS",
    "Component",
    "NotYetProvidedError",
    "import_component",
    "install_command",
    "missing_component",
    "not_yet_provided",
    "reexported",
    "source_checkout",
]


class NotYetProvidedError(CapabilityError, AttributeError):
    """A name of the user guide that the installed component does not implement yet.

    An ``AttributeError``, so that ``hasattr`` answers ``False`` and ``getattr(module, name, default)`` returns
    the default, and a :class:`~llamatelemetry_core.errors.CapabilityError` for code that catches the library's
    errors.
    """


def _checkout_of(path: Path) -> Path | None:
    """The clone whose ``packages/`` folder holds ``path`` (a clone has ``scripts/install.py`` beside it)."""
    path = path.resolve()
    for parent in path.parents:
        if (parent / "scripts" / "install.py").is_file() and path.is_relative_to(parent / "packages"):
            return parent
    return None


def source_checkout() -> Path | None:
    """The clone this meta-package was installed from, or ``None`` for an install from a package index.

    An editable install (or a run from the source tree) imports from the clone itself; a regular install from a
    local folder records that folder in its ``direct_url.json`` (PEP 610).
    """
    here = _checkout_of(Path(__file__))
    if here is not None:
        return here
    try:
        raw = importlib.metadata.distribution("llamatelemetry").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not raw:
        return None
    url = str(json.loads(raw).get("url", ""))
    if not url.startswith("file://"):
        return None
    return _checkout_of(Path(url.removeprefix("file://")) / "pyproject.toml")


def install_command(extra: str) -> str:
    """The command that installs the component behind ``extra`` for this kind of install.

    From a clone (the packages are not on a package index then): the clone's ``scripts/install.py``, which
    installs the component editable with its siblings resolved from the clone. Otherwise pip with the extra.
    """
    checkout = source_checkout()
    if checkout is None:
        return f'pip install "llamatelemetry[{extra}]"'
    return f"python {shlex.quote(str(checkout / 'scripts' / 'install.py'))} {extra}"


@dataclass(frozen=True)
class Component:
    extra: str
    distribution: str
    import_name: str
    documented_path: str
    documented_names: tuple[str, ...]

    @property
    def install(self) -> str:
        """The command that installs this component, for the kind of install at hand (see :func:`install_command`)."""
        return install_command(self.extra)


COMPONENTS: dict[str, Component] = {
    c.extra: c
    for c in (
        Component(
            "graphs",
            "llamatelemetry-graphs",
            "llamatelemetry_graphs",
            "llamatelemetry.cuda.graphs",
            (
                "BatchBucketedGraphs",
                "CUDAGraph",
                "GraphCaptureConfig",
                "GraphCaptureError",
                "GraphPool",
                "capture_graph",
                "clone_outputs",
                "default_batch_buckets",
                "enable_cuda_graphs",
                "replay_graph",
            ),
        ),
        Component(
            "triton",
            "llamatelemetry-triton",
            "llamatelemetry_triton",
            "llamatelemetry.cuda.triton_kernels",
            (
                "KernelConfig",
                "get_kernel",
                "list_kernels",
                "register_kernel",
                "triton_add",
                "triton_layernorm",
                "triton_softmax",
            ),
        ),
        Component(
            "tensorcore",
            "llamatelemetry-tensorcore",
            "llamatelemetry_tensorcore",
            "llamatelemetry.cuda.tensor_core",
            (
                "check_tensor_core_support",
                "enable_amp",
                "enable_tensor_cores",
                "get_tensor_core_info",
                "matmul_tensor_core",
                "optimize_for_tensor_cores",
            ),
        ),
        Component(
            "flashattn",
            "llamatelemetry-flashattn",
            "llamatelemetry_flashattn",
            "llamatelemetry.inference.flash_attn",
            (
                "FlashAttentionConfig",
                "check_flash_attention_available",
                "enable_flash_attention",
                "flash_attention_forward",
                "get_optimal_context_length",
            ),
        ),
        Component(
            "kvcache",
            "llamatelemetry-kvcache",
            "llamatelemetry_kvcache",
            "llamatelemetry.inference.kv_cache",
            ("BlockManager", "KVCache", "KVCacheConfig", "PagedKVCache"),
        ),
        Component(
            "batch",
            "llamatelemetry-batch",
            "llamatelemetry_batch",
            "llamatelemetry.inference.batch",
            ("BatchConfig", "BatchInferenceOptimizer", "batch_inference_optimized"),
        ),
        Component(
            "engine",
            "llamatelemetry-engine",
            "llamatelemetry_engine",
            "llamatelemetry.engine",
            ("LLM", "EngineFlags", "SamplingParams", "load_model"),
        ),
    )
}


def missing_component(extra: str, cause: ImportError) -> ImportError:
    """The error for a documented module whose component is not installed.

    ``cause`` is re-raised unchanged when it is about some other module (a broken install, a missing
    dependency of the component), so that its real reason is not hidden behind "install the extra".
    """
    component = COMPONENTS[extra]
    if cause.name not in (component.import_name, None) and not (cause.name or "").startswith(
        component.import_name + "."
    ):
        return cause
    return ImportError(
        f"{component.documented_path} needs the {component.distribution} component, which is not installed; "
        f"install it with: {component.install}",
        name=component.documented_path,
    )


def reexported(extra: str, namespace: Mapping[str, object]) -> list[str]:
    """The ``__all__`` of the documented module behind ``extra``, whose ``namespace`` (its ``globals()``) has
    imported names of the component: those of the component's ``__all__`` it holds as the component's own
    objects, in the component's order. The module's import lines are then its one list of names (what type
    checkers read), and its ``__all__`` cannot drift from them."""
    component = sys.modules[COMPONENTS[extra].import_name]
    missing = object()
    return [name for name in component.__all__ if namespace.get(name, missing) is getattr(component, name)]


def import_component(extra: str) -> ModuleType:
    """Import the component behind ``extra``; raise :func:`missing_component`'s error when it is absent."""
    component = COMPONENTS[extra]
    try:
        return importlib.import_module(component.import_name)
    except ImportError as exc:
        raise missing_component(extra, exc) from exc


def not_yet_provided(extra: str, name: str) -> AttributeError:
    """The error for a name of the guide that the installed component does not provide (yet).

    A documented name gets a :class:`NotYetProvidedError` saying so; any other name the usual
    ``AttributeError``. Both are ``AttributeError`` instances: ``hasattr`` and ``getattr`` with a default work.
    """
    component = COMPONENTS[extra]
    module = import_component(extra)
    version = getattr(module, "__version__", "?")
    if name not in component.documented_names:
        return AttributeError(f"module {component.documented_path!r} has no attribute {name!r}")
    error = NotYetProvidedError(
        f"{component.documented_path}.{name} is documented in the user guide but not implemented yet: "
        f"{component.distribution} {version} does not provide it (the README lists each component's status)"
    )
    error.name = name
    error.obj = importlib.import_module(component.documented_path)
    return error
