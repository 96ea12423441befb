"""llamatelemetry-tensorcore: Tensor Core detection, switches and mixed-precision helpers.

Documented import path: ``llamatelemetry.cuda.tensor_core``.
"""

from llamatelemetry_tensorcore.__about__ import __version__

__all__ = ["__version__"]
