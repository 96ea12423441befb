"""The components behind the documented import paths, and the errors raised when one is missing."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from llamatelemetry_core.errors import CapabilityError

__all__ = ["COMPONENTS", "Component", "import_component", "missing_component", "not_yet_provided"]


@dataclass(frozen=True)
class Component:
    extra: str
    distribution: str
    import_name: str
    documented_path: str
    documented_names: tuple[str, ...]

    @property
    def install(self) -> str:
        return f'pip install "llamatelemetry[{self.extra}]"'


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


def import_component(extra: str) -> ModuleType:
    """Import the component behind ``extra``; raise :func:`missing_component`'s error when it is absent."""
    component = COMPONENTS[extra]
    try:
        return importlib.import_module(component.import_name)
    except ImportError as exc:
        raise missing_component(extra, exc) from exc


def not_yet_provided(extra: str, name: str) -> Exception:
    """The error for a name of the guide that the installed component does not provide (yet).

    Names the guide does not document get the usual ``AttributeError``.
    """
    component = COMPONENTS[extra]
    module = import_component(extra)
    version = getattr(module, "__version__", "?")
    if name not in component.documented_names:
        return AttributeError(f"module {component.documented_path!r} has no attribute {name!r}")
    return CapabilityError(
        f"{component.documented_path}.{name} is documented but {component.distribution} {version} does not "
        f'provide it yet; upgrade the component: pip install -U "llamatelemetry[{extra}]"'
    )
