"""The checks device data pass before a CUDA call, exercised without a GPU:
objects exposing __cuda_array_interface__ or DLPack capsules are described
here by hand (pointers that are never dereferenced: a check that fails
raises before any call, one that passes returns the pointer)."""
import ctypes as C

import numpy as np
import pytest

from pagedvl import Backend, DType
from pagedvl import _data

CUDA0 = _data.Target(Backend.CUDA, 0, DType.F16)
CUDA_BF16 = _data.Target(Backend.CUDA, 1, DType.BF16)
PTR = 0x7F0000000000


class CAI:
    def __init__(self, shape, typestr="<f2", strides=None, readonly=False, ptr=PTR,
                 device=None):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data":
                                         (ptr, readonly), "strides": strides, "version": 3}
        if device is not None:
            self.__dlpack_device__ = lambda: device


def test_cuda_array_interface_checks():
    v = _data.view(CAI((3, 2, 8)), CUDA0, "k", (None, 2, 8), "[n][h][d]")
    assert v.ptr == PTR and v.shape == (3, 2, 8)
    # compact strides given explicitly, and a size-1 dim with any stride
    v = _data.view(CAI((1, 2, 8), strides=(999, 16, 2)), CUDA0, "k", (None, 2, 8))
    assert v.shape == (1, 2, 8)
    with pytest.raises(TypeError, match=r"k: the cache dtype is f16, so "
                                        r"__cuda_array_interface__ typestr must be <f2; got '<f4'"):
        _data.view(CAI((3, 2, 8), "<f4"), CUDA0, "k", (None, 2, 8))
    with pytest.raises(ValueError, match=r"k: expected shape \(\*, 2, 8\) \[n\]\[h\]\[d\], "
                                         r"got \(3, 8, 2\)"):
        _data.view(CAI((3, 8, 2)), CUDA0, "k", (None, 2, 8), "[n][h][d]")
    with pytest.raises(ValueError, match=r"k: must be C-contiguous; got strides \(32, 2, 4\)"):
        _data.view(CAI((3, 2, 8), strides=(32, 2, 4)), CUDA0, "k", (None, 2, 8))
    with pytest.raises(ValueError, match="out: the output array is read-only"):
        _data.view(CAI((3, 2, 8), readonly=True), CUDA0, "out", (3, 2, 8), writable=True)
    # bf16 has no typestr: its bit patterns as <u2
    assert _data.view(CAI((2,), "<u2"), CUDA_BF16, "q", (2,)).ptr == PTR
    # When the object also says its device (cupy does), it is checked.
    with pytest.raises(ValueError, match=r"k: the cache computes on cuda:0, the array is on "
                                         r"DLPack device \(2, 1\)"):
        _data.view(CAI((3, 2, 8), device=(2, 1)), CUDA0, "k", (None, 2, 8))


def test_host_memory_is_refused_by_a_cuda_cache():
    with pytest.raises(TypeError, match="k: a numpy array is host memory, the cache computes "
                                        "on cuda:0"):
        _data.view(np.zeros((3, 2, 8), np.float16), CUDA0, "k", (None, 2, 8))
    with pytest.raises(TypeError, match="expected a torch tensor or an object with"):
        _data.view([1, 2], CUDA0, "k", (None,))


class _DLDevice(C.Structure):
    _fields_ = [("device_type", C.c_int32), ("device_id", C.c_int32)]


class _DLDataType(C.Structure):
    _fields_ = [("code", C.c_uint8), ("bits", C.c_uint8), ("lanes", C.c_uint16)]


class _DLManagedTensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("device", _DLDevice), ("ndim", C.c_int32),
                ("dtype", _DLDataType), ("shape", C.POINTER(C.c_int64)),
                ("strides", C.POINTER(C.c_int64)), ("byte_offset", C.c_uint64),
                ("manager_ctx", C.c_void_p), ("deleter", C.c_void_p)]


_capsule_new = C.pythonapi.PyCapsule_New
_capsule_new.restype = C.py_object
_capsule_new.argtypes = [C.c_void_p, C.c_char_p, C.c_void_p]


