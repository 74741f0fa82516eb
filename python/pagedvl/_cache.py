"""Cache and Plan: the C handles, their calls, and result dataclasses."""
from __future__ import annotations

import ctypes as C
import weakref
from dataclasses import dataclass, fields as dc_fields
from typing import List, Optional, Tuple

import numpy as np

from . import _data
from ._comm import Comm
from ._lib import (Admit, Backend, Closable, CompressReportStruct, Config, DType, PagedVLError,
                   PlanInfoStruct, SeqInfoStruct, Span, Split, StatsStruct, check_create,
                   lib)
from ._policy import Policy, Rows, _policy

_U32_MAX, _U64_MAX = 2**32 - 1, 2**64 - 1


_uint = _data.uint


def _ids(seqs, name="seqs"):
    if isinstance(seqs, (int, np.integer)) and not isinstance(seqs, bool):
        seqs = [seqs]
    a = _data.host_array(list(seqs) if not isinstance(seqs, np.ndarray) else seqs,
                         np.uint64, name)
    return a


def _from_struct(cls, s, **override):
    vals = {f.name: getattr(s, f.name) for f in dc_fields(cls) if f.name not in override}
    vals.update(override)
    return cls(**vals)


# ---------------------------------------------------------------------------
# Result dataclasses (the C structs, as Python values)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheConfig:
    """pvl_config of a created cache (backend resolved, num_blocks derived)."""

    backend: Backend
    device: int
    dtype: DType
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    memory_fraction: float
    max_seqs: int
    split: Split
    model_num_layers: int
    layer_begin: int
    model_num_kv_heads: int
    kv_head_begin: int


@dataclass(frozen=True)
class SeqInfo:
    """pvl_seq_info."""

    n_prompt: int
    n_decoded: int
    position: int
    n_visual_spans: int
    min_tokens: int
    max_tokens: int
    total_tokens: int
    total_blocks: int


@dataclass(frozen=True)
class Stats:
    """pvl_stats."""

    num_blocks: int
    free_blocks: int
    used_blocks: int
    shared_blocks: int
    num_seqs: int
    tokens: int
    block_bytes: int
    pool_bytes: int


@dataclass(frozen=True)
class PlanInfo:
    """pvl_plan_info."""

    n_seqs: int
    max_seqs: int
    block_capacity: int
    last_update_bytes: int
    last_update_entries: int
    full_rebuilds: int


@dataclass(frozen=True)
class Observation:
    """pvl_seq_observation: sparsity per query head (gamma), its mean
    (gamma_layer), raw per-key attention sums and how many rows saw each
    key, over n_keys keys and n_rows observed rows."""

    gamma: np.ndarray
    gamma_layer: float
    raw: np.ndarray
    seen: np.ndarray
    n_keys: int
    n_rows: int


@dataclass(frozen=True)
class CompressReport:
    """pvl_compress_report, with the per-layer arrays filled: budget (k_l),
    kept (prompt tokens kept per layer) and density (d_l; 1 except for
    VL-Cache). Block counts are over all layers: the sequence saved
    blocks_before - blocks_after; the pool's free count rose by
    blocks_freed - blocks_taken (the same unless blocks are shared with a
    fork)."""

    budget: np.ndarray
    kept: np.ndarray
    density: np.ndarray
    n_prompt: int
    window_first: int
    window_rows: int
    window_fallback: bool
    kept_total: int
    blocks_before: int
    blocks_after: int
    blocks_freed: int
    keep_ratio: float
    blocks_taken: int


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------

_CONFIG_FIELDS = [n for n, _ in Config._fields_ if n not in ("size", "allocator")]
_SPLITS = {"none": Split.NONE, "layers": Split.LAYERS, "heads": Split.HEADS}
_BACKENDS = {"cpu": Backend.CPU, "cuda": Backend.CUDA, "auto": Backend.AUTO}
_DTYPES = {"f32": DType.F32, "float32": DType.F32, "f16": DType.F16,
           "float16": DType.F16, "half": DType.F16, "bf16": DType.BF16,
           "bfloat16": DType.BF16}


