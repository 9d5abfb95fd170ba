"""Where arrays live: a :class:`Device` carries the array module ``xp`` (NumPy or CuPy) and the transfers.

This is the only module that imports CuPy. The import is lazy and guarded: nothing touches CuPy until a
CUDA device is asked for, and when CuPy or the GPU is unavailable the error keeps the real reason.

    dev = get_device("auto")      # "cpu" | "cuda" | "cuda:N" | "auto"
    xp = dev.xp                   # numpy or cupy
    A = dev.asarray(host_array)   # host -> device (a no-op on the CPU)
    a = to_numpy(A)               # device -> host, from any device
"""

from __future__ import annotations

import ctypes
import re
import warnings
from types import ModuleType

import numpy

from .errors import DeviceError

_CUPY_HINT = (
    "pip install 'gpunn[cuda12]' for a CUDA 12 driver or 'gpunn[cuda13]' for CUDA 13 "
    "(nvidia-smi shows the driver's CUDA version)"
)
_cupy: ModuleType | None = None
_cupy_import_error: str | None = None
_auto_notice_given = False


class DeviceFallbackWarning(UserWarning):
    """``get_device("auto")`` found no usable GPU and chose the CPU."""


class CupyMissing(DeviceError):
    """CuPy is not installed at all: the user chose a CPU-only install."""


def import_cupy() -> ModuleType:
    """Return the CuPy module, importing it on first use; raise DeviceError with the reason if absent
    (CupyMissing where it is simply not installed)."""
    global _cupy, _cupy_import_error
    if _cupy is None and _cupy_import_error is None:
        try:
            import cupy
        except ModuleNotFoundError as exc:
            _cupy_import_error = "" if exc.name == "cupy" else f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a broken install raising anything else
            _cupy_import_error = f"{type(exc).__name__}: {exc}"
        else:
            _cupy = cupy
    if _cupy is None:
        if not _cupy_import_error:
            raise CupyMissing(f"CUDA needs CuPy, which is not installed: {_CUPY_HINT}")
        raise DeviceError(f"CUDA needs CuPy, which cannot be imported ({_cupy_import_error}); {_CUPY_HINT}")
    return _cupy


def import_cublas() -> ModuleType:
    """CuPy's thin cuBLAS binding (cupy_backends.cuda.libs.cublas), for calls CuPy's own matmul does
    not allow (during CUDA graph capture); DeviceError where CuPy is absent."""
    import_cupy()
    from cupy_backends.cuda.libs import cublas

    return cublas


def _cuda_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _version(v: int) -> str:
    """CUDA's integer versions: 12090 -> "12.9"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_version() -> int | None:
    """The CUDA version the installed NVIDIA driver supports (e.g. 12090), or None where there is no
    driver (no libcuda to load)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value


def _why_no_gpu(cupy: ModuleType, exc: BaseException) -> str:
    """What CUDA's error at startup means on this machine, in words: no driver, a driver too old for
    this CuPy, no GPU visible; else CUDA's own message."""
    message = _cuda_message(exc)
    driver = driver_version()
    if driver is None:
        return f"no NVIDIA driver is installed (libcuda.so.1 cannot be loaded) [{message}]"
    try:
        needed = int(cupy.cuda.runtime.runtimeGetVersion())
    except Exception:
        needed = None
    if needed is not None and driver < needed:
        has, wants = _version(driver), _version(needed)
        return (
            f"the NVIDIA driver supports CUDA {has} but this CuPy needs CUDA {wants}: update the driver, "
            f"or install the CuPy of an older CUDA ({_CUPY_HINT}) [{message}]"
        )
    if "NoDevice" in message:
        return f"the NVIDIA driver sees no GPU (CUDA_VISIBLE_DEVICES may hide them) [{message}]"
    return message


