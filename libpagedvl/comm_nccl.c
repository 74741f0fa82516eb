/* The NCCL communicator: the library's all-gather over NCCL, on a stream of
 * its own, for ranks that are processes (or threads) on different GPUs.
 * Compiled only when CMake finds NCCL and CUDA (PVL_NCCL=AUTO/ON).
 *
 * The exchanged data are host-side statuses and observation statistics, so
 * each exchange stages its input through a device scratch buffer (copy in,
 * ncclAllGather, copy out) on the communicator's own non-blocking stream and
 * the host waits for it: the collectives never queue behind, or wait for,
 * the caller's streams. While waiting, the host polls
 * ncclCommGetAsyncError, so a peer that failed or vanished becomes
 * PVL_ERR_NCCL instead of a silent hang where NCCL can detect it. Every
 * entry point makes the communicator's device current and restores the
 * caller's.
 *
 * NCCL is loaded at run time (dlopen of libnccl.so.2, on first use), not
 * linked: libpagedvl.so then loads, and runs its CPU backend and
 * in-process communicator, on machines without NCCL, as it does without a
 * CUDA driver; the NCCL entry points answer UNSUPPORTED there. */
#include <cuda_runtime_api.h>
/* nccl.h declares a few functions as f() rather than f(void). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <nccl.h>
#pragma GCC diagnostic pop
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

/* ---- NCCL, loaded on first use ---- */

typedef struct nccl_api {
  ncclResult_t (*GetUniqueId)(ncclUniqueId *);
  ncclResult_t (*CommInitRank)(ncclComm_t *, int, ncclUniqueId, int);
  ncclResult_t (*CommDestroy)(ncclComm_t);
  ncclResult_t (*CommCount)(const ncclComm_t, int *);
  ncclResult_t (*CommUserRank)(const ncclComm_t, int *);
  ncclResult_t (*CommCuDevice)(const ncclComm_t, int *);
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t *);
  ncclResult_t (*AllGather)(const void *, void *, size_t, ncclDataType_t,
                            ncclComm_t, cudaStream_t);
  const char *(*GetErrorString)(ncclResult_t);
  const char *(*GetLastError)(ncclComm_t); /* NCCL >= 2.13; may be NULL */
} nccl_api;

static nccl_api g_api;
static bool g_api_ok;
static char g_api_err[256];
static pthread_once_t g_api_once = PTHREAD_ONCE_INIT;

/* dlsym's object pointer into a function pointer: through memcpy, which
 * ISO C allows (a cast does not). */
static bool sym(void *lib, const char *name, void *fnptr, bool required) {
  void *p = dlsym(lib, name);
  if (!p && required) {
    snprintf(g_api_err, sizeof(g_api_err), "%s has no %s", "libnccl.so.2",
             name);
    return false;
  }
  memcpy(fnptr, &p, sizeof(p));
  return true;
}

static void api_load(void) {
  void *lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char *e = dlerror();
    snprintf(g_api_err, sizeof(g_api_err), "NCCL could not be loaded: %s",
             e ? e : "dlopen(libnccl.so.2) failed");
    return;
  }
  g_api_ok =
      sym(lib, "ncclGetUniqueId", &g_api.GetUniqueId, true) &&
      sym(lib, "ncclCommInitRank", &g_api.CommInitRank, true) &&
      sym(lib, "ncclCommDestroy", &g_api.CommDestroy, true) &&
      sym(lib, "ncclCommCount", &g_api.CommCount, true) &&
      sym(lib, "ncclCommUserRank", &g_api.CommUserRank, true) &&
      sym(lib, "ncclCommCuDevice", &g_api.CommCuDevice, true) &&
      sym(lib, "ncclCommGetAsyncError", &g_api.CommGetAsyncError, true) &&
      sym(lib, "ncclAllGather", &g_api.AllGather, true) &&
      sym(lib, "ncclGetErrorString", &g_api.GetErrorString, true) &&
      sym(lib, "ncclGetLastError", &g_api.GetLastError, false);
  /* The library stays loaded for the life of the process: communicators
   * may outlive any one caller. */
}

