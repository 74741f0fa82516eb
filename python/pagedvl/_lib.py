"""The C library: loading, the struct layouts, the function prototypes.

Everything that must agree with include/pagedvl.h is declared here and only
here: the structs (ctypes), the enums (IntEnum) and the argument types of
every pvl_* function. At import the struct layouts are compared with the
loaded library's own (pvl_abi_layout), so a header change that the
declarations below do not follow fails loudly as an ImportError instead of
corrupting memory.

Where the library comes from, first match wins:
  1. $PAGEDVL_LIBRARY, a path to libpagedvl.so (development builds);
  2. libpagedvl.so inside the package (what `pip install .` puts there; in a
     scikit-build-core editable install the package's __path__ includes the
     CMake install directory, so the same lookup finds it).
"""
from __future__ import annotations

import ctypes as C
import enum
import os
import sys

# ---------------------------------------------------------------------------
# Enums (values of the C enums)
# ---------------------------------------------------------------------------


class Status(enum.IntEnum):
    """pvl_status."""

    SUCCESS = 0
    INVALID_ARGUMENT = 1
    NO_MEMORY = 2
    OUT_OF_BLOCKS = 3
    UNKNOWN_SEQUENCE = 4
    UNSUPPORTED = 5
    CAPACITY = 6
    BAD_STATE = 7
    NO_DEVICE = 8
    CUDA = 9
    NCCL = 10
    INTERNAL = 11


class Backend(enum.IntEnum):
    """pvl_backend."""

    CPU = 0
    CUDA = 1
    AUTO = 2


class DType(enum.IntEnum):
    """pvl_dtype."""

    F32 = 0
    F16 = 1
    BF16 = 2


class Split(enum.IntEnum):
    """pvl_split: how a model's cache is spread over the ranks of a comm."""

    NONE = 0
    LAYERS = 1
    HEADS = 2


class Admit(enum.IntEnum):
    """pvl_admit: the answer of Cache.can_add."""

    OK = 0
    LATER = 1
    NEVER = 2


class PolicyKind(enum.IntEnum):
    """pvl_policy_kind."""

    FULL = 0
    STREAMING = 1
    H2O = 2
    SNAPKV = 3
    PYRAMIDKV = 4
    VLCACHE = 5


# ---------------------------------------------------------------------------
# Structs, in the order of the header. C enums are int-sized (checked at
# import through pvl_abi_layout like the structs).
# ---------------------------------------------------------------------------

_enum = C.c_int


class Allocator(C.Structure):
    _fields_ = [("alloc", C.c_void_p), ("free", C.c_void_p), ("ctx", C.c_void_p)]


class Config(C.Structure):
    _fields_ = [
        ("size", C.c_size_t),
        ("backend", _enum),
        ("device", C.c_int32),
        ("dtype", _enum),
        ("num_layers", C.c_uint32),
        ("num_q_heads", C.c_uint32),
        ("num_kv_heads", C.c_uint32),
        ("head_dim", C.c_uint32),
        ("block_size", C.c_uint32),
        ("num_blocks", C.c_uint32),
        ("memory_fraction", C.c_float),
        ("max_seqs", C.c_uint32),
        ("allocator", C.c_void_p),
        ("comm", C.c_void_p),
        ("split", _enum),
        ("model_num_layers", C.c_uint32),
        ("layer_begin", C.c_uint32),
        ("model_num_kv_heads", C.c_uint32),
        ("kv_head_begin", C.c_uint32),
    ]


class Span(C.Structure):
    _fields_ = [("begin", C.c_uint32), ("end", C.c_uint32)]


class SeqInfoStruct(C.Structure):
    _fields_ = [
        ("n_prompt", C.c_uint32),
        ("n_decoded", C.c_uint32),
        ("position", C.c_uint32),
        ("n_visual_spans", C.c_uint32),
        ("min_tokens", C.c_uint32),
        ("max_tokens", C.c_uint32),
        ("total_tokens", C.c_uint64),
        ("total_blocks", C.c_uint64),
    ]


class StatsStruct(C.Structure):
    _fields_ = [
        ("num_blocks", C.c_uint32),
        ("free_blocks", C.c_uint32),
        ("used_blocks", C.c_uint32),
        ("shared_blocks", C.c_uint32),
        ("num_seqs", C.c_uint32),
        ("tokens", C.c_uint64),
        ("block_bytes", C.c_uint64),
        ("pool_bytes", C.c_uint64),
    ]