class FakeDLPack:
    """A DLPack producer of device memory (legacy "dltensor" capsules)."""

    def __init__(self, shape, code=2, bits=16, strides=None, device=(2, 0),
                 byte_offset=0):
        self.device = device
        self.shape = (C.c_int64 * len(shape))(*shape)
        self.strides = (C.c_int64 * len(shape))(*strides) if strides else None
        self.t = _DLManagedTensor(PTR, _DLDevice(*device), len(shape),
                                  _DLDataType(code, bits, 1), self.shape,
                                  self.strides, byte_offset, None, None)
        self.streams = []

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return _capsule_new(C.addressof(self.t), b"dltensor", None)


def test_dlpack_checks():
    x = FakeDLPack((4, 2, 8), byte_offset=64)
    v = _data.view(x, CUDA0, "q", (None, 2, 8), stream=0xABC)
    assert v.ptr == PTR + 64 and v.shape == (4, 2, 8)
    assert x.streams == [0xABC]  # the producer is told the consumer's stream
    _data.view(x, CUDA0, "q", (None, 2, 8), stream=None)
    assert x.streams[-1] == 1  # the legacy default stream, never 0
    with pytest.raises(TypeError, match=r"q: the cache dtype is f16, so the DLPack dtype "
                                        r"\(code, bits, lanes\) must be one of \[\(2, 16, 1\)\]; "
                                        r"got \(2, 32, 1\)"):
        _data.view(FakeDLPack((4, 2, 8), bits=32), CUDA0, "q", (None, 2, 8))
    with pytest.raises(ValueError, match=r"q: expected shape \(4, 2, 8\), got \(4, 2, 9\)"):
        _data.view(FakeDLPack((4, 2, 9)), CUDA0, "q", (4, 2, 8))
    with pytest.raises(ValueError, match=r"q: must be C-contiguous; got element strides "
                                         r"\(1, 4, 8\)"):
        _data.view(FakeDLPack((4, 2, 8), strides=(1, 4, 8)), CUDA0, "q", (None, 2, 8))
    assert _data.view(FakeDLPack((4, 2, 8), strides=(16, 8, 1)), CUDA0, "q",
                      (None, 2, 8)).ptr == PTR
    with pytest.raises(ValueError, match=r"the cache computes on cuda:0, the array is on "
                                         r"DLPack device \(2, 3\)"):
        _data.view(FakeDLPack((4, 2, 8), device=(2, 3)), CUDA0, "q", (None, 2, 8))
    with pytest.raises(ValueError, match=r"DLPack device \(1, 0\)"):
        _data.view(FakeDLPack((4, 2, 8), device=(1, 0)), CUDA0, "q", (None, 2, 8))
    # bf16: kDLBfloat, or uint16 bit patterns
    v = _data.view(FakeDLPack((2,), code=4, device=(2, 1)), CUDA_BF16, "q", (2,))
    assert v.ptr == PTR
    v = _data.view(FakeDLPack((2,), code=1, device=(2, 1)), CUDA_BF16, "q", (2,))
    assert v.ptr == PTR


def test_stream_resolution():
    cpu = _data.Target(Backend.CPU, 0, DType.F32)
    assert _data.stream_handle(cpu, 1234) is None  # the CPU ignores streams
    assert _data.stream_handle(CUDA0, 1234) == 1234
    assert _data.stream_handle(CUDA0, 0) is None

    class TorchLike:
        cuda_stream = 77

    class Protocol:
        def __cuda_stream__(self):
            return (0, 88)

    assert _data.stream_handle(CUDA0, TorchLike()) == 77
    assert _data.stream_handle(CUDA0, Protocol()) == 88
    with pytest.raises(TypeError, match="stream: expected an int cudaStream_t"):
        _data.stream_handle(CUDA0, "default")


def test_host_arrays():
    np.testing.assert_array_equal(_data.host_array([1, 2], np.uint32, "keep"), [1, 2])
    with pytest.raises(ValueError, match=r"keep: values must be in \[0, 4294967295\]"):
        _data.host_array([-1, 2], np.uint32, "keep")
    with pytest.raises(TypeError, match="keep: expected integers, got dtype float64"):
        _data.host_array([1.5], np.uint32, "keep")
    with pytest.raises(ValueError, match=r"keep: expected a 1-D array, got shape \(1, 2\)"):
        _data.host_array([[1, 2]], np.uint32, "keep")