def _enum_value(enum_cls, names, value, field):
    if isinstance(value, str):
        try:
            return names[value.lower()]
        except KeyError:
            raise ValueError(f"{field}: unknown name {value!r}; one of "
                             f"{sorted(names)}") from None
    if field == "dtype" and not isinstance(value, (int, np.integer)):
        # numpy / torch dtypes by name: float32, float16, bfloat16
        key = str(value).replace("torch.", "")
        if isinstance(value, (type, np.dtype)):
            try:
                key = np.dtype(value).name
            except TypeError:
                pass
        if key in names:
            return names[key]
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"{field}: {value!r} is not a {enum_cls.__name__}") from None


def backend_available(backend, device: int = 0) -> bool:
    """pvl_backend_available: whether caches of `backend` can be created."""
    out = C.c_int()
    be = _enum_value(Backend, _BACKENDS, backend, "backend")
    check_create(lib.pvl_backend_available(int(be), int(device), C.byref(out)))
    return bool(out.value)


def dtype_size(dtype) -> int:
    """pvl_dtype_size: bytes of one element."""
    return int(lib.pvl_dtype_size(int(_enum_value(DType, _DTYPES, dtype, "dtype"))))


class Cache(Closable):
    """A KV cache (pvl_cache). Keywords are the fields of pvl_config:
    backend ("cpu", "cuda", "auto" or a Backend), device, dtype ("f32",
    "f16", "bf16" or a DType), num_layers, num_q_heads, num_kv_heads,
    head_dim, block_size, num_blocks, memory_fraction, max_seqs; unset ones
    keep pvl_config_init's defaults; with several ranks also comm (a
    pagedvl.Comm), split ("layers", "heads" or a Split), model_num_layers,
    layer_begin, model_num_kv_heads, kv_head_begin. The allocator is the
    library's default (no Python allocator hook). Use as a context manager,
    or call close().

    Data arguments (K, V, Q, outputs) are numpy arrays on the CPU backend and
    torch tensors / __cuda_array_interface__ / DLPack objects on CUDA, in the
    cache dtype, C-contiguous, with the shapes the methods name. `stream`
    (CUDA only) defaults to torch's current stream when torch is imported.
    """

    def __init__(self, **config):
        self._h = None
        cfg = Config()
        check_create(lib.pvl_config_init(C.byref(cfg)))
        comm = None
        for key, value in config.items():
            if key == "allocator":
                raise TypeError("allocator: not available from Python (the cache "
                                "uses the library's default host allocator)")
            if key not in _CONFIG_FIELDS:
                raise TypeError(f"Cache: unknown config field {key!r}; fields: "
                                f"{_CONFIG_FIELDS}")
            if key == "comm":
                if value is not None and not isinstance(value, Comm):
                    raise TypeError(f"comm: expected a pagedvl.Comm or None, got "
                                    f"{type(value).__name__}")
                comm = value
                value = value._handle() if value is not None else None
            elif key == "split":
                value = int(_enum_value(Split, _SPLITS, value, key))
            elif key == "backend":
                value = int(_enum_value(Backend, _BACKENDS, value, key))
            elif key == "dtype":
                value = int(_enum_value(DType, _DTYPES, value, key))
            elif key == "memory_fraction":
                if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
                    raise TypeError(f"{key}: expected a number, got {value!r}")
                value = float(value)
            elif key == "device":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                        or not -2**31 <= int(value) < 2**31:
                    raise ValueError(f"device: expected an int32 ordinal, got {value!r}")
                value = int(value)
            else:
                value = _uint(value, key)
            setattr(cfg, key, value)
        handle = C.c_void_p()
        check_create(lib.pvl_cache_create(C.byref(cfg), C.byref(handle)))
        self._h = handle.value
        self._plans = weakref.WeakSet()
        self.comm = comm  # the C cache uses it until destroyed: keep it alive
        if comm is not None:
            comm._caches.add(self)
        out = Config()
        self._call(lib.pvl_cache_config, C.byref(out))
        self.config = CacheConfig(
            **{f.name: getattr(out, f.name) for f in dc_fields(CacheConfig)
               if f.name not in ("backend", "dtype", "split")},
            backend=Backend(out.backend), dtype=DType(out.dtype), split=Split(out.split))
        self._t = _data.Target(out.backend, out.device, out.dtype)

    # ---- lifetime -------------------------------------------------------

    def close(self):
        """pvl_cache_destroy: frees the cache, its sequences and its plans.
        The caller makes sure no device work of the cache is in flight.
        Idempotent."""
        h, self._h = getattr(self, "_h", None), None
        if h:
            for p in list(self._plans):
                p._h = None  # destroyed with the cache
            lib.pvl_cache_destroy(h)


    @property
    def closed(self) -> bool:
        return not self._h

    def __repr__(self):
        c = self.config
        state = "closed" if self.closed else "open"
        return (f"<pagedvl.Cache {state} {c.backend.name.lower()} "
                f"{c.dtype.name.lower()} L={c.num_layers} Hq={c.num_q_heads} "
                f"Hkv={c.num_kv_heads} d={c.head_dim} block={c.block_size} "
                f"blocks={c.num_blocks}>")

    # ---- plumbing -------------------------------------------------------

    def _handle(self):
        if not self._h:
            raise ValueError("the cache is closed")
        return self._h

    def _call(self, fn, *args):
        h = self._handle()
        st = fn(h, *args)
        if st != 0:
            raise PagedVLError(st, self.last_error)

    @property
    def last_error(self) -> str:
        """pvl_cache_last_error: message of the last failing call."""
        return lib.pvl_cache_last_error(self._h).decode(errors="replace")

    def _stream(self, stream):
        s = _data.stream_handle(self._t, stream)
        return C.c_void_p(s) if s else None

    def _layer(self, layer):
        return _uint(layer, "layer")

    # ---- sequences ------------------------------------------------------

    def seq_add(self, n_prompt: int, visual=()) -> int:
        """pvl_seq_add: admits a prompt of n_prompt tokens whose positions
        [begin, end) of each (begin, end) in `visual` are visual tokens.
        Returns the sequence id. OUT_OF_BLOCKS reserves nothing."""
        spans = [tuple(s) for s in visual]
        for s in spans:
            if len(s) != 2:
                raise ValueError(f"visual: expected (begin, end) pairs, got {s!r}")
        arr = (Span * max(len(spans), 1))()
        for i, (b, e) in enumerate(spans):
            arr[i].begin = _uint(b, "visual begin")
            arr[i].end = _uint(e, "visual end")
        out = C.c_uint64()
        self._call(lib.pvl_seq_add, _uint(n_prompt, "n_prompt"),
                   arr if spans else None, len(spans), C.byref(out))
        return out.value

    def seq_free(self, seq: int):
        """pvl_seq_free."""
        self._call(lib.pvl_seq_free, _uint(seq, "seq", _U64_MAX))

    def seq_fork(self, parent: int) -> int:
        """pvl_seq_fork: a child sharing every block; returns its id."""
        out = C.c_uint64()
        self._call(lib.pvl_seq_fork, _uint(parent, "parent", _U64_MAX), C.byref(out))
        return out.value

    def seq_append(self, seqs, stream=None):
        """pvl_seq_append: one new slot in every layer of each sequence (an
        id or a list of ids); all or nothing."""
        ids = _ids(seqs)
        self._call(lib.pvl_seq_append, _data.ptr(ids, C.c_uint64), ids.shape[0],
                   self._stream(stream))

    def seq_retain(self, seq: int, layer: int, keep, stream=None):
        """pvl_seq_retain: keeps the slots `keep` (strictly ascending) of
        one layer and compacts them into the fewest blocks."""
        k = _data.host_array(keep, np.uint32, "keep")
        self._call(lib.pvl_seq_retain, _uint(seq, "seq", _U64_MAX), self._layer(layer),
                   _data.ptr(k, C.c_uint32), k.shape[0], self._stream(stream))

    def seq_info(self, seq: int) -> SeqInfo:
        """pvl_seq_get_info."""
        s = SeqInfoStruct()
        self._call(lib.pvl_seq_get_info, _uint(seq, "seq", _U64_MAX), C.byref(s))
        return _from_struct(SeqInfo, s)

    def seq_layer_size(self, seq: int, layer: int) -> Tuple[int, int]:
        """pvl_seq_layer_size: (tokens, blocks) of one layer."""
        n_tokens, n_blocks = C.c_uint32(), C.c_uint32()
        self._call(lib.pvl_seq_layer_size, _uint(seq, "seq", _U64_MAX),
                   self._layer(layer), C.byref(n_tokens), C.byref(n_blocks))
        return n_tokens.value, n_blocks.value

    def seq_blocks(self, seq: int, layer: int) -> np.ndarray:
        """pvl_seq_blocks: block ids (int32) of one layer, in table order."""
        _, nb = self.seq_layer_size(seq, layer)
        ids = np.zeros(max(nb, 1), dtype=np.int32)
        n = C.c_uint32()
        self._call(lib.pvl_seq_blocks, int(seq), int(layer), _data.ptr(ids, C.c_int32),
                   nb, C.byref(n))
        return ids[: n.value].copy()

    def seq_positions(self, seq: int, layer: int) -> np.ndarray:
        """pvl_seq_positions: logical position (uint32) of every slot of
        one layer."""
        nt, _ = self.seq_layer_size(seq, layer)
        pos = np.zeros(max(nt, 1), dtype=np.uint32)
        n = C.c_uint32()
        self._call(lib.pvl_seq_positions, int(seq), int(layer),
                   _data.ptr(pos, C.c_uint32), nt, C.byref(n))
        return pos[: n.value].copy()

    def seq_visual_spans(self, seq: int) -> List[Tuple[int, int]]:
        """pvl_seq_visual_spans: the (begin, end) spans given at admission."""
        cap = self.seq_info(seq).n_visual_spans
        arr = (Span * max(cap, 1))()
        n = C.c_uint32()
        self._call(lib.pvl_seq_visual_spans, int(seq), arr, cap, C.byref(n))
        return [(arr[i].begin, arr[i].end) for i in range(n.value)]

    # ---- scheduler queries and statistics --------------------------------

    def can_add(self, n_prompt: int) -> Admit:
        """pvl_can_add: Admit.OK, LATER or NEVER."""
        out = C.c_int()
        self._call(lib.pvl_can_add, _uint(n_prompt, "n_prompt"), C.byref(out))
        return Admit(out.value)

    def blocks_for_prompt(self, n_prompt: int) -> int:
        """pvl_blocks_for_prompt."""
        out = C.c_uint64()
        self._call(lib.pvl_blocks_for_prompt, _uint(n_prompt, "n_prompt"), C.byref(out))
        return out.value

    def blocks_for_append(self, seqs) -> int:
        """pvl_blocks_for_append: free blocks the next append of `seqs` needs."""
        ids = _ids(seqs)
        out = C.c_uint64()
        self._call(lib.pvl_blocks_for_append, _data.ptr(ids, C.c_uint64), ids.shape[0],
                   C.byref(out))
        return out.value

    def stats(self) -> Stats:
        """pvl_cache_get_stats."""
        s = StatsStruct()
        self._call(lib.pvl_cache_get_stats, C.byref(s))
        return _from_struct(Stats, s)

    def layer_tokens(self) -> np.ndarray:
        """pvl_cache_layer_tokens: tokens held per layer (uint64[num_layers])."""
        out = np.zeros(self.config.num_layers, dtype=np.uint64)
        self._call(lib.pvl_cache_layer_tokens, _data.ptr(out, C.c_uint64), out.shape[0])
        return out

    # ---- K/V data -------------------------------------------------------

    def _kv_shape(self, n=None):
        return (n, self.config.num_kv_heads, self.config.head_dim)

    def _q_shape(self, n=None):
        return (n, self.config.num_q_heads, self.config.head_dim)

    def kv_write(self, seq: int, layer: int, first: int, k, v, stream=None):
        """pvl_kv_write: k and v [n][num_kv_heads][head_dim] into slots
        [first, first + n) of one layer."""
        s = _data.stream_handle(self._t, stream)
        kv = _data.view(k, self._t, "k", self._kv_shape(), "[n][num_kv_heads][head_dim]",
                        stream=s)
        vv = _data.view(v, self._t, "v", kv.shape, "(the shape of k)", stream=s)
        self._call(lib.pvl_kv_write, _uint(seq, "seq", _U64_MAX), self._layer(layer),
                   _uint(first, "first"), kv.shape[0], kv.ptr, vv.ptr,
                   C.c_void_p(s) if s else None)

    def kv_read(self, seq: int, layer: int, first: int, n: int, k=None, v=None,
                stream=None):
        """pvl_kv_read: slots [first, first + n) of one layer into k and v
        ([n][num_kv_heads][head_dim]; allocated when not given). Returns
        (k, v)."""
        n = _uint(n, "n")
        shape = self._kv_shape(n)
        if k is None:
            k = _data.empty(self._t, shape, like=v)
        if v is None:
            v = _data.empty(self._t, shape, like=k)
        s = _data.stream_handle(self._t, stream)
        kv = _data.view(k, self._t, "k", shape, "[n][num_kv_heads][head_dim]",
                        writable=True, stream=s)
        vv = _data.view(v, self._t, "v", shape, "[n][num_kv_heads][head_dim]",
                        writable=True, stream=s)
        self._call(lib.pvl_kv_read, _uint(seq, "seq", _U64_MAX), self._layer(layer),
                   _uint(first, "first"), n, kv.ptr, vv.ptr, C.c_void_p(s) if s else None)
        return k, v

    # ---- plans ----------------------------------------------------------

    def plan(self, max_seqs: int, block_capacity: int = 0) -> "Plan":
        """pvl_plan_create: a batch plan for up to max_seqs sequences."""
        return Plan(self, max_seqs, block_capacity)

    # ---- compression ----------------------------------------------------

    def policy_rows(self, policy: Policy, seq: int) -> Rows:
        """pvl_policy_rows: the prompt query rows the policy observes."""
        policy = _policy(policy)
        first, n, fb = C.c_uint32(), C.c_uint32(), C.c_uint32()
        st = lib.pvl_policy_rows(policy._ref(), self._handle(), _uint(seq, "seq", _U64_MAX),
                                 C.byref(first), C.byref(n), C.byref(fb))
        if st != 0:
            raise PagedVLError(st, self.last_error)
        return Rows(first.value, n.value, bool(fb.value))

    def observe(self, seq: int, layer: int, q, first_pos: int, threshold=0.01,
                scale: float = 0.0, stream=None):
        """pvl_observe: query rows q [n_rows][num_q_heads][head_dim] (after
        RoPE) of logical positions first_pos.. of one layer. `threshold` is
        the policy's p (or a Policy, whose threshold is used); scale 0 =
        1/sqrt(head_dim)."""
        if isinstance(threshold, Policy):
            threshold = threshold.threshold
        s = _data.stream_handle(self._t, stream)
        qv = _data.view(q, self._t, "q", self._q_shape(),
                        "[n_rows][num_q_heads][head_dim]", stream=s)
        self._call(lib.pvl_observe, _uint(seq, "seq", _U64_MAX), self._layer(layer),
                   qv.ptr, _uint(first_pos, "first_pos"), qv.shape[0], float(threshold),
                   float(scale), C.c_void_p(s) if s else None)

    def seq_observation(self, seq: int, layer: int) -> Observation:
        """pvl_seq_observation: what the layer's observation holds."""
        seq, layer = _uint(seq, "seq", _U64_MAX), self._layer(layer)
        n_keys, n_rows, gl = C.c_uint32(), C.c_uint32(), C.c_float()
        gamma = np.zeros(self.config.num_q_heads, dtype=np.float32)
        self._call(lib.pvl_seq_observation, seq, layer, _data.ptr(gamma, C.c_float),
                   C.byref(gl), None, None, 0, C.byref(n_keys), C.byref(n_rows))
        raw = np.zeros(max(n_keys.value, 1), dtype=np.float32)
        seen = np.zeros(max(n_keys.value, 1), dtype=np.uint32)
        self._call(lib.pvl_seq_observation, seq, layer, None, None,
                   _data.ptr(raw, C.c_float), _data.ptr(seen, C.c_uint32),
                   n_keys.value, C.byref(n_keys), C.byref(n_rows))
        k = n_keys.value
        return Observation(gamma, float(gl.value), raw[:k].copy(), seen[:k].copy(), k,
                           n_rows.value)

    def compress(self, seq: int, policy: Policy, stream=None) -> CompressReport:
        """pvl_compress: budgets, selection and compaction of every layer of
        the sequence's prompt. All layers or none."""
        policy = _policy(policy)
        L = self.config.num_layers
        budget = np.zeros(L, dtype=np.uint32)
        kept = np.zeros(L, dtype=np.uint32)
        density = np.zeros(L, dtype=np.float32)
        rep = CompressReportStruct()
        rep.budget = _data.ptr(budget, C.c_uint32)
        rep.kept = _data.ptr(kept, C.c_uint32)
        rep.density = _data.ptr(density, C.c_float)
        self._call(lib.pvl_compress, _uint(seq, "seq", _U64_MAX), policy._ref(),
                   C.byref(rep), self._stream(stream))
        return _from_struct(CompressReport, rep, budget=budget, kept=kept,
                            density=density, window_fallback=bool(rep.window_fallback))

    def decode_cap(self, seq: int, layer: int, policy: Policy, stream=None) -> bool:
        """pvl_decode_cap: True if the layer was recompressed to its cap."""
        policy = _policy(policy)
        did = C.c_uint32()
        self._call(lib.pvl_decode_cap, _uint(seq, "seq", _U64_MAX), self._layer(layer),
                   policy._ref(), C.byref(did), self._stream(stream))
        return bool(did.value)


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------