/* UNSUPPORTED (with the reason) when NCCL cannot be loaded. */
static pvl_status api(const char *fn) {
  pthread_once(&g_api_once, api_load);
  if (g_api_ok) return PVL_SUCCESS;
  return pvl__fail(NULL, PVL_ERR_UNSUPPORTED, fn, "%s", g_api_err);
}

_Static_assert(sizeof(ncclUniqueId) == PVL_COMM_ID_BYTES,
               "PVL_COMM_ID_BYTES must be NCCL_UNIQUE_ID_BYTES");

/* Scratch made at creation: the agreement exchanges (a status header, a
 * failure message, the creation info) fit it without growing. */
#define BASE_BYTES_PER_RANK 1024

typedef struct nccl_impl {
  ncclComm_t comm;
  bool owned; /* created here (destroyed here) or adopted (never) */
  cudaStream_t stream;
  void *dbuf; /* device scratch: one rank's input, then every rank's */
  size_t dbytes;
} nccl_impl;

/* Makes `device` current; *prev receives the caller's to restore. */
static cudaError_t enter(int device, int *prev) {
  cudaError_t e = cudaGetDevice(prev);
  if (e != cudaSuccess) return e;
  return *prev == device ? cudaSuccess : cudaSetDevice(device);
}

static void leave(int device, int prev) {
  if (prev != device) cudaSetDevice(prev);
}

static pvl_status cuda_err(cudaError_t e, const char *what, char *msg,
                           size_t len) {
  (void)cudaGetLastError();
  snprintf(msg, len, "%s: %s (%s)", what, cudaGetErrorName(e),
           cudaGetErrorString(e));
  return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver
             ? PVL_ERR_NO_DEVICE
             : PVL_ERR_CUDA;
}

static pvl_status nccl_err(ncclComm_t comm, ncclResult_t r, const char *what,
                           char *msg, size_t len) {
  const char *last =
      comm ? (g_api.GetLastError ? g_api.GetLastError(comm) : NULL) : NULL;
  snprintf(msg, len, "%s: %s%s%s", what, g_api.GetErrorString(r),
           last && last[0] ? ": " : "", last ? last : "");
  return PVL_ERR_NCCL;
}

/* Grows the device scratch to `need` bytes (contents not kept). */
static pvl_status grow(nccl_impl *n, size_t need, char *msg, size_t len) {
  if (need <= n->dbytes) return PVL_SUCCESS;
  size_t want = n->dbytes ? n->dbytes : 4096;
  while (want < need) want *= 2;
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, want);
  if (e != cudaSuccess)
    return cuda_err(e, "communicator scratch (cudaMalloc)", msg, len);
  if (n->dbuf) cudaFree(n->dbuf);
  n->dbuf = p;
  n->dbytes = want;
  return PVL_SUCCESS;
}

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

static size_t scratch_for(const pvl_comm *m, size_t bytes) {
  return align256(bytes) + (size_t)m->size * bytes;
}

static pvl_status nccl_reserve(pvl_comm *m, size_t bytes, char *msg,
                               size_t len) {
  nccl_impl *n = m->impl;
  int prev = 0;
  cudaError_t e = enter(m->device, &prev);
  if (e != cudaSuccess) return cuda_err(e, "cudaSetDevice", msg, len);
  pvl_status st = grow(n, scratch_for(m, bytes), msg, len);
  leave(m->device, prev);
  return st;
}

/* Waits for the stream, watching NCCL's asynchronous error state. */
static pvl_status wait_stream(nccl_impl *n, char *msg, size_t len) {
  for (;;) {
    cudaError_t e = cudaStreamQuery(n->stream);
    if (e == cudaSuccess) break;
    if (e != cudaErrorNotReady)
      return cuda_err(e, "communicator stream", msg, len);
    ncclResult_t ae = ncclSuccess;
    ncclResult_t r = g_api.CommGetAsyncError(n->comm, &ae);
    if (r != ncclSuccess)
      return nccl_err(n->comm, r, "ncclCommGetAsyncError", msg, len);
    if (ae != ncclSuccess && ae != ncclInProgress)
      return nccl_err(n->comm, ae, "ncclAllGather (asynchronous error)", msg,
                      len);
    sched_yield();
  }
  return PVL_SUCCESS;
}

