"""Communicators (pvl_comm): one model's cache spread over several ranks.

Collective calls (Cache creation, seq_add/fork/append, can_add, compress, and
retain/decode_cap when split by heads) must be made by every rank, each from
its own thread: ctypes releases the GIL during the C call, so Python threads
can wait in a collective together. See "Several ranks" in pagedvl.h.
"""
from __future__ import annotations

import ctypes as C
import weakref
from typing import List, Tuple

from ._data import uint
from ._lib import Closable, PagedVLError, PROTOTYPES, Status, check_create, lib

COMM_ID_BYTES = 128  # PVL_COMM_ID_BYTES


class Comm(Closable):
    """A communicator handle of one rank. Make them with Comm.local(n) (an
    in-process communicator over threads, for the CPU backend and tests),
    Comm.nccl(unique_id, rank, nranks, device) or Comm.adopt_nccl(ptr).
    Caches made with it keep it alive; close() refuses while they are open."""

    def __init__(self, handle):
        self._h = handle
        self._caches = weakref.WeakSet()

    @classmethod
    def local(cls, nranks: int) -> List["Comm"]:
        """pvl_comm_create_local: the handles of ranks 0..nranks-1."""
        n = uint(nranks, "nranks")
        out = (C.c_void_p * max(n, 1))()
        check_create(lib.pvl_comm_create_local(n, out))
        return [cls(out[i]) for i in range(n)]

    @classmethod
    def nccl(cls, unique_id: bytes, rank: int, nranks: int, device: int) -> "Comm":
        """pvl_comm_create_nccl (collective over the nranks processes)."""
        uid = bytes(unique_id)
        if len(uid) != COMM_ID_BYTES:
            raise ValueError(f"unique_id: expected {COMM_ID_BYTES} bytes, got {len(uid)}")
        buf = C.create_string_buffer(uid, COMM_ID_BYTES)
        out = C.c_void_p()
        check_create(lib.pvl_comm_create_nccl(buf, int(rank), int(nranks), int(device),
                                              C.byref(out)))
        return cls(out.value)

    @classmethod
    def adopt_nccl(cls, nccl_comm: int, device: int = -1) -> "Comm":
        """pvl_comm_adopt_nccl: wraps an ncclComm_t (an int pointer) the
        caller keeps alive until this handle is closed."""
        out = C.c_void_p()
        check_create(lib.pvl_comm_adopt_nccl(C.c_void_p(int(nccl_comm)), int(device),
                                             C.byref(out)))
        return cls(out.value)

    def _handle(self):
        if not self._h:
            raise ValueError("the comm is closed")
        return self._h

    @property
    def rank(self) -> int:
        """pvl_comm_rank."""
        out = C.c_int32()
        check_create(lib.pvl_comm_rank(self._handle(), C.byref(out)))
        return out.value

    @property
    def size(self) -> int:
        """pvl_comm_size."""
        out = C.c_int32()
        check_create(lib.pvl_comm_size(self._handle(), C.byref(out)))
        return out.value

    @property
    def closed(self) -> bool:
        return not self._h

    def close(self):
        """pvl_comm_destroy. Idempotent."""
        if not self._h:
            return
        live = [c for c in self._caches if not c.closed]
        if live:
            raise ValueError(f"the comm still has {len(live)} open cache(s): close "
                             f"them first")
        h, self._h = self._h, None
        lib.pvl_comm_destroy(h)


    def __repr__(self):
        if self.closed:
            return "<pagedvl.Comm closed>"
        return f"<pagedvl.Comm rank {self.rank} of {self.size}>"


def comm_unique_id() -> bytes:
    """pvl_comm_unique_id: NCCL's unique id (PVL_COMM_ID_BYTES bytes) to
    send to the other ranks. UNSUPPORTED without NCCL in the build."""
    buf = C.create_string_buffer(COMM_ID_BYTES)
    check_create(lib.pvl_comm_unique_id(buf))
    return buf.raw


def split_range(total: int, nranks: int, rank: int) -> Tuple[int, int]:
    """pvl_split_range: (begin, count) of rank's even share of total items."""
    b, n = C.c_uint32(), C.c_uint32()
    check_create(lib.pvl_split_range(uint(total, "total"), uint(nranks, "nranks"),
                                     uint(rank, "rank"), C.byref(b), C.byref(n)))
    return b.value, n.value


_RANK_FN = PROTOTYPES["pvl_run_ranks"][1][1]


def run_ranks(n: int, fn) -> list:
    """pvl_run_ranks: calls fn(rank) for every rank in [0, n) at once, ranks
    1..n-1 on threads of their own and rank 0 on the calling thread (how one
    thread drives a step's collective calls on all its ranks). Returns the
    values fn returned, by rank; if fn raised on some rank, the exception of
    the lowest such rank is raised once all have returned."""
    n = uint(n, "n")
    results, errors = [None] * n, [None] * n

    def call(_arg, rank):
        try:
            results[rank] = fn(rank)
            return 0
        except PagedVLError as e:
            errors[rank] = e
            return int(e.status) or int(Status.INTERNAL)
        except BaseException as e:  # re-raised below, on the caller's thread
            errors[rank] = e
            return int(Status.INTERNAL)

    cb = _RANK_FN(call)
    statuses = (C.c_int * max(n, 1))()
    st = lib.pvl_run_ranks(n, cb, None, statuses)
    for e in errors:
        if e is not None:
            raise e
    check_create(st)
    return results