class PlanInfoStruct(C.Structure):
    _fields_ = [
        ("n_seqs", C.c_uint32),
        ("max_seqs", C.c_uint32),
        ("block_capacity", C.c_uint64),
        ("last_update_bytes", C.c_uint64),
        ("last_update_entries", C.c_uint64),
        ("full_rebuilds", C.c_uint64),
    ]


class PolicyStruct(C.Structure):
    _fields_ = [
        ("size", C.c_size_t),
        ("kind", _enum),
        ("keep_ratio", C.c_float),
        ("threshold", C.c_float),
        ("min_layer_ratio", C.c_float),
        ("recent_ratio", C.c_float),
        ("window_cap", C.c_uint32),
        ("fallback_window", C.c_uint32),
        ("renormalize", C.c_uint32),
        ("sink_tokens", C.c_uint32),
        ("snap_window", C.c_uint32),
        ("pool_kernel", C.c_uint32),
        ("pyramid_beta", C.c_float),
        ("decode_cap", C.c_uint32),
        ("decode_cap_slack", C.c_uint32),
    ]


class CompressReportStruct(C.Structure):
    _fields_ = [
        ("budget", C.POINTER(C.c_uint32)),
        ("kept", C.POINTER(C.c_uint32)),
        ("density", C.POINTER(C.c_float)),
        ("n_prompt", C.c_uint32),
        ("window_first", C.c_uint32),
        ("window_rows", C.c_uint32),
        ("window_fallback", C.c_uint32),
        ("kept_total", C.c_uint64),
        ("blocks_before", C.c_uint32),
        ("blocks_after", C.c_uint32),
        ("blocks_freed", C.c_uint32),
        ("keep_ratio", C.c_double),
        ("blocks_taken", C.c_uint32),
    ]


# C type name -> ctypes declaration, for the layout check.
STRUCTS = {
    "pvl_allocator": Allocator,
    "pvl_config": Config,
    "pvl_span": Span,
    "pvl_seq_info": SeqInfoStruct,
    "pvl_stats": StatsStruct,
    "pvl_plan_info": PlanInfoStruct,
    "pvl_policy": PolicyStruct,
    "pvl_compress_report": CompressReportStruct,
}
# C enum name -> (IntEnum, prefix of its constants in the header).
ENUMS = {
    "pvl_status": (Status, "PVL_ERR_"),
    "pvl_backend": (Backend, "PVL_BACKEND_"),
    "pvl_dtype": (DType, "PVL_DTYPE_"),
    "pvl_admit": (Admit, "PVL_ADMIT_"),
    "pvl_policy_kind": (PolicyKind, "PVL_POLICY_"),
    "pvl_split": (Split, "PVL_SPLIT_"),
}
SCALARS = dict({name: _enum for name in ENUMS}, pvl_seq_id=C.c_uint64)

# ---------------------------------------------------------------------------
# Prototypes of every function of include/pagedvl.h: name -> (restype,
# argtypes). Status-returning functions return c_int (pvl_status).
# ---------------------------------------------------------------------------

_P = C.POINTER
_st, _vp, _u32, _u64, _i32 = C.c_int, C.c_void_p, C.c_uint32, C.c_uint64, C.c_int32
_f32, _sz, _str = C.c_float, C.c_size_t, C.c_char_p