static pvl_status nccl_allgather(pvl_comm *m, const void *in, void *out,
                                 size_t bytes, uint32_t tag, char *msg,
                                 size_t len) {
  (void)tag; /* order mismatches show in the agreement headers (dist.c) */
  if (bytes == 0) return PVL_SUCCESS;
  nccl_impl *n = m->impl;
  int prev = 0;
  cudaError_t e = enter(m->device, &prev);
  if (e != cudaSuccess) return cuda_err(e, "cudaSetDevice", msg, len);
  pvl_status st = grow(n, scratch_for(m, bytes), msg, len);
  char *send = n->dbuf, *recv = send + align256(bytes);
  if (st == PVL_SUCCESS) {
    e = cudaMemcpyAsync(send, in, bytes, cudaMemcpyHostToDevice, n->stream);
    if (e != cudaSuccess) st = cuda_err(e, "copy to the scratch", msg, len);
  }
  if (st == PVL_SUCCESS) {
    ncclResult_t r =
        g_api.AllGather(send, recv, bytes, ncclChar, n->comm, n->stream);
    if (r != ncclSuccess) st = nccl_err(n->comm, r, "ncclAllGather", msg, len);
  }
  if (st == PVL_SUCCESS) {
    e = cudaMemcpyAsync(out, recv, (size_t)m->size * bytes,
                        cudaMemcpyDeviceToHost, n->stream);
    if (e != cudaSuccess) st = cuda_err(e, "copy from the scratch", msg, len);
  }
  if (st == PVL_SUCCESS) st = wait_stream(n, msg, len);
  leave(m->device, prev);
  return st;
}

static void nccl_destroy(pvl_comm *m) {
  nccl_impl *n = m->impl;
  int prev = 0;
  const bool entered = enter(m->device, &prev) == cudaSuccess;
  if (n->stream) cudaStreamDestroy(n->stream);
  if (n->dbuf) cudaFree(n->dbuf);
  if (n->owned) g_api.CommDestroy(n->comm);
  if (entered) leave(m->device, prev);
  pvl__free(pvl__default_allocator(), n, sizeof(*n));
}

static const pvl_comm_ops g_nccl_ops = {
    .name = "nccl",
    .allgather = nccl_allgather,
    .reserve = nccl_reserve,
    .destroy = nccl_destroy,
};

/* The library side of a communicator around `comm` (on the current device,
 * which is `device`): stream, scratch, handle. On failure nothing is kept
 * (an owned NCCL communicator is the caller's to destroy). */
static pvl_status wrap(ncclComm_t comm, bool owned, int32_t device,
                       pvl_comm **out, const char *fn) {
  char msg[PVL_ERRMSG_LEN];
  int rank = 0, count = 0;
  ncclResult_t r = g_api.CommUserRank(comm, &rank);
  if (r == ncclSuccess) r = g_api.CommCount(comm, &count);
  if (r != ncclSuccess) {
    pvl_status st = nccl_err(comm, r, "ncclCommUserRank", msg, sizeof(msg));
    return pvl__fail(NULL, st, fn, "%s", msg);
  }
  const pvl_allocator *a = pvl__default_allocator();
  pvl_comm *m = pvl__alloc(a, sizeof(*m));
  nccl_impl *n = pvl__alloc(a, sizeof(*n));
  if (!m || !n) {
    pvl__free(a, m, sizeof(*m));
    pvl__free(a, n, sizeof(*n));
    return pvl__fail(NULL, PVL_ERR_NO_MEMORY, fn, "NCCL handle");
  }
  memset(n, 0, sizeof(*n));
  n->comm = comm;
  n->owned = owned;
  m->ops = &g_nccl_ops;
  m->rank = rank;
  m->size = count;
  m->device = device;
  m->impl = n;
  pvl_status st = PVL_SUCCESS;
  cudaError_t e = cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking);
  if (e != cudaSuccess)
    st = cuda_err(e, "cudaStreamCreateWithFlags", msg, sizeof(msg));
  if (st == PVL_SUCCESS)
    st = grow(n, scratch_for(m, BASE_BYTES_PER_RANK), msg, sizeof(msg));
  if (st != PVL_SUCCESS) {
    if (n->stream) cudaStreamDestroy(n->stream);
    pvl__free(a, n, sizeof(*n));
    pvl__free(a, m, sizeof(*m));
    return pvl__fail(NULL, st, fn, "%s", msg);
  }
  *out = m;
  return PVL_SUCCESS;
}

