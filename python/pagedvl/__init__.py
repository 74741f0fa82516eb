"""pagedvl: Python bindings of libpagedvl, a paged, per-layer, compressible
KV cache for vision-language models (VL-Cache compression).

Thin and complete: the names follow the C API of include/pagedvl.h (the
reference for every behaviour), ctypes over its C ABI. A failing call raises
PagedVLError with .status (a Status) and the library's message, and changes
nothing, as in C.

    import numpy as np, pagedvl as pv
    with pv.Cache(backend="cpu", dtype="f32", num_layers=2, num_q_heads=4,
                  num_kv_heads=2, head_dim=8, block_size=4, num_blocks=64) as c:
        seq = c.seq_add(10, visual=[(2, 8)])
        ...

Data: numpy arrays on the CPU backend; torch tensors, __cuda_array_interface__
or DLPack objects on CUDA (see pagedvl._data for the exact rules).
"""
from ._lib import (Admit, Backend, DType, PagedVLError, PolicyKind, Split, Status,
                   status_string, version)
from ._lib import path as library_path
from ._data import BF16_NUMPY, numpy_dtype
from ._policy import (Policy, Rows, policy_budgets, policy_name, policy_parse,
                      policy_rows, policy_scores, policy_select)
from ._comm import COMM_ID_BYTES, Comm, comm_unique_id, run_ranks, split_range
from ._cache import (Cache, CacheConfig, CompressReport, Observation, Plan,
                     PlanInfo, SeqInfo, Stats, backend_available, dtype_size)

__version__ = version()

__all__ = [
    "Admit", "Backend", "BF16_NUMPY", "COMM_ID_BYTES", "Cache", "CacheConfig",
    "Comm", "CompressReport", "Split", "comm_unique_id", "run_ranks", "split_range",
    "DType", "Observation", "PagedVLError", "Plan", "PlanInfo", "Policy",
    "PolicyKind", "Rows", "SeqInfo", "Stats", "Status", "backend_available",
    "dtype_size", "library_path", "numpy_dtype", "policy_budgets",
    "policy_name", "policy_parse", "policy_rows", "policy_scores",
    "policy_select", "status_string", "version",
]
