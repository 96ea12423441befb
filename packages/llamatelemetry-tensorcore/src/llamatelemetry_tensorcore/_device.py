"""The device work will really run on (simulation changes what is chosen, never where tensors go)."""

from __future__ import annotations

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.errors import CapabilityError, ConfigurationError

__all__ = ["runtime_device"]


def runtime_device(device: int | str | torch.device | None) -> tuple[torch.device, DeviceInfo]:
    """``device`` as a torch device (default: the current GPU, else the CPU) and the facts about it.

    While ``"cpu"`` is simulated, the CPU is returned even on a GPU machine.

    Raises :class:`~llamatelemetry_core.errors.CapabilityError` for a CUDA device on a machine without CUDA.
    """
    if device is None:
        target = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if target.type not in ("cuda", "cpu"):
        raise ConfigurationError(f"expected a CUDA or CPU device, got {target}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise CapabilityError(
            f"expected a machine with CUDA for device {target}, but CUDA is not available (torch "
            f"{torch.__version__}); pass device='cpu' or leave device=None to use the CPU"
        )
    info = get_device_info(target)
    if not info.is_cuda:  # simulating "cpu" on a GPU machine: the work stays on the CPU too
        target = torch.device("cpu")
    return target, info