PROTOTYPES = {
    "pvl_status_string": (_str, [_st]),
    "pvl_version": (_u32, []),
    "pvl_abi_layout": (_st, [_str, _str, _P(_sz), _P(_sz)]),
    "pvl_dtype_size": (_sz, [_enum]),
    "pvl_backend_available": (_st, [_enum, _i32, _P(C.c_int)]),
    "pvl_comm_unique_id": (_st, [_vp]),
    "pvl_comm_create_nccl": (_st, [_vp, _i32, _i32, _i32, _P(_vp)]),
    "pvl_comm_adopt_nccl": (_st, [_vp, _i32, _P(_vp)]),
    "pvl_comm_create_local": (_st, [_u32, _P(_vp)]),
    "pvl_comm_rank": (_st, [_vp, _P(_i32)]),
    "pvl_comm_size": (_st, [_vp, _P(_i32)]),
    "pvl_comm_destroy": (_st, [_vp]),
    "pvl_run_ranks": (_st, [_u32, C.CFUNCTYPE(_st, _vp, _u32), _vp, _P(_st)]),
    "pvl_split_range": (_st, [_u32, _u32, _u32, _P(_u32), _P(_u32)]),
    "pvl_config_init": (_st, [_P(Config)]),
    "pvl_cache_create": (_st, [_P(Config), _P(_vp)]),
    "pvl_cache_destroy": (_st, [_vp]),
    "pvl_cache_config": (_st, [_vp, _P(Config)]),
    "pvl_cache_last_error": (_str, [_vp]),
    "pvl_create_last_error": (_str, []),
    "pvl_seq_add": (_st, [_vp, _u32, _P(Span), _u32, _P(_u64)]),
    "pvl_seq_free": (_st, [_vp, _u64]),
    "pvl_seq_fork": (_st, [_vp, _u64, _P(_u64)]),
    "pvl_seq_append": (_st, [_vp, _P(_u64), _u32, _vp]),
    "pvl_seq_retain": (_st, [_vp, _u64, _u32, _P(_u32), _u32, _vp]),
    "pvl_seq_get_info": (_st, [_vp, _u64, _P(SeqInfoStruct)]),
    "pvl_seq_layer_size": (_st, [_vp, _u64, _u32, _P(_u32), _P(_u32)]),
    "pvl_seq_blocks": (_st, [_vp, _u64, _u32, _P(_i32), _u32, _P(_u32)]),
    "pvl_seq_positions": (_st, [_vp, _u64, _u32, _P(_u32), _u32, _P(_u32)]),
    "pvl_seq_visual_spans": (_st, [_vp, _u64, _P(Span), _u32, _P(_u32)]),
    "pvl_can_add": (_st, [_vp, _u32, _P(_enum)]),
    "pvl_blocks_for_prompt": (_st, [_vp, _u32, _P(_u64)]),
    "pvl_blocks_for_append": (_st, [_vp, _P(_u64), _u32, _P(_u64)]),
    "pvl_cache_get_stats": (_st, [_vp, _P(StatsStruct)]),
    "pvl_cache_layer_tokens": (_st, [_vp, _P(_u64), _u32]),
    "pvl_kv_write": (_st, [_vp, _u64, _u32, _u32, _u32, _vp, _vp, _vp]),
    "pvl_kv_read": (_st, [_vp, _u64, _u32, _u32, _u32, _vp, _vp, _vp]),
    "pvl_plan_create": (_st, [_vp, _u32, _u64, _P(_vp)]),
    "pvl_plan_destroy": (_st, [_vp]),
    "pvl_plan_build": (_st, [_vp, _P(_u64), _u32, _vp]),
    "pvl_plan_get_info": (_st, [_vp, _P(PlanInfoStruct)]),
    "pvl_plan_kv_write": (_st, [_vp, _u32, _vp, _vp, _vp]),
    "pvl_attention_decode": (_st, [_vp, _u32, _vp, _vp, _f32, _vp]),
    "pvl_policy_init": (_st, [_P(PolicyStruct), _enum]),
    "pvl_policy_name": (_str, [_enum]),
    "pvl_policy_parse": (_st, [_str, _P(_enum)]),
    "pvl_policy_budgets": (_st, [_P(PolicyStruct), _u32, _u32, _P(_f32), _P(_u32)]),
    "pvl_policy_scores": (_st, [_P(PolicyStruct), _u32, _P(_f32), _P(_u32), _u32,
                                _P(_f32)]),
    "pvl_policy_select": (_st, [_P(PolicyStruct), _u32, _u32, _P(_f32), _P(_u32),
                                _P(_u32)]),
    "pvl_policy_rows": (_st, [_P(PolicyStruct), _vp, _u64, _P(_u32), _P(_u32),
                              _P(_u32)]),
    "pvl_observe": (_st, [_vp, _u64, _u32, _vp, _u32, _u32, _f32, _f32, _vp]),
    "pvl_seq_observation": (_st, [_vp, _u64, _u32, _P(_f32), _P(_f32), _P(_f32),
                                  _P(_u32), _u32, _P(_u32), _P(_u32)]),
    "pvl_compress": (_st, [_vp, _u64, _P(PolicyStruct), _P(CompressReportStruct),
                           _vp]),
    "pvl_decode_cap": (_st, [_vp, _u64, _u32, _P(PolicyStruct), _P(_u32), _vp]),
}


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class PagedVLError(Exception):
    """A libpagedvl call failed. `status` is a Status; `message` the
    library's own explanation (pvl_cache_last_error or
    pvl_create_last_error): the function, what was wrong, the values."""

    def __init__(self, status, message: str):
        try:
            status = Status(status)
        except ValueError:
            pass
        self.status = status
        self.message = message
        name = status.name if isinstance(status, Status) else str(int(status))
        super().__init__(f"PVL_ERR_{name}: {message}" if status else message)


# ---------------------------------------------------------------------------
# Loading and checking
# ---------------------------------------------------------------------------