class Device:
    """One place arrays can live: the CPU (NumPy) or one CUDA GPU (CuPy).

    Attributes: ``kind`` ("cpu" or "cuda"), ``index`` (GPU number, None on the CPU), ``xp`` (the array
    module every computation on this device goes through).
    """

    def __init__(self, kind: str, index: int | None = None, xp: ModuleType = numpy):
        self.kind = kind
        self.index = index
        self.xp = xp

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def name(self) -> str:
        return "cpu" if self.index is None else f"cuda:{self.index}"

    def __repr__(self) -> str:
        return f"Device({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def asarray(self, a, dtype=None):
        """Return ``a`` (a NumPy array, a CuPy array on any GPU, or a nested list) on this device."""
        if not self.is_cuda:
            return numpy.asarray(to_numpy(a), dtype=dtype)
        with self.xp.cuda.Device(self.index):
            return self.xp.asarray(a, dtype=dtype)

    def synchronize(self) -> None:
        """Wait until all work queued on this device has finished (a no-op on the CPU)."""
        if self.is_cuda:
            self.xp.cuda.Device(self.index).synchronize()

    def description(self) -> str:
        """A human-readable name: "cpu" or e.g. "cuda:0 (NVIDIA H100 80GB HBM3)"."""
        if not self.is_cuda:
            return "cpu"
        props = self.xp.cuda.runtime.getDeviceProperties(self.index)
        gpu = props["name"]
        return f"{self.name} ({gpu.decode() if isinstance(gpu, bytes) else gpu})"

    def memory_used(self) -> int:
        """Bytes this process holds on the device through CuPy's memory pool (0 on the CPU)."""
        return int(self.xp.get_default_memory_pool().used_bytes()) if self.is_cuda else 0


CPU = Device("cpu")
_SPEC = re.compile(r"^(cpu|auto|cuda)(?::(\d+))?$")


def parse_device(spec: str) -> tuple[str, int]:
    """("cpu"|"cuda"|"auto", index) for a device name; DeviceError for anything else."""
    match = _SPEC.match(str(spec).strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"unknown device {spec!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return match.group(1), int(match.group(2) or 0)


def get_device(spec: str | Device = "auto") -> Device:
    """The device named by ``spec``: "cpu", "cuda" (= "cuda:0"), "cuda:N" or "auto".

    "auto" is the first GPU when CuPy imports and a GPU answers, else the CPU: silently where CuPy is
    not installed (a CPU install: nobody asked for a GPU), with one DeviceFallbackWarning saying why
    where CuPy is installed but cannot reach a GPU. "cuda"/"cuda:N" raise DeviceError with the real
    reason (CuPy not installed, no driver, a driver too old, no such device) instead of falling back.
    The chosen GPU becomes CuPy's current device, so arrays made afterwards land on it.
    """
    if isinstance(spec, Device):
        return spec
    kind, index = parse_device(spec)
    if kind == "cpu":
        return CPU
    if kind == "cuda":
        return _cuda_device(index)
    try:
        return _cuda_device(0)
    except CupyMissing:
        return CPU
    except DeviceError as exc:
        global _auto_notice_given
        if not _auto_notice_given:
            _auto_notice_given = True
            warnings.warn(f"no usable GPU, running on the CPU: {exc}", DeviceFallbackWarning, stacklevel=2)
        return CPU


def _cuda_device(index: int) -> Device:
    cupy = import_cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, no device
        raise DeviceError(f"CuPy cannot reach a GPU: {_why_no_gpu(cupy, exc)}") from exc
    if count == 0:
        raise DeviceError("CuPy found no CUDA device")
    if index >= count:
        visible = ", ".join(f"cuda:{i}" for i in range(count))
        raise DeviceError(f"cuda:{index} does not exist; this machine shows {count}: {visible}")
    try:
        cupy.cuda.Device(index).use()
        cupy.zeros(1, dtype=cupy.float32).sum().item()  # creates the context: fails here, not later
    except Exception as exc:
        raise DeviceError(f"cuda:{index} does not work: {_cuda_message(exc)}") from exc
    return Device("cuda", index, cupy)


def is_device_array(a) -> bool:
    """True for a CuPy array (without importing CuPy for anything that is not one)."""
    if _cupy is None and type(a).__module__.partition(".")[0] != "cupy":
        return False
    return isinstance(a, import_cupy().ndarray)


def get_array_module(*arrays) -> ModuleType:
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    return _cupy if any(is_device_array(a) for a in arrays) else numpy


def to_numpy(a) -> numpy.ndarray:
    """A host copy (or the array itself) of a NumPy array, CuPy array, scalar or nested list."""
    if is_device_array(a):
        return a.get()
    return numpy.asarray(a)
