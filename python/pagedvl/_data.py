"""K/V/Q data in and out of the C calls: checked before any pointer leaves
Python, so a wrong dtype, shape, layout or device is a Python exception with
the expected and actual values, never a read or write out of bounds.

Accepted, by the cache's backend:
- CPU: numpy arrays (and torch CPU tensors, and CPU DLPack producers, read
  through numpy.from_dlpack). dtype f32 -> float32, f16 -> float16, bf16 ->
  ml_dtypes.bfloat16 when ml_dtypes is installed, or uint16 holding the
  bfloat16 bit patterns (always accepted); arrays this package allocates for
  a bf16 cache are bfloat16 with ml_dtypes, else uint16.
- CUDA: torch tensors, any object with __cuda_array_interface__ (cupy,
  numba, ...) or with __dlpack__/__dlpack_device__, on the cache's device.
  For objects exposing only __cuda_array_interface__ the device cannot be
  read (the interface has no device field): the pointer must be on the
  cache's device.
torch is never imported by this module unless the caller already did, or a
CUDA-cache call must allocate an output and none was given.
"""
from __future__ import annotations

import ctypes as C
import sys

import numpy as np

from ._lib import Backend, DType

try:  # optional: a real bfloat16 numpy dtype
    import ml_dtypes as _ml_dtypes

    BF16_NUMPY = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    BF16_NUMPY = None

_DTYPE_NAMES = {DType.F32: "f32", DType.F16: "f16", DType.BF16: "bf16"}
_NUMPY = {
    DType.F32: [np.dtype(np.float32)],
    DType.F16: [np.dtype(np.float16)],
    DType.BF16: ([BF16_NUMPY] if BF16_NUMPY is not None else []) + [np.dtype(np.uint16)],
}
_TORCH_NAMES = {DType.F32: "float32", DType.F16: "float16", DType.BF16: "bfloat16"}
# __cuda_array_interface__ typestr ('<u2': bf16 bit patterns; the interface
# has no bfloat16 type).
_TYPESTR = {DType.F32: ("<f4",), DType.F16: ("<f2",), DType.BF16: ("<u2",)}
# DLPack (code, bits): kDLFloat = 2, kDLBfloat = 4, kDLUInt = 1.
_DLPACK = {DType.F32: ((2, 32),), DType.F16: ((2, 16),), DType.BF16: ((4, 16), (1, 16))}
_KDLCPU, _KDLCUDA = 1, 2


