"""FlashAttention with SDPA, Triton and PyTorch paths (``pip install "llamatelemetry[flashattn]"``).

Re-exports ``llamatelemetry_flashattn``.
"""

from llamatelemetry._components import missing_component
from llamatelemetry._components import reexported as _reexported

try:
    from llamatelemetry_flashattn import BackendReport as BackendReport
    from llamatelemetry_flashattn import FlashAttentionConfig as FlashAttentionConfig
    from llamatelemetry_flashattn import MemoryEstimate as MemoryEstimate
    from llamatelemetry_flashattn import attention_backend_report as attention_backend_report
    from llamatelemetry_flashattn import attention_reference as attention_reference
    from llamatelemetry_flashattn import check_flash_attention_available as check_flash_attention_available
    from llamatelemetry_flashattn import disable_flash_attention as disable_flash_attention
    from llamatelemetry_flashattn import enable_flash_attention as enable_flash_attention
    from llamatelemetry_flashattn import estimate_inference_memory as estimate_inference_memory
    from llamatelemetry_flashattn import flash_attention_forward as flash_attention_forward
    from llamatelemetry_flashattn import get_optimal_context_length as get_optimal_context_length
    from llamatelemetry_flashattn import selected_backend as selected_backend
except ImportError as exc:
    raise missing_component("flashattn", exc) from exc

__all__ = _reexported("flashattn", globals())
del _reexported