class Plan(Closable):
    """A batch plan (pvl_plan) of a cache: build it after each append (or
    retain, compress, fork), then kv_write and attention_decode per layer.
    Destroyed by close(), at exit of a with block, or with its cache."""

    def __init__(self, cache: Cache, max_seqs: int, block_capacity: int = 0):
        if not isinstance(cache, Cache):
            raise TypeError(f"cache: expected a pagedvl.Cache, got {type(cache).__name__}")
        self._h = None
        self.cache = cache
        out = C.c_void_p()
        cache._call(lib.pvl_plan_create, _uint(max_seqs, "max_seqs"),
                    _uint(block_capacity, "block_capacity", _U64_MAX), C.byref(out))
        self._h = out.value
        cache._plans.add(self)

    def close(self):
        """pvl_plan_destroy. Idempotent; a no-op once the cache is closed."""
        h, self._h = self._h, None
        if h and not self.cache.closed:
            lib.pvl_plan_destroy(h)


    @property
    def closed(self) -> bool:
        return not self._h

    def _handle(self):
        if not self._h:
            raise ValueError("the plan is closed" if not self.cache.closed
                             else "the plan's cache is closed")
        return self._h

    def _call(self, fn, *args):
        st = fn(self._handle(), *args)
        if st != 0:
            raise PagedVLError(st, self.cache.last_error)

    def build(self, seqs, stream=None):
        """pvl_plan_build: points the plan at `seqs` (row i = seqs[i])."""
        ids = _ids(seqs)
        self._call(lib.pvl_plan_build, _data.ptr(ids, C.c_uint64), ids.shape[0],
                   self.cache._stream(stream))

    def info(self) -> PlanInfo:
        """pvl_plan_get_info."""
        s = PlanInfoStruct()
        self._call(lib.pvl_plan_get_info, C.byref(s))
        return _from_struct(PlanInfo, s)

    def _rows(self):
        # Rows of the last build. With none (never built, or an empty batch)
        # the library reads no data: it refuses a never-built plan with
        # BAD_STATE, so any first extent is let through to it.
        n = self.info().n_seqs
        return n if n else None

    def kv_write(self, layer: int, k, v, stream=None):
        """pvl_plan_kv_write: the newest token of every row, k and v
        [n_seqs][num_kv_heads][head_dim], into the slot the last append made."""
        c, t = self.cache, self.cache._t
        s = _data.stream_handle(t, stream)
        shape = c._kv_shape(self._rows())
        kv = _data.view(k, t, "k", shape, "[n_seqs][num_kv_heads][head_dim]", stream=s)
        vv = _data.view(v, t, "v", kv.shape, "(the shape of k)", stream=s)
        self._call(lib.pvl_plan_kv_write, _uint(layer, "layer"), kv.ptr, vv.ptr,
                   C.c_void_p(s) if s else None)

    def attention_decode(self, layer: int, q, out=None, scale: float = 0.0,
                         stream=None):
        """pvl_attention_decode: softmax(q K^T * scale) V of every row over
        the layer's slots. q and out are [n_seqs][num_q_heads][head_dim]
        (out allocated like q when not given); scale 0 = 1/sqrt(head_dim).
        Returns out."""
        c, t = self.cache, self.cache._t
        s = _data.stream_handle(t, stream)
        qv = _data.view(q, t, "q", c._q_shape(self._rows()),
                        "[n_seqs][num_q_heads][head_dim]", stream=s)
        if out is None:
            out = _data.empty(t, qv.shape, like=q)
        ov = _data.view(out, t, "out", qv.shape, "(the shape of q)", writable=True,
                        stream=s)
        self._call(lib.pvl_attention_decode, _uint(layer, "layer"), qv.ptr, ov.ptr,
                   float(scale), C.c_void_p(s) if s else None)
        return out