class Target:
    """Where and what the cache computes: backend, device, element type."""

    __slots__ = ("backend", "device", "dtype")

    def __init__(self, backend, device, dtype):
        self.backend = Backend(backend)
        self.device = int(device)
        self.dtype = DType(dtype)

    def where(self):
        return "cpu" if self.backend == Backend.CPU else f"cuda:{self.device}"


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype this package allocates for a cache dtype."""
    return _NUMPY[DType(dtype)][0]


def _fmt_shape(shape):
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def _check_shape(name, expected, actual, layout):
    actual = tuple(int(s) for s in actual)
    ok = len(actual) == len(expected) and all(
        e is None or e == a for e, a in zip(expected, actual))
    if not ok:
        layout = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected shape {_fmt_shape(expected)}{layout}, "
                         f"got {actual}")
    return actual


def _c_strides(shape, itemsize):
    strides, acc = [], itemsize
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def _compact(shape, strides_bytes, itemsize):
    """Row-major contiguity, ignoring the strides of extent-1 dimensions."""
    want = _c_strides(shape, itemsize)
    return all(s == 1 or a == b for s, a, b in zip(shape, strides_bytes, want))


def is_torch(obj):
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "data_ptr")


class View:
    """A checked pointer and what must stay alive until the call returns."""

    __slots__ = ("ptr", "shape", "keep")

    def __init__(self, ptr, shape, keep):
        self.ptr = ptr
        self.shape = shape
        self.keep = keep


def _numpy_view(arr, t, name, shape, layout, writable):
    allowed = _NUMPY[t.dtype]
    if arr.dtype not in allowed:
        raise TypeError(f"{name}: the cache dtype is {_DTYPE_NAMES[t.dtype]}, so "
                        f"the array must be {' or '.join(str(d) for d in allowed)}"
                        f"; got {arr.dtype}")
    actual = _check_shape(name, shape, arr.shape, layout)
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (row-major); got strides "
                         f"{arr.strides} for shape {arr.shape}: use "
                         f"numpy.ascontiguousarray")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name}: the output array is read-only")
    return View(arr.ctypes.data, actual, arr)


def _torch_view(x, t, name, shape, layout, writable):
    torch = sys.modules["torch"]
    want = getattr(torch, _TORCH_NAMES[t.dtype])
    allowed = [want] + ([torch.uint16] if t.dtype == DType.BF16
                        and hasattr(torch, "uint16") else [])
    if x.dtype not in allowed:
        raise TypeError(f"{name}: the cache dtype is {_DTYPE_NAMES[t.dtype]}, so "
                        f"the tensor must be {want}; got {x.dtype}")
    dev = x.device
    here = "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index}"
    if here != t.where():
        raise ValueError(f"{name}: the cache computes on {t.where()}, the tensor "
                         f"is on {here}")
    actual = _check_shape(name, shape, tuple(x.shape), layout)
    if not x.is_contiguous():
        raise ValueError(f"{name}: must be contiguous; got strides {tuple(x.stride())}"
                         f" for shape {tuple(x.shape)}: use .contiguous()")
    if writable and x.requires_grad:
        raise ValueError(f"{name}: the output tensor requires grad")
    return View(x.data_ptr() or None, actual, x)


def _cai_view(obj, t, name, shape, layout, writable):
    cai = obj.__cuda_array_interface__
    typestr = cai.get("typestr")
    if typestr not in _TYPESTR[t.dtype]:
        raise TypeError(f"{name}: the cache dtype is {_DTYPE_NAMES[t.dtype]}, so "
                        f"__cuda_array_interface__ typestr must be "
                        f"{' or '.join(_TYPESTR[t.dtype])}; got {typestr!r}")
    actual = _check_shape(name, shape, tuple(cai["shape"]), layout)
    strides = cai.get("strides")
    itemsize = int(typestr[2:])
    if strides is not None and not _compact(actual, strides, itemsize):
        raise ValueError(f"{name}: must be C-contiguous; got strides "
                         f"{tuple(strides)} for shape {actual}")
    ptr, readonly = cai["data"]
    if writable and readonly:
        raise ValueError(f"{name}: the output array is read-only")
    if hasattr(obj, "__dlpack_device__"):
        _check_dlpack_device(obj, t, name)
    return View(ptr or None, actual, obj)


def _check_dlpack_device(obj, t, name):
    dev_type, dev_id = obj.__dlpack_device__()
    if t.backend == Backend.CPU:
        if int(dev_type) != _KDLCPU:
            raise ValueError(f"{name}: the cache computes on cpu, the array is on "
                             f"DLPack device ({int(dev_type)}, {int(dev_id)})")
    elif int(dev_type) != _KDLCUDA or int(dev_id) != t.device:
        raise ValueError(f"{name}: the cache computes on {t.where()}, the array is "
                         f"on DLPack device ({int(dev_type)}, {int(dev_id)}) "
                         f"(2 = CUDA)")


class _DLDevice(C.Structure):
    _fields_ = [("device_type", C.c_int32), ("device_id", C.c_int32)]


class _DLDataType(C.Structure):
    _fields_ = [("code", C.c_uint8), ("bits", C.c_uint8), ("lanes", C.c_uint16)]


class _DLTensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("device", _DLDevice), ("ndim", C.c_int32),
                ("dtype", _DLDataType), ("shape", C.POINTER(C.c_int64)),
                ("strides", C.POINTER(C.c_int64)), ("byte_offset", C.c_uint64)]


_capsule_get = C.pythonapi.PyCapsule_GetPointer
_capsule_get.restype = C.c_void_p
_capsule_get.argtypes = [C.py_object, C.c_char_p]


def dlpack_tensor(capsule):
    """The DLTensor of a legacy "dltensor" capsule (the capsule keeps
    ownership: its destructor calls the producer's deleter)."""
    addr = _capsule_get(capsule, b"dltensor")
    # DLManagedTensor starts with its DLTensor.
    return _DLTensor.from_address(addr)


def _dlpack_view(obj, t, name, shape, layout, writable, stream):
    _check_dlpack_device(obj, t, name)
    if t.backend == Backend.CPU:
        try:
            arr = np.from_dlpack(obj)
        except (BufferError, TypeError, RuntimeError) as e:
            raise TypeError(f"{name}: numpy cannot read this DLPack object: {e}") from e
        return _numpy_view(arr, t, name, shape, layout, writable)
    # CUDA: ask the producer to order its work before our stream (1 = the
    # legacy default stream; 0 is not allowed by the protocol).
    try:
        capsule = obj.__dlpack__(stream=stream if stream else 1)
    except TypeError:
        capsule = obj.__dlpack__()
    dl = dlpack_tensor(capsule)
    code, bits, lanes = dl.dtype.code, dl.dtype.bits, dl.dtype.lanes
    if lanes != 1 or (code, bits) not in _DLPACK[t.dtype]:
        raise TypeError(f"{name}: the cache dtype is {_DTYPE_NAMES[t.dtype]}, so "
                        f"the DLPack dtype (code, bits, lanes) must be one of "
                        f"{[c + (1,) for c in _DLPACK[t.dtype]]}; got "
                        f"({code}, {bits}, {lanes})")
    dims = tuple(dl.shape[i] for i in range(dl.ndim))
    actual = _check_shape(name, shape, dims, layout)
    if dl.strides:
        strides = tuple(dl.strides[i] * (bits // 8) for i in range(dl.ndim))
        if not _compact(actual, strides, bits // 8):
            raise ValueError(f"{name}: must be C-contiguous; got element strides "
                             f"{tuple(dl.strides[i] for i in range(dl.ndim))} for "
                             f"shape {actual}")
    ptr = (dl.data or 0) + dl.byte_offset
    return View(ptr or None, actual, (obj, capsule))


def view(obj, t: Target, name, shape, layout="", *, writable=False, stream=None):
    """Checks `obj` for the cache `t` and returns its View. `shape` may hold
    None for a free extent; View.shape is the actual one."""
    if isinstance(obj, np.ndarray):
        if t.backend != Backend.CPU:
            raise TypeError(f"{name}: a numpy array is host memory, the cache "
                            f"computes on {t.where()}: pass a torch tensor on "
                            f"{t.where()} or an object with "
                            f"__cuda_array_interface__ or __dlpack__")
        return _numpy_view(obj, t, name, shape, layout, writable)
    if is_torch(obj):
        return _torch_view(obj, t, name, shape, layout, writable)
    if hasattr(obj, "__cuda_array_interface__"):
        if t.backend == Backend.CPU:
            raise TypeError(f"{name}: device memory (__cuda_array_interface__) "
                            f"given to a cache that computes on the CPU: pass "
                            f"a numpy array")
        return _cai_view(obj, t, name, shape, layout, writable)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return _dlpack_view(obj, t, name, shape, layout, writable, stream)
    kind = "a numpy array" if t.backend == Backend.CPU else (
        "a torch tensor or an object with __cuda_array_interface__ or __dlpack__")
    raise TypeError(f"{name}: expected {kind}, got {type(obj).__name__}")


def stream_handle(t: Target, stream):
    """The cudaStream_t (as an int, or None for NULL) of a call: the given
    stream (an int handle, a torch.cuda.Stream, an object with .cuda_stream,
    .ptr or __cuda_stream__), else torch's current stream on the cache's
    device when torch is already imported, else the default stream. The CPU
    backend ignores streams: always None."""
    if t.backend == Backend.CPU:
        return None
    if stream is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.current_stream(t.device).cuda_stream or None
        return None
    if isinstance(stream, int):
        return stream or None
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1]) or None
    for attr in ("cuda_stream", "ptr", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr)) or None
    raise TypeError(f"stream: expected an int cudaStream_t, a torch.cuda.Stream "
                    f"or an object with __cuda_stream__; got {type(stream).__name__}")


def empty(t: Target, shape, like=None):
    """A new output of `shape` for the cache: like `like` (a numpy array or
    torch tensor) when given, else numpy on the CPU and torch on CUDA."""
    if like is not None and is_torch(like):
        torch = sys.modules["torch"]
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if t.backend == Backend.CPU:
        dt = like.dtype if isinstance(like, np.ndarray) else numpy_dtype(t.dtype)
        return np.empty(shape, dtype=dt)
    try:
        import torch
    except ImportError:
        raise TypeError("the cache computes on CUDA and torch is not installed: "
                        "pass the output array(s) explicitly") from None
    return torch.empty(shape, dtype=getattr(torch, _TORCH_NAMES[t.dtype]),
                       device=f"cuda:{t.device}")


def uint(value, name, top=2**32 - 1):
    """An int in [0, top] (ctypes would wrap a negative value silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if not 0 <= int(value) <= top:
        raise ValueError(f"{name}: must be in [0, {top}], got {value}")
    return int(value)


def host_array(x, dtype, name, ndim=1):
    """A C-contiguous host array of `dtype` from any array-like of numbers,
    refusing values that do not fit (no silent wrap-around)."""
    dtype = np.dtype(dtype)
    try:
        a = np.asarray(x)
    except Exception as e:
        raise TypeError(f"{name}: expected an array of numbers: {e}") from e
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.size and dtype.kind in "ui":
        if a.dtype.kind not in "ui":
            if a.dtype.kind == "b" or not np.all(np.equal(np.mod(a, 1), 0)):
                raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
        info = np.iinfo(dtype)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            raise ValueError(f"{name}: values must be in [{info.min}, {info.max}]"
                             f" ({dtype}); got min {lo}, max {hi}")
    elif a.size and a.dtype.kind not in "uif":
        raise TypeError(f"{name}: expected numbers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def ptr(a, ctype):
    """ctypes pointer to a host numpy array's data (None -> NULL)."""
    if a is None:
        return None
    return a.ctypes.data_as(C.POINTER(ctype))