pvl_status pvl_comm_unique_id(void *id) {
  pvl_status sa = api(__func__);
  if (sa != PVL_SUCCESS) return sa;
  if (!id) return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "id is NULL");
  ncclUniqueId uid;
  ncclResult_t r = g_api.GetUniqueId(&uid);
  if (r != ncclSuccess) {
    char msg[PVL_ERRMSG_LEN];
    pvl_status st = nccl_err(NULL, r, "ncclGetUniqueId", msg, sizeof(msg));
    return PVL_FAIL(NULL, st, "%s", msg);
  }
  memcpy(id, &uid, sizeof(uid));
  return PVL_SUCCESS;
}

pvl_status pvl_comm_create_nccl(const void *unique_id, int32_t rank,
                                int32_t nranks, int32_t device,
                                pvl_comm **out) {
  pvl_status sa = api(__func__);
  if (sa != PVL_SUCCESS) return sa;
  if (!unique_id || !out)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "unique_id or out is NULL");
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "rank %d of %d ranks is out of range", rank, nranks);
  int nd = 0;
  char msg[PVL_ERRMSG_LEN];
  cudaError_t e = cudaGetDeviceCount(&nd);
  if (e != cudaSuccess) {
    pvl_status st = cuda_err(e, "cudaGetDeviceCount", msg, sizeof(msg));
    return PVL_FAIL(NULL, st, "%s", msg);
  }
  if (device < 0 || device >= nd)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "device %d out of range (%d devices)", device, nd);
  int prev = 0;
  e = enter(device, &prev);
  if (e != cudaSuccess) {
    pvl_status st = cuda_err(e, "cudaSetDevice", msg, sizeof(msg));
    return PVL_FAIL(NULL, st, "%s", msg);
  }
  ncclUniqueId uid;
  memcpy(&uid, unique_id, sizeof(uid));
  ncclComm_t comm = NULL;
  ncclResult_t r = g_api.CommInitRank(&comm, nranks, uid, rank);
  pvl_status st = PVL_SUCCESS;
  if (r != ncclSuccess) {
    st = nccl_err(comm, r, "ncclCommInitRank", msg, sizeof(msg));
    st = PVL_FAIL(NULL, st, "%s", msg);
  }
  if (st == PVL_SUCCESS) {
    st = wrap(comm, true, device, out, __func__);
    if (st != PVL_SUCCESS) g_api.CommDestroy(comm);
  }
  leave(device, prev);
  return st;
}

pvl_status pvl_comm_adopt_nccl(void *nccl_comm, int32_t device,
                               pvl_comm **out) {
  pvl_status sa = api(__func__);
  if (sa != PVL_SUCCESS) return sa;
  if (!nccl_comm || !out)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "nccl_comm or out is NULL");
  ncclComm_t comm = (ncclComm_t)nccl_comm;
  char msg[PVL_ERRMSG_LEN];
  int dev = -1;
  ncclResult_t r = g_api.CommCuDevice(comm, &dev);
  if (r != ncclSuccess) {
    pvl_status st = nccl_err(comm, r, "ncclCommCuDevice", msg, sizeof(msg));
    return PVL_FAIL(NULL, st, "%s", msg);
  }
  if (device != -1 && device != dev)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "device %d, but the NCCL communicator is on device %d",
                    device, dev);
  int prev = 0;
  cudaError_t e = enter(dev, &prev);
  if (e != cudaSuccess) {
    pvl_status st = cuda_err(e, "cudaSetDevice", msg, sizeof(msg));
    return PVL_FAIL(NULL, st, "%s", msg);
  }
  pvl_status st = wrap(comm, false, dev, out, __func__);
  leave(dev, prev);
  return st;
}
