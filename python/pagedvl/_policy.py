"""Compression policies (pvl_policy) and the pure policy functions."""
from __future__ import annotations

import ctypes as C
from typing import NamedTuple, Optional

import numpy as np

from . import _data
from ._lib import PolicyKind, PolicyStruct, check_create, lib

_U32_MAX = 2**32 - 1
_FLOAT_FIELDS = {n for n, t in PolicyStruct._fields_ if t is C.c_float}
_FIELDS = [n for n, _ in PolicyStruct._fields_ if n not in ("size", "kind")]
_ALIASES = {"keep": "keep_ratio"}


def policy_kind(kind) -> PolicyKind:
    """A PolicyKind from a PolicyKind, its int value or its name ("vlcache")."""
    if isinstance(kind, str):
        return policy_parse(kind)
    try:
        return PolicyKind(kind)
    except ValueError:
        raise ValueError(f"unknown policy kind {kind!r}; one of "
                         f"{[k.name.lower() for k in PolicyKind]}") from None


def policy_name(kind) -> str:
    """pvl_policy_name: "vlcache", "h2o", ..."""
    name = lib.pvl_policy_name(int(PolicyKind(kind)))
    return name.decode()


def policy_parse(name: str) -> PolicyKind:
    """pvl_policy_parse: the kind of a policy name."""
    out = C.c_int()
    check_create(lib.pvl_policy_parse(str(name).encode(), C.byref(out)))
    return PolicyKind(out.value)


def _set_field(struct, name, value):
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"Policy.{name}: expected a number, got {value!r}")
        setattr(struct, name, float(value))
    else:
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, np.integer)):
            raise TypeError(f"Policy.{name}: expected an integer, got {value!r}")
        if not 0 <= int(value) <= _U32_MAX:
            raise ValueError(f"Policy.{name}: must be in [0, {_U32_MAX}], got {value}")
        setattr(struct, name, int(value))


class Policy:
    """A compression policy: pvl_policy_init(kind) defaults, then the fields
    given as keywords (the names of pvl_policy's fields; `keep` is short
    for keep_ratio). Values are checked by the library when used
    (PagedVLError INVALID_ARGUMENT), as in C.

    >>> Policy.vlcache(keep=0.1).keep_ratio
    0.1
    """

    __slots__ = ("_s",)

    def __init__(self, kind="vlcache", **fields):
        s = PolicyStruct()
        check_create(lib.pvl_policy_init(C.byref(s), int(policy_kind(kind))))
        object.__setattr__(self, "_s", s)
        for k, v in fields.items():
            setattr(self, k, v)

    # The policies of pvl_policy_kind, with their C defaults.
    @classmethod
    def full(cls, **fields):
        return cls(PolicyKind.FULL, **fields)

    @classmethod
    def streaming(cls, **fields):
        return cls(PolicyKind.STREAMING, **fields)

    @classmethod
    def h2o(cls, **fields):
        return cls(PolicyKind.H2O, **fields)

    @classmethod
    def snapkv(cls, **fields):
        return cls(PolicyKind.SNAPKV, **fields)

    @classmethod
    def pyramidkv(cls, **fields):
        return cls(PolicyKind.PYRAMIDKV, **fields)

    @classmethod
    def vlcache(cls, keep=0.1, **fields):
        """VL-Cache (the paper's setup: keep 10 %, p = 0.01, clip 0.01,
        recent 10 %)."""
        return cls(PolicyKind.VLCACHE, keep_ratio=keep, **fields)

    @property
    def kind(self) -> PolicyKind:
        return PolicyKind(self._s.kind)

    @property
    def name(self) -> str:
        return policy_name(self._s.kind)

    def __getattr__(self, name):
        name = _ALIASES.get(name, name)
        if name in _FIELDS:
            v = getattr(self._s, name)
            # float fields: the shortest decimal that is the same float32
            return float(f"{v:.7g}") if name in _FLOAT_FIELDS else v
        raise AttributeError(f"Policy has no field {name!r}; fields: {_FIELDS}")

    def __setattr__(self, name, value):
        name = _ALIASES.get(name, name)
        if name not in _FIELDS:
            raise AttributeError(f"Policy has no field {name!r}; fields: {_FIELDS}")
        _set_field(self._s, name, value)

    def to_dict(self):
        return {"kind": self.name, **{n: getattr(self, n) for n in _FIELDS}}

    def __eq__(self, other):
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()

    def __repr__(self):
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in _FIELDS)
        return f"Policy.{self.name}({fields})"

    def _ref(self):
        return C.byref(self._s)


