"""Facts about the device a computation runs on: the real one, or a simulated one.

:func:`get_device_info` answers for the current CUDA device, any given CUDA device, or the CPU. Every
component asks it (never ``torch.cuda`` directly) when choosing what to run, so that simulating a device, with
``LLAMATELEMETRY_SIMULATE_DEVICE=t4`` or ``with simulate_device("t4"):``, shows what that GPU would choose on any
machine, a CPU-only one included. A simulated GPU carries the datasheet figures of
:mod:`llamatelemetry_core.gpu_specs`; a simulated CPU (``cpu``: no native bf16, ``cpu-bf16``: native bf16) pins
every fact as well, so that what is chosen never depends on the host. A simulated device runs nothing.

``LLAMATELEMETRY_CPU_BF16=0`` (or ``1``) overrides the detection of native bf16 on the real CPU: the test
matrices use it to run every suite as a CPU without bf16 and as one with it, whatever the host is.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.gpu_specs import GPU_SPECS, GPUSpec, architecture_name, find_spec, spec_by_key

__all__ = [
    "CPU_BF16_ENV",
    "SIMULATED_CPUS",
    "SIMULATE_ENV",
    "DeviceInfo",
    "PeakThroughput",
    "cpu_device_info",
    "get_device_info",
    "real_device_info",
    "reload_simulation_env",
    "simulate_device",
    "simulated_device_key",
]

SIMULATE_ENV = "LLAMATELEMETRY_SIMULATE_DEVICE"
CPU_BF16_ENV = "LLAMATELEMETRY_CPU_BF16"
SIMULATED_CPUS: dict[str, bool] = {"cpu": False, "cpu-bf16": True}
"""Keys of the simulated CPUs, with whether each has native bf16 (AVX512-BF16/AMX or Arm BF16)."""
# The pinned facts of a simulated CPU: a small x86-64 machine like a CI runner (the numbers only need to be fixed;
# few cores make the launch heuristics give several rows to a program even on the tiny shapes of the tests).
_SIMULATED_CPU_CORES = 2
_SIMULATED_CPU_MEMORY = 8 * 1024**3
_GIB = 1024**3
_simulated: contextvars.ContextVar[str | None] = contextvars.ContextVar("llamatelemetry_simulated", default=None)


@dataclass(frozen=True)
class PeakThroughput:
    """Datasheet peaks of one GPU model (dense; TFLOP/s, TOP/s, GB/s). ``None``: no tensor-core path."""

    fp32_tflops: float
    fp16_tflops: float | None
    bf16_tflops: float | None
    tf32_tflops: float | None
    int8_tops: float | None
    fp8_tflops: float | None
    memory_bandwidth_gbps: float
    source: str


@dataclass(frozen=True)
class DeviceInfo:
    """What llamatelemetry knows about one device.

    ``sm_count`` is the number of streaming multiprocessors on a GPU and of logical cores on a CPU.
    ``supports_bf16`` means native bf16 arithmetic (Ampere and newer GPUs; CPUs with AVX512-BF16, AMX or Arm BF16).
    ``shared_memory_per_block_bytes`` is the most shared memory one block may opt into (``None`` on CPU).
    ``peak`` holds datasheet figures when the GPU model is in the table, else ``None``.
    """

    kind: Literal["cuda", "cpu"]
    name: str
    index: int | None
    compute_capability: tuple[int, int] | None
    architecture: str
    sm_count: int
    total_memory_bytes: int
    free_memory_bytes: int | None
    shared_memory_per_block_bytes: int | None
    supports_bf16: bool
    supports_fp8: bool
    supports_tf32: bool
    has_tensor_cores: bool
    peak: PeakThroughput | None
    spec_key: str | None
    simulated: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def sm(self) -> int | None:
        """Compute capability as one number (``75`` for 7.5), or ``None`` on CPU."""
        if self.compute_capability is None:
            return None
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    def capability_at_least(self, major: int, minor: int = 0) -> bool:
        """True on a CUDA device of compute capability >= ``major.minor``."""
        return self.compute_capability is not None and self.compute_capability >= (major, minor)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = (
            None if self.compute_capability is None else f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        )
        return data


def _features(cc: tuple[int, int]) -> dict[str, bool]:
    return {
        "supports_bf16": cc >= (8, 0),
        "supports_fp8": cc >= (8, 9),
        "supports_tf32": cc >= (8, 0),
        "has_tensor_cores": cc >= (7, 0),
    }


def _peak(spec: GPUSpec | None) -> PeakThroughput | None:
    if spec is None:
        return None
    return PeakThroughput(
        fp32_tflops=spec.fp32_tflops,
        fp16_tflops=spec.fp16_tflops,
        bf16_tflops=spec.bf16_tflops,
        tf32_tflops=spec.tf32_tflops,
        int8_tops=spec.int8_tops,
        fp8_tflops=spec.fp8_tflops,
        memory_bandwidth_gbps=spec.memory_bandwidth_gbps,
        source=f"datasheet of {spec.name} (dense)",
    )


@functools.cache
def _spec_device_info(spec: GPUSpec) -> DeviceInfo:
    total = int(spec.memory_gb * 1e9)
    return DeviceInfo(
        kind="cuda",
        name=f"{spec.name} (simulated)",
        index=0,
        compute_capability=spec.compute_capability,
        architecture=architecture_name(*spec.compute_capability),
        sm_count=spec.sm_count,
        total_memory_bytes=total,
        free_memory_bytes=total,
        shared_memory_per_block_bytes=spec.shared_memory_per_block_kib * 1024,
        peak=_peak(spec),
        spec_key=spec.key,
        simulated=True,
        **_features(spec.compute_capability),
    )


def _cpuinfo_field(*names: str) -> str | None:
    """The first ``/proc/cpuinfo`` line value for one of ``names`` (Linux only)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in names:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "CPU"