class Closable:
    """A handle with close(): a context manager, and closed when collected.
    close() must be idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass


def _candidates():
    env = os.environ.get("PAGEDVL_LIBRARY")
    if env:
        return [env], True
    pkg = sys.modules.get(__package__)
    dirs = list(getattr(pkg, "__path__", [])) or [os.path.dirname(__file__)]
    return [os.path.join(d, "libpagedvl.so") for d in dirs], False


def _load():
    paths, from_env = _candidates()
    tried = []
    for path in paths:
        if not os.path.exists(path):
            tried.append(f"{path} (absent)")
            continue
        try:
            return C.CDLL(os.path.abspath(path)), path
        except OSError as e:
            hint = ""
            if "static TLS" in str(e):
                hint = (" (this build links jemalloc with initial-exec TLS and "
                        "cannot be dlopen()ed: rebuild it with -DPVL_JEMALLOC "
                        "set to a dlopen-safe mode or OFF)")
            raise ImportError(f"pagedvl: cannot load {path}: {e}{hint}") from e
    where = "$PAGEDVL_LIBRARY" if from_env else "the package"
    raise ImportError(
        f"pagedvl: libpagedvl.so not found in {where}: tried "
        + ", ".join(tried)
        + ". Install the package with `pip install .` from the repository "
        "root, or set PAGEDVL_LIBRARY=/path/to/libpagedvl.so")


def _declare(lib, prototypes):
    missing = []
    for name, (res, args) in prototypes.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            missing.append(name)
            continue
        fn.restype = res
        fn.argtypes = args
    if missing:
        raise ImportError(
            "pagedvl: the loaded libpagedvl does not export " + ", ".join(missing)
            + " (a library older or newer than this package)")


def layout_mismatches(lib, structs=None, scalars=None):
    """Differences between the ctypes declarations and the library's layout
    (pvl_abi_layout), as readable lines; [] when they agree."""
    structs = STRUCTS if structs is None else structs
    scalars = SCALARS if scalars is None else scalars
    out = []
    size, off = C.c_size_t(), C.c_size_t()

    def ask(tname, field):
        st = lib.pvl_abi_layout(tname.encode(), field.encode() if field else None,
                                C.byref(size), C.byref(off))
        if st != 0:
            return None, lib.pvl_create_last_error().decode(errors="replace")
        return (size.value, off.value), None

    for tname, ctype in scalars.items():
        got, err = ask(tname, None)
        if err:
            out.append(f"{tname}: {err}")
        elif got[0] != C.sizeof(ctype):
            out.append(f"{tname}: sizeof is {got[0]} in the library, "
                       f"{C.sizeof(ctype)} in pagedvl._lib")
    for tname, cls in structs.items():
        got, err = ask(tname, None)
        if err:
            out.append(f"{tname}: {err}")
            continue
        if got[0] != C.sizeof(cls):
            out.append(f"{tname}: sizeof is {got[0]} in the library, "
                       f"{C.sizeof(cls)} in pagedvl._lib ({cls.__name__})")
        for fname, _ in cls._fields_:
            got, err = ask(tname, fname)
            desc = getattr(cls, fname)
            if err:
                out.append(f"{tname}.{fname}: {err}")
            elif got != (desc.size, desc.offset):
                out.append(f"{tname}.{fname}: size {got[0]} at offset {got[1]} "
                           f"in the library, size {desc.size} at offset "
                           f"{desc.offset} in pagedvl._lib")
    return out


def check_layouts(lib, path, structs=None, scalars=None):
    bad = layout_mismatches(lib, structs, scalars)
    if bad:
        raise ImportError(
            f"pagedvl: the struct declarations of pagedvl/_lib.py do not match "
            f"the library {path}; update them to include/pagedvl.h:\n  "
            + "\n  ".join(bad))


lib, path = _load()
if not hasattr(lib, "pvl_abi_layout"):
    raise ImportError(f"pagedvl: {path} has no pvl_abi_layout: a library "
                      "older than this package")
_declare(lib, {"pvl_abi_layout": PROTOTYPES["pvl_abi_layout"],
               "pvl_create_last_error": PROTOTYPES["pvl_create_last_error"]})
check_layouts(lib, path)
_declare(lib, PROTOTYPES)


def version() -> str:
    """Version of the loaded library, "major.minor.patch"."""
    v = lib.pvl_version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def status_string(status) -> str:
    """pvl_status_string: "PVL_ERR_...: description"."""
    return lib.pvl_status_string(int(status)).decode()


def create_error(status):
    """A PagedVLError carrying pvl_create_last_error()."""
    return PagedVLError(status, lib.pvl_create_last_error().decode(errors="replace"))


def check_create(status):
    if status != 0:
        raise create_error(status)