def _policy(p) -> Policy:
    if not isinstance(p, Policy):
        raise TypeError(f"policy: expected a pagedvl.Policy, got {type(p).__name__}")
    return p


def policy_budgets(policy: Policy, num_layers: int, m: int, density=None) -> np.ndarray:
    """pvl_policy_budgets: k_l for every layer (uint32[num_layers]) for a
    prompt of m tokens. `density` (d_l, num_layers floats) is read by
    VL-Cache only."""
    policy = _policy(policy)
    num_layers = int(num_layers)
    d = None
    if density is not None:
        d = _data.host_array(density, np.float32, "density")
        if d.shape != (num_layers,):
            raise ValueError(f"density: expected shape ({num_layers},) (one per "
                             f"layer), got {d.shape}")
    out = np.zeros(max(num_layers, 0), dtype=np.uint32)
    check_create(lib.pvl_policy_budgets(policy._ref(), num_layers, int(m),
                                        _data.ptr(d, C.c_float),
                                        _data.ptr(out, C.c_uint32)))
    return out


def policy_scores(policy: Policy, raw, seen, n_rows: int) -> np.ndarray:
    """pvl_policy_scores: ranking scores (float32[m]) from the raw per-key
    attention sums raw[m] and the rows that saw each key seen[m]."""
    policy = _policy(policy)
    r = _data.host_array(raw, np.float32, "raw")
    s = _data.host_array(seen, np.uint32, "seen")
    if s.shape != r.shape:
        raise ValueError(f"seen: expected shape {r.shape} (as raw), got {s.shape}")
    out = np.zeros(r.shape, dtype=np.float32)
    check_create(lib.pvl_policy_scores(policy._ref(), r.shape[0], _data.ptr(r, C.c_float),
                                       _data.ptr(s, C.c_uint32), int(n_rows),
                                       _data.ptr(out, C.c_float)))
    return out


def policy_select(policy: Policy, budget: int, scores=None, m: Optional[int] = None) -> np.ndarray:
    """pvl_policy_select: the kept positions (uint32, ascending) of m
    candidates. m = len(scores) when scores are given (full and streaming
    need none: then give m)."""
    policy = _policy(policy)
    sc = None
    if scores is not None:
        sc = _data.host_array(scores, np.float32, "scores")
        if m is not None and int(m) != sc.shape[0]:
            raise ValueError(f"m: {m} differs from len(scores) = {sc.shape[0]}")
        m = sc.shape[0]
    elif m is None:
        raise TypeError("policy_select: give scores, or m for full/streaming")
    m = int(m)
    keep = np.zeros(max(m, 1), dtype=np.uint32)
    n = C.c_uint32()
    check_create(lib.pvl_policy_select(policy._ref(), m, int(budget),
                                       _data.ptr(sc, C.c_float),
                                       _data.ptr(keep, C.c_uint32), C.byref(n)))
    return keep[: n.value].copy()


class Rows(NamedTuple):
    """pvl_policy_rows: the prompt query rows [first, first + n) a policy
    observes; fallback: no post-vision window (VL-Cache used the last
    fallback_window tokens)."""

    first: int
    n: int
    fallback: bool


def policy_rows(policy: Policy, cache, seq: int) -> Rows:
    """pvl_policy_rows for a sequence of `cache`."""
    return cache.policy_rows(policy, seq)