def _cpu_has_native_bf16() -> bool:
    """x86 with AVX512-BF16 or AMX-BF16, or Arm with the BF16 extension: bf16 math without emulation.

    ``LLAMATELEMETRY_CPU_BF16=0``/``1`` overrides the detection. Like every static fact, it is read once per
    process.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in {"0", "false", "no", "off"}:
        return False
    if forced in {"1", "true", "yes", "on"}:
        return True
    if forced:
        raise ConfigurationError(f"expected {CPU_BF16_ENV} to be 0 or 1, got {forced!r}; set 0, 1, or unset it")
    flags = set((_cpuinfo_field("flags", "Features") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_device_info(*, refresh_memory: bool = True) -> DeviceInfo:
    """Facts about this machine's CPU as a device (no tensor cores, no datasheet peaks).

    ``refresh_memory=False`` answers from a cache, with free memory as of the first query. Native bf16 is
    detected from the CPU flags unless :data:`CPU_BF16_ENV` says otherwise.
    """
    cached = _cpu_device_info()
    if not refresh_memory:
        return cached
    return dataclasses.replace(cached, free_memory_bytes=_cpu_free_memory())


@functools.cache
def _simulated_cpu_info(bf16: bool) -> DeviceInfo:
    return DeviceInfo(
        kind="cpu",
        name=f"CPU (simulated, {'native' if bf16 else 'no native'} bf16)",
        index=None,
        compute_capability=None,
        architecture="x86_64",
        sm_count=_SIMULATED_CPU_CORES,
        total_memory_bytes=_SIMULATED_CPU_MEMORY,
        free_memory_bytes=_SIMULATED_CPU_MEMORY,
        shared_memory_per_block_bytes=None,
        supports_bf16=bf16,
        supports_fp8=False,
        supports_tf32=False,
        has_tensor_cores=False,
        peak=None,
        spec_key=None,
        simulated=True,
    )


def _cpu_free_memory() -> int | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return None


@functools.cache
def _cpu_device_info() -> DeviceInfo:
    total = 0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceInfo(
        kind="cpu",
        name=_cpu_name(),
        index=None,
        compute_capability=None,
        architecture=platform.machine() or "unknown",
        sm_count=os.cpu_count() or 1,
        total_memory_bytes=total,
        free_memory_bytes=_cpu_free_memory(),
        shared_memory_per_block_bytes=None,
        supports_bf16=_cpu_has_native_bf16(),
        supports_fp8=False,
        supports_tf32=False,
        has_tensor_cores=False,
        peak=None,
        spec_key=None,
    )


def _cuda_free_memory(index: int) -> int | None:
    try:
        return int(torch.cuda.mem_get_info(index)[0])
    except RuntimeError:
        return None


def _cuda_device_info(index: int, refresh_memory: bool) -> DeviceInfo:
    cached = _cached_cuda_device_info(index)
    if not refresh_memory:
        return cached
    return dataclasses.replace(cached, free_memory_bytes=_cuda_free_memory(index))


@functools.cache
def _cached_cuda_device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    cc = (int(props.major), int(props.minor))
    total = int(props.total_memory)
    spec = find_spec(props.name, total / _GIB)
    free = _cuda_free_memory(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if smem is None and spec is not None:
        smem = spec.shared_memory_per_block_kib * 1024
    return DeviceInfo(
        kind="cuda",
        name=str(props.name),
        index=index,
        compute_capability=cc,
        architecture=architecture_name(*cc),
        sm_count=int(props.multi_processor_count),
        total_memory_bytes=total,
        free_memory_bytes=free,
        shared_memory_per_block_bytes=None if smem is None else int(smem),
        peak=_peak(spec),
        spec_key=None if spec is None else spec.key,
        **_features(cc),
    )


_valid_keys: set[str] = set()


_UNREAD = "\0unread"
_env_key: list[str | None] = [_UNREAD]  # LLAMATELEMETRY_SIMULATE_DEVICE, read once (dispatch asks on every call)


def reload_simulation_env() -> None:
    """Read ``LLAMATELEMETRY_SIMULATE_DEVICE`` again at the next device query (after changing it in-process;
    ``llamatelemetry_core.selection.reload_environment`` calls this)."""
    _env_key[0] = _UNREAD


def simulated_device_key() -> str | None:
    """The key of the device being simulated (context manager first, then the environment), or ``None``.

    The variable is read once; :func:`reload_simulation_env` reads it again.
    """
    key = _simulated.get()
    if key is None:
        key = _env_key[0]
        if key == _UNREAD:
            raw = os.environ.get(SIMULATE_ENV)
            key = raw.strip().lower() or None if raw else None
            _env_key[0] = key
    if key is not None and key not in _valid_keys:
        _validate_key(key)
        _valid_keys.add(key)
    return key


def _validate_key(key: str) -> None:
    if key not in SIMULATED_CPUS and spec_by_key(key) is None:
        known = ", ".join([*SIMULATED_CPUS, *(s.key for s in GPU_SPECS)])
        raise ConfigurationError(
            f"expected a device to simulate among {known}, got {key!r} "
            f"(from simulate_device() or {SIMULATE_ENV}); pick one of those keys or unset {SIMULATE_ENV}"
        )


@contextlib.contextmanager
def simulate_device(key: str) -> Iterator[DeviceInfo]:
    """Within the block, :func:`get_device_info` answers as if the device ``key`` were present.

    Keys are those of :data:`~llamatelemetry_core.gpu_specs.GPU_SPECS` (``t4``, ``a100``, ``h100``, ...) and
    the CPUs of :data:`SIMULATED_CPUS`: ``cpu`` (no native bf16) and ``cpu-bf16``. Every fact of a simulated
    device is pinned (a simulated CPU has 2 cores and 8 GiB, whatever the host has). Simulation changes what
    is *chosen*; it does not make CUDA available, and CPU tensors still run on the host CPU. Thread- and
    task-local. Raises ``TypeError`` for a key that is not a string, :class:`ConfigurationError` for an unknown
    one.
    """
    given: object = key  # validated at run time whatever the annotation says
    if not isinstance(given, str):
        raise TypeError(
            f"expected key to be a device name such as 't4', 'h100' or 'cpu' (a str), got {type(given).__name__}"
        )
    key = key.strip().lower()
    _validate_key(key)
    token = _simulated.set(key)
    try:
        yield get_device_info()
    finally:
        _simulated.reset(token)


def _resolve_index(device: int | str | torch.device | None) -> int | None:
    """The CUDA index ``device`` names, or ``None`` for the CPU."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise ConfigurationError(f"expected a CUDA or CPU device, got {dev}; llamatelemetry supports cuda and cpu")
    if not torch.cuda.is_available():
        raise CapabilityError(
            f"asked about {dev} but CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda}); use a CUDA machine or simulate one with {SIMULATE_ENV}=t4"
        )
    given: int | None = dev.index  # None for a bare "cuda"
    index = torch.cuda.current_device() if given is None else given
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigurationError(f"expected a CUDA device index in [0, {count}), got {index}")
    return index


