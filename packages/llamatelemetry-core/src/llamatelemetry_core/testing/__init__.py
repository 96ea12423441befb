"""Test helpers shared by every llamatelemetry package: tolerances, a verbose ``assert_close``, markers.

The pytest plugin in :mod:`llamatelemetry_core.testing.plugin` registers the hardware markers and skips tests
the current device cannot run; enable it with ``-p llamatelemetry_core.testing.plugin``.
"""

from llamatelemetry_core.testing.compare import TOLERANCES, Tolerance, assert_close, tolerance_for

__all__ = ["TOLERANCES", "Tolerance", "assert_close", "tolerance_for"]
