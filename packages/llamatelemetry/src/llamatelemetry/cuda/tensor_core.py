"""Tensor Core detection, switches and mixed precision (``pip install "llamatelemetry[tensorcore]"``): re-exports
``llamatelemetry_tensorcore``."""

from llamatelemetry._components import missing_component
from llamatelemetry._components import reexported as _reexported

try:
    from llamatelemetry_tensorcore import PRECISION_SENSITIVE as PRECISION_SENSITIVE
    from llamatelemetry_tensorcore import AmpPlan as AmpPlan
    from llamatelemetry_tensorcore import MatmulPadding as MatmulPadding
    from llamatelemetry_tensorcore import ModelPlan as ModelPlan
    from llamatelemetry_tensorcore import ReusableAutocast as ReusableAutocast
    from llamatelemetry_tensorcore import TensorCoreConfig as TensorCoreConfig
    from llamatelemetry_tensorcore import TensorCorePlan as TensorCorePlan
    from llamatelemetry_tensorcore import TensorCoreWarning as TensorCoreWarning
    from llamatelemetry_tensorcore import check_tensor_core_support as check_tensor_core_support
    from llamatelemetry_tensorcore import enable_amp as enable_amp
    from llamatelemetry_tensorcore import enable_tensor_cores as enable_tensor_cores
    from llamatelemetry_tensorcore import estimated_speedup as estimated_speedup
    from llamatelemetry_tensorcore import get_tensor_core_info as get_tensor_core_info
    from llamatelemetry_tensorcore import matmul_tensor_core as matmul_tensor_core
    from llamatelemetry_tensorcore import measure_matmul_speedup as measure_matmul_speedup
    from llamatelemetry_tensorcore import optimize_for_tensor_cores as optimize_for_tensor_cores
    from llamatelemetry_tensorcore import plan_amp as plan_amp
    from llamatelemetry_tensorcore import plan_model as plan_model
    from llamatelemetry_tensorcore import plan_tensor_cores as plan_tensor_cores
    from llamatelemetry_tensorcore import tensor_core_dtypes as tensor_core_dtypes
    from llamatelemetry_tensorcore import tensor_core_padding as tensor_core_padding
except ImportError as exc:
    raise missing_component("tensorcore", exc) from exc

__all__ = _reexported("tensorcore", globals())
del _reexported