def real_device_info(device: int | str | torch.device | None = None, *, refresh_memory: bool = True) -> DeviceInfo:
    """Like :func:`get_device_info`, ignoring any simulation (for test skipping and diagnostics)."""
    index = _resolve_index(device)
    if index is None:
        return cpu_device_info(refresh_memory=refresh_memory)
    return _cuda_device_info(index, refresh_memory)


_static_by_device: dict[torch.device, DeviceInfo] = {}


def get_device_info(device: int | str | torch.device | None = None, *, refresh_memory: bool = True) -> DeviceInfo:
    """Facts about ``device``: ``None`` means the current CUDA device, or the CPU when there is none.

    While a GPU is simulated, ``None`` and any CUDA device answer with it, and an explicit CPU device answers
    with the real CPU; while a CPU is simulated, every device answers with the simulated CPU.

    The static facts are cached per device; free memory is queried again unless ``refresh_memory=False``
    (what dispatch uses on every call, where a device query per operation would cost more than the operation).
    """
    key = simulated_device_key()
    if key is None and not refresh_memory and type(device) is torch.device:
        # The hot path of dispatch: a tensor's device, static facts only. Only devices with an explicit index
        # (and the CPU) are cached here: a bare "cuda" follows the current device.
        hit = _static_by_device.get(device)
        if hit is not None:
            return hit
        info = real_device_info(device, refresh_memory=False)
        if device.type == "cpu" or device.index is not None:
            _static_by_device[device] = info
        return info
    if key is not None:
        if key in SIMULATED_CPUS:
            return _simulated_cpu_info(SIMULATED_CPUS[key])
        explicit_cpu = device is not None and not isinstance(device, int) and torch.device(device).type == "cpu"
        if explicit_cpu:
            return cpu_device_info(refresh_memory=refresh_memory)
        spec = spec_by_key(key)
        assert spec is not None  # validated by simulated_device_key
        return _spec_device_info(spec)
    return real_device_info(device, refresh_memory=refresh_memory)
