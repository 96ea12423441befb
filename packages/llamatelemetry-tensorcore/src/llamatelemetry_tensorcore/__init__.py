"""llamatelemetry-tensorcore: Tensor Core detection, switches and mixed-precision helpers.

Documented import path: ``llamatelemetry.cuda.tensor_core``.

* :mod:`~llamatelemetry_tensorcore.info`: ``check_tensor_core_support``, ``get_tensor_core_info``;
* :mod:`~llamatelemetry_tensorcore.config`: ``enable_tensor_cores`` and the :class:`TensorCoreConfig` it returns;
* :mod:`~llamatelemetry_tensorcore.matmul`: ``matmul_tensor_core`` (its ``fused`` Triton path:
  :mod:`~llamatelemetry_tensorcore.fused_matmul`);
* :mod:`~llamatelemetry_tensorcore.model`: ``optimize_for_tensor_cores``;
* :mod:`~llamatelemetry_tensorcore.amp`: ``enable_amp``.
"""

from llamatelemetry_tensorcore import fused_matmul  # noqa: F401 (registers matmul's fused implementation)
from llamatelemetry_tensorcore.__about__ import __version__
from llamatelemetry_tensorcore.amp import AmpPlan, ReusableAutocast, enable_amp, plan_amp
from llamatelemetry_tensorcore.config import (
    TensorCoreConfig,
    TensorCorePlan,
    TensorCoreWarning,
    enable_tensor_cores,
    plan_tensor_cores,
)
from llamatelemetry_tensorcore.info import (
    check_tensor_core_support,
    estimated_speedup,
    get_tensor_core_info,
    measure_matmul_speedup,
    tensor_core_dtypes,
)
from llamatelemetry_tensorcore.matmul import MatmulPadding, matmul_tensor_core, tensor_core_padding
from llamatelemetry_tensorcore.model import PRECISION_SENSITIVE, ModelPlan, optimize_for_tensor_cores, plan_model

__all__ = [
    "PRECISION_SENSITIVE",
    "AmpPlan",
    "MatmulPadding",
    "ModelPlan",
    "ReusableAutocast",
    "TensorCoreConfig",
    "TensorCorePlan",
    "TensorCoreWarning",
    "__version__",
    "check_tensor_core_support",
    "enable_amp",
    "enable_tensor_cores",
    "estimated_speedup",
    "get_tensor_core_info",
    "matmul_tensor_core",
    "measure_matmul_speedup",
    "optimize_for_tensor_cores",
    "plan_amp",
    "plan_model",
    "plan_tensor_cores",
    "tensor_core_dtypes",
    "tensor_core_padding",
]
