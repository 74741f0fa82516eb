/* libpagedvl: a paged, per-layer, compressible KV cache for vision-language
 * models. The whole public API; C11, no CUDA types (streams are void *).
 *
 * Usage: the body of a main() on the CPU backend, a small VLM (4 layers;
 * LLaVA-7B has 32 layers, 32 query heads, 8 KV heads, head_dim 128) with
 * one request of 5 text + 576 image + 20 text tokens. k[l], v[l] point to
 * [601][2][64] f16 prompt K/V, k_new/v_new[l] to [1][2][64], q/out[l] to
 * [1][8][64]. CI compiles and runs the text between the two marker lines
 * (tests/header_example.cmake).
 *
 * ---- usage example begin ----
 *   pvl_config cfg;
 *   pvl_config_init(&cfg);               // defaults, then set the geometry
 *   cfg.backend = PVL_BACKEND_CPU;       // or AUTO: CUDA when usable
 *   cfg.dtype = PVL_DTYPE_F16;
 *   cfg.num_layers = 4; cfg.num_q_heads = 8; cfg.num_kv_heads = 2;
 *   cfg.head_dim = 64; cfg.block_size = 16; cfg.num_blocks = 512;
 *   pvl_cache *cache;
 *   if (pvl_cache_create(&cfg, &cache) != PVL_SUCCESS) {
 *     fprintf(stderr, "%s\n", pvl_create_last_error());
 *     return 1;
 *   }
 *
 *   pvl_span img = {5, 581};             // prompt positions [5, 581) are visual
 *   pvl_seq_id seq;
 *   pvl_status st = pvl_seq_add(cache, 601, &img, 1, &seq);
 *   if (st != PVL_SUCCESS) {             // OUT_OF_BLOCKS: nothing reserved,
 *     pvl_cache_destroy(cache);          // a server retries later
 *     return 1;
 *   }
 *   // Prefill writes every prompt token of every layer (K after RoPE).
 *   for (uint32_t l = 0; l < cfg.num_layers && !st; l++)
 *     st = pvl_kv_write(cache, seq, l, 0, 601, k[l], v[l], NULL);
 *
 *   pvl_plan *plan = NULL;
 *   if (!st) st = pvl_plan_create(cache, 256, 0, &plan);
 *   for (int step = 0; step < n_steps && !st; step++) {
 *     st = pvl_seq_append(cache, &seq, 1, NULL); // a new slot in every layer
 *     if (!st) st = pvl_plan_build(plan, &seq, 1, NULL);
 *     for (uint32_t l = 0; l < cfg.num_layers && !st; l++) {
 *       st = pvl_plan_kv_write(plan, l, k_new[l], v_new[l], NULL);
 *       if (!st) st = pvl_attention_decode(plan, l, q[l], out[l], 0.0f, NULL);
 *     }
 *   }
 *   if (st)
 *     fprintf(stderr, "%s\n  %s\n", pvl_status_string(st),
 *             pvl_cache_last_error(cache));
 *   pvl_plan_destroy(plan);
 *   pvl_seq_free(cache, seq);
 *   pvl_cache_destroy(cache);
 *   return st == PVL_SUCCESS ? 0 : 1;
 * ---- usage example end ----
 *
 * Conventions that hold for every function below:
 * - Every function returns a pvl_status; results go through out-pointers,
 *   which are written only on success.
 * - A call that fails changes nothing: no block is leaked or reserved, no
 *   sequence is half-admitted, no table is half-changed.
 * - Where a failure's message goes: a call given a cache records it in that
 *   cache (pvl_cache_last_error), a call given a plan in the plan's cache.
 *   A call with no cache to record in writes the calling thread's
 *   pvl_create_last_error(): the functions that take neither a cache nor a
 *   plan (pvl_config_init, pvl_cache_create, pvl_backend_available,
 *   pvl_policy_init, _parse, _budgets, _scores, _select, the pvl_comm_*
 *   functions, pvl_split_range) and any call whose cache or plan argument
 *   is NULL.
 * - Non-finite numbers (Inf, NaN) in K, V and Q. pvl_kv_write and
 *   pvl_plan_kv_write store whatever they are given. pvl_attention_decode
 *   succeeds and confines them to the outputs that read them: an output
 *   out[b][h] whose softmax is undefined (a logit scale * q . k that is NaN
 *   or +Inf, as finite f32 or bf16 inputs give when the product overflows,
 *   or every logit -Inf) is NaN in every element on the CPU backend, and
 *   NaN or Inf in the V of a key it reads makes that output non-finite
 *   (even at weight 0); the other outputs are unaffected (a -Inf logit
 *   among finite ones only weighs 0). pvl_observe on the CPU backend
 *   refuses a q that holds a non-finite value (INVALID_ARGUMENT naming the
 *   row and head) and accumulates nothing; on CUDA q is not read on the
 *   host. A per-key sum of an observation that is not finite (Inf or NaN in
 *   a key a row sees, an overflowing or non-finite logit, a non-finite q on
 *   CUDA) stays so, and pvl_compress (scored policies) and pvl_decode_cap
 *   refuse such an observation with BAD_STATE, naming the layer, and
 *   change nothing. Then free the sequence, or compress it with full or
 *   streaming, which read no observation. No call succeeds with a result
 *   that depends on a non-finite sum or on memory it did not write.
 * - A cache and every object made from it (sequences, plans) is used by one
 *   thread at a time, like an NCCL communicator. Separate caches are
 *   independent and may be used from different threads at once.
 * - Data pointers (K, V, Q, outputs) live where the backend computes: host
 *   memory for PVL_BACKEND_CPU, device memory for PVL_BACKEND_CUDA (16-byte
 *   aligned there: the kernels load 16-byte vectors; cudaMalloc and the
 *   frameworks' allocators align far more). They are
 *   borrowed for the duration of the call (or, on CUDA, until the work queued
 *   on `stream` has run) and never kept.
 * - `stream` is a cudaStream_t passed as void * (NULL = the default stream);
 *   the CPU backend ignores it and finishes before returning. A block freed
 *   by one call may be handed out by the next, so keep one cache's device
 *   work on one stream, or synchronize between streams.
 * - Nothing here calls exit() or abort(), and no process-wide state exists
 *   apart from one private jemalloc arena for host metadata.
 */
#ifndef PAGEDVL_H
#define PAGEDVL_H

#include <stddef.h>
#include <stdint.h>

#include "pagedvl/version.h"

#if defined(_WIN32)
#define PVL_API
#elif defined(PVL_BUILDING_LIBRARY)
#define PVL_API __attribute__((visibility("default")))
#else
#define PVL_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Status                                                                   */
/* ------------------------------------------------------------------------ */

typedef enum pvl_status {
  PVL_SUCCESS = 0,
  PVL_ERR_INVALID_ARGUMENT = 1, /* NULL, out-of-range value, size overflow */
  PVL_ERR_NO_MEMORY = 2,        /* a host allocation failed */
  PVL_ERR_OUT_OF_BLOCKS = 3,    /* the pool has too few free blocks */
  PVL_ERR_UNKNOWN_SEQUENCE = 4, /* id never issued, or already freed */
  PVL_ERR_UNSUPPORTED = 5,      /* valid, but not built or not supported */
  PVL_ERR_CAPACITY = 6,         /* a fixed-capacity buffer is too small */
  PVL_ERR_BAD_STATE = 7,        /* call out of order for this object */
  PVL_ERR_NO_DEVICE = 8,        /* no GPU, or no usable driver */
  PVL_ERR_CUDA = 9,             /* a CUDA runtime error (message says which) */
  PVL_ERR_NCCL = 10,            /* an NCCL error (message says which) */
  PVL_ERR_INTERNAL = 11         /* a library bug: please report it */
} pvl_status;

/* A static string naming `status` ("PVL_ERR_OUT_OF_BLOCKS: ..."); never NULL,
 * also for values outside the enum. */
PVL_API const char *pvl_status_string(pvl_status status);

/* PVL_VERSION of the library actually loaded. */
PVL_API uint32_t pvl_version(void);

/* Layout of the public types as this library was compiled, for bindings
 * that declare the structs themselves (the Python package checks its ctypes
 * declarations with it at import). `type` names a struct, enum or typedef
 * of this header ("pvl_config", "pvl_status", "pvl_seq_id"). field = NULL:
 * *size = sizeof(type), *offset = 0; else *size and *offset are the
 * sizeof and offsetof of that member. INVALID_ARGUMENT for an unknown type
 * or field (message in pvl_create_last_error). */
PVL_API pvl_status pvl_abi_layout(const char *type, const char *field,
                                  size_t *size, size_t *offset);

/* ------------------------------------------------------------------------ */
/* Configuration                                                            */
/* ------------------------------------------------------------------------ */

typedef enum pvl_backend {
  PVL_BACKEND_CPU = 0,  /* host memory; the reference implementation */
  PVL_BACKEND_CUDA = 1, /* device memory and CUDA kernels */
  PVL_BACKEND_AUTO = 2  /* CUDA if built, a device is usable and the
                           kernels take the shape and dtype; else CPU.
                           pvl_cache_config tells which one was chosen */
} pvl_backend;

typedef enum pvl_dtype {
  PVL_DTYPE_F32 = 0, /* CPU backend only (tests, references) */
  PVL_DTYPE_F16 = 1,
  PVL_DTYPE_BF16 = 2
} pvl_dtype;

/* Byte size of one element of `dtype`, 0 for an unknown value. */
PVL_API size_t pvl_dtype_size(pvl_dtype dtype);

/* Whether caches of `backend` can be created on this machine: *out = 1 for
 * PVL_BACKEND_CPU and AUTO (always), and for PVL_BACKEND_CUDA when the
 * library was built with CUDA and device `device` exists with a usable
 * driver and compute capability 8.0 or newer (the kernels' minimum; on an
 * older device pvl_cache_create says UNSUPPORTED with the capability found,
 * and AUTO uses the CPU); else 0. Shapes are not checked: pvl_cache_create
 * may still say UNSUPPORTED (CUDA kernels take head_dim 64/128/256, block
 * 16/32, f16/bf16).
 * Does not change the current device. */
PVL_API pvl_status pvl_backend_available(pvl_backend backend, int32_t device,
                                         int *out);

/* Host-metadata allocator: the seam every host allocation of a cache goes
 * through (tables, sequences, plans, and the CPU backend's block storage).
 * `alloc` returns memory aligned to `align` (a power of two <= 4096) or NULL;
 * `free` receives the size and alignment that were asked for (sized
 * deallocation, as sdallocx and C++'s aligned delete take them). The default (config.allocator
 * = NULL) is a private jemalloc arena (mallocx/sdallocx), or libc when the
 * library was built with PVL_JEMALLOC=OFF. */
typedef struct pvl_allocator {
  void *(*alloc)(void *ctx, size_t size, size_t align);
  void (*free)(void *ctx, void *ptr, size_t size, size_t align);
  void *ctx;
} pvl_allocator;

/* ------------------------------------------------------------------------ */
/* Several ranks: communicators                                             */
/* ------------------------------------------------------------------------ */
/*
 * One model's cache may be spread over several ranks (one per GPU, or one
 * per thread on the CPU backend), split by layers (pipeline) or by KV heads
 * (tensor parallel); see pvl_config.split. The ranks talk through a
 * pvl_comm: NCCL for real runs across GPUs, or an in-process communicator
 * of N ranks over threads, a test double for the CPU backend and the tests,
 * never the engine of a real multi-GPU run.
 *
 * Collective calls. In a cache with a communicator, the calls marked
 * COLLECTIVE below must be made by every rank of the communicator, on its
 * own cache, in the same order, with the same arguments apart from the
 * rank's own data (K/V/Q) and layer indices. Each one first does its local
 * checks and preparation, then the ranks exchange a status: if any rank
 * failed, every rank returns an error (the failing rank's status; the
 * message names the rank and its reason) and no rank changes anything.
 * Every data exchange of a call comes before its last agreement, and
 * every change after it, so a failing exchange (PVL_ERR_NCCL with NCCL's
 * message and the call; NCCL's asynchronous errors are polled while
 * waiting) leaves every cache as it was. Only a device error after the
 * last agreement (a failing kernel or copy, or NCCL failing on some ranks
 * only in that last exchange) can leave the ranks apart, as such an error
 * leaves a single cache damaged.
 *
 *   call                        split by layers     split by heads
 *   pvl_cache_create            COLLECTIVE          COLLECTIVE
 *   pvl_seq_add, pvl_seq_fork,
 *   pvl_seq_append              COLLECTIVE          COLLECTIVE
 *   pvl_can_add                 COLLECTIVE (the     COLLECTIVE
 *                               worst answer of
 *                               all ranks)
 *   pvl_compress                COLLECTIVE          COLLECTIVE
 *   pvl_seq_retain              local               COLLECTIVE
 *   pvl_decode_cap              local               COLLECTIVE when the
 *                                                   layer exceeds the cap
 *                                                   (the same on all ranks)
 *   pvl_seq_free                local, but call it on every rank
 *   everything else             local (kv_write, observe, plans, attention,
 *                               queries, destroy)
 *
 * Cost: one small exchange per collective call (a status and a 64-bit
 * fingerprint of the arguments per rank; on NCCL a few microseconds of
 * all-gather plus a host synchronization, so one per decode step for
 * pvl_seq_append); pvl_compress also exchanges the observation statistics
 * (split by layers: one float per layer; by heads: the per-key attention
 * sums, 8 bytes per prompt token per layer, and two 8-byte counts per
 * query head per layer). Every exchange is an all-gather: each rank sends
 * its share and receives every rank's (n times the bytes above for n
 * ranks), and sums over ranks are added by every rank in rank order, so
 * they are bit-identical on all ranks whatever NCCL's algorithm. The
 * exchanges are host-synchronous on a stream of the communicator's own
 * (NCCL: pvl_comm_create_nccl), never on the caller's streams.
 *
 * Out-of-order calls: every collective call begins with the same
 * fixed-size exchange, which carries the call's name, so ranks that call
 * different collectives get PVL_ERR_BAD_STATE ("collective order
 * mismatch: rank 0 called pvl_seq_append while rank 1 called
 * pvl_compress"), and ranks that pass different arguments (or hold
 * different sequences) get BAD_STATE "ranks disagree". The in-process
 * communicator also tags every exchange with a sequence number. What
 * cannot be detected: a collective that some ranks never call; the others
 * wait for it forever (NCCL: until its own timeout, if one is set).
 *
 * Indices: layer indices in every call are the cache's own (local): 0 ..
 * num_layers - 1 of this rank; its global layer is layer_begin + local.
 * Head-split tensors (K/V of pvl_kv_write, Q of pvl_observe and
 * pvl_attention_decode, outputs) hold this rank's heads only: KV heads
 * [kv_head_begin, kv_head_begin + num_kv_heads) and the query heads of
 * those groups, in model order. Budgets (pvl_compress_report.budget) are
 * per local layer, computed over the whole model.
 *
 * Threads: a collective blocks its caller until every rank has joined, so
 * the collective calls of different ranks come from different threads (one
 * thread per rank). Non-collective calls of several ranks' caches may come
 * from one thread: each call makes its cache's device current and restores
 * the caller's. A program with one thread for all its GPUs runs a step's
 * collective calls through pvl_run_ranks, which gives each rank a thread
 * of its own for that step. (NCCL group calls cannot serve here: each
 * collective call's later steps depend on the host-side result of its
 * earlier exchanges, which a group only delivers at ncclGroupEnd.)
 */

typedef struct pvl_comm pvl_comm;

/* Bytes of an NCCL unique id (NCCL_UNIQUE_ID_BYTES). */
#define PVL_COMM_ID_BYTES 128

/* NCCL's ncclGetUniqueId into id[0..PVL_COMM_ID_BYTES): make it on one
 * rank and send it to the others (MPI, a file, a socket). UNSUPPORTED when
 * the library was built without NCCL, or libnccl.so.2 cannot be loaded
 * (the library loads NCCL at run time, on first use, so it also runs
 * where NCCL is not installed); so are the other NCCL functions. */
PVL_API pvl_status pvl_comm_unique_id(void *id);

/* Creates rank `rank` of `nranks` over NCCL (ncclCommInitRank) on CUDA
 * device `device`; the library owns the NCCL communicator and destroys it
 * in pvl_comm_destroy. COLLECTIVE over the nranks processes or threads, as
 * ncclCommInitRank is. Fails with UNSUPPORTED (no NCCL in this build),
 * NO_DEVICE, NCCL (with NCCL's message), INVALID_ARGUMENT. The collectives
 * run on a stream the communicator creates on `device`, and the host waits
 * for them: their data are host-side statistics and statuses. */
PVL_API pvl_status pvl_comm_create_nccl(const void *unique_id, int32_t rank,
                                        int32_t nranks, int32_t device,
                                        pvl_comm **out);

/* Adopts an ncclComm_t the caller already has (a serving stack's or
 * PyTorch's), passed as void *: rank and size are NCCL's
 * (ncclCommUserRank, ncclCommCount), the device must be the NCCL
 * communicator's (ncclCommCuDevice; -1 = take it from NCCL). The library
 * never destroys the NCCL communicator; keep it alive until
 * pvl_comm_destroy. Our collectives run on a stream of our own on that
 * device, host-synchronized, so they never queue behind the caller's
 * streams; the caller must not run its own collectives on the same NCCL
 * communicator concurrently with ours (NCCL requires one order of
 * operations per communicator). */
PVL_API pvl_status pvl_comm_adopt_nccl(void *nccl_comm, int32_t device,
                                       pvl_comm **out);

/* An in-process communicator of `nranks` ranks (1..1024) for the CPU
 * backend and tests: out[0..nranks) receives rank i's handle. Each rank's
 * collective calls must come from its own thread. Not for real runs across
 * GPUs (use NCCL). Destroy every handle (the last one frees the shared
 * state). */
PVL_API pvl_status pvl_comm_create_local(uint32_t nranks, pvl_comm **out);

PVL_API pvl_status pvl_comm_rank(const pvl_comm *comm, int32_t *rank);
PVL_API pvl_status pvl_comm_size(const pvl_comm *comm, int32_t *size);

/* Frees the handle (NULL is accepted). Caches made with it must be
 * destroyed first. An owned NCCL communicator is destroyed
 * (ncclCommDestroy), an adopted one is not. Local. */
PVL_API pvl_status pvl_comm_destroy(pvl_comm *comm);

/* Runs fn(arg, r) for every rank r in [0, n) at once, ranks 1..n-1 on
 * threads of their own and rank 0 on the calling thread, and returns when
 * all have returned: how one thread drives the collective calls of all its
 * ranks (all its GPUs), e.g. a decode step's pvl_seq_append on every
 * rank's cache. statuses[r] (may be NULL) receives fn's return value; the
 * result is the status of the lowest rank that failed, or SUCCESS. If a
 * thread cannot be started, fn runs on no rank and NO_MEMORY is returned
 * (statuses untouched). Costs a thread start per rank per call (tens of
 * microseconds). Local: not itself a collective. */
PVL_API pvl_status pvl_run_ranks(uint32_t n,
                                 pvl_status (*fn)(void *arg, uint32_t rank),
                                 void *arg, pvl_status *statuses);

/* The even split of `total` items over `nranks`: rank r gets
 * [total * r / nranks, total * (r + 1) / nranks). Pure function; what the
 * cache uses when num_layers (split by layers) or num_kv_heads (by heads)
 * is 0. */
PVL_API pvl_status pvl_split_range(uint32_t total, uint32_t nranks,
                                   uint32_t rank, uint32_t *begin,
                                   uint32_t *count);

typedef enum pvl_split {
  PVL_SPLIT_NONE = 0,   /* one rank holds the whole model (comm may be
                           NULL) */
  PVL_SPLIT_LAYERS = 1, /* rank r holds layers [layer_begin, layer_begin +
                           num_layers) of model_num_layers, all heads */
  PVL_SPLIT_HEADS = 2   /* rank r holds KV heads [kv_head_begin,
                           kv_head_begin + num_kv_heads) of
                           model_num_kv_heads, and their query heads, of
                           every layer */
} pvl_split;

/* Cache configuration. Initialize with pvl_config_init(), then set fields:
 * `size` lets fields be added later without breaking the ABI. The ranges
 * below are the limits pvl_cache_create checks: a value outside them is
 * INVALID_ARGUMENT; a shape the CUDA kernels do not take is UNSUPPORTED
 * there (AUTO then falls back to the CPU). */
typedef struct pvl_config {
  size_t size;          /* sizeof(pvl_config), set by pvl_config_init */
  pvl_backend backend;  /* default PVL_BACKEND_AUTO */
  int32_t device;       /* CUDA device ordinal, default 0; CUDA: in [0,
                           device count), the CPU ignores it. Every call
                           that touches the GPU makes it current and
                           restores the caller's device, so one thread may
                           drive caches on several GPUs */
  pvl_dtype dtype;      /* K/V/Q/output element type, default F16; F32 is
                           CPU only */
  uint32_t num_layers;  /* layers this cache holds: 1..4096 (0 asks a
                           split by layers for the even split, below) */
  uint32_t num_q_heads; /* query heads: 1..16384, a multiple of
                           num_kv_heads (CUDA: at most 8 per KV head) */
  uint32_t num_kv_heads;/* KV heads this cache holds: 1..1024 (0 asks a
                           split by heads for the even split, below) */
  uint32_t head_dim;    /* CPU: 1..1024; CUDA kernels: 64, 128 or 256 */
  uint32_t block_size;  /* tokens per block. CPU: 1..1024; CUDA: 16 or 32 */
  uint32_t num_blocks;  /* blocks in the pool: 1..INT32_MAX (block ids are
                           int32), and num_blocks * block_size <= INT32_MAX
                           (one layer may hold the whole pool, and layer
                           lengths are int32); 0 = derive from
                           memory_fraction (CUDA only; capped the same
                           way) */
  float memory_fraction;/* of the device's free memory, when num_blocks = 0
                           (only then read): (0, 1]; default 0.9 */
  uint32_t max_seqs;    /* live sequences at most: 1..2^24; default 4096 */
  const pvl_allocator *allocator; /* NULL = default; else both functions
                           set; must outlive the cache */
  /* Several ranks (see "Several ranks" above). With comm = NULL and split
   * NONE the cache is a single rank, as before. */
  pvl_comm *comm;       /* must outlive the cache; NULL = single rank */
  pvl_split split;      /* default PVL_SPLIT_NONE; NONE with a comm of
                           size > 1 is INVALID_ARGUMENT */
  uint32_t model_num_layers; /* LAYERS: layers of the whole model. Set
                           num_layers = 0 for the even split
                           (pvl_split_range), else layer_begin and
                           num_layers give this rank's range; the ranges
                           must tile [0, model_num_layers), so it is at
                           most 4096 x the ranks */
  uint32_t layer_begin;
  uint32_t model_num_kv_heads; /* HEADS: KV heads of the whole model. Set
                           num_kv_heads = 0 and num_q_heads = the model's
                           query heads for the even split, else
                           kv_head_begin, num_kv_heads and num_q_heads (this
                           rank's) give the range; every rank keeps the
                           model's GQA ratio. The ranges tile [0,
                           model_num_kv_heads), so it is at most 1024 x
                           the ranks */
  uint32_t kv_head_begin;
} pvl_config;

/* Fills `cfg` with defaults and sets cfg->size. Geometry fields are zero and
 * must be set before pvl_cache_create. */
PVL_API pvl_status pvl_config_init(pvl_config *cfg);

/* ------------------------------------------------------------------------ */
/* Cache                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct pvl_cache pvl_cache;

/* Creates a cache: validates `cfg` (copied; the caller keeps it), allocates
 * the pool (num_blocks blocks of 2 * num_kv_heads * block_size * head_dim
 * elements, laid out [K|V][kv_head][slot][head_dim]) and the host metadata.
 * Fails with INVALID_ARGUMENT (bad geometry or a size that overflows),
 * UNSUPPORTED (backend or shape not built/supported), NO_DEVICE, NO_MEMORY;
 * on failure *out is untouched and nothing is leaked.
 * With a communicator: COLLECTIVE. The ranks check that they agree on
 * everything but their own range (split, model geometry, dtype, block
 * size, num_blocks, max_seqs, backend) and that the ranges tile the model;
 * if any rank fails, every rank fails (BAD_STATE "ranks disagree" for a
 * mismatch, else the failing rank's status) and no rank keeps a cache. */
PVL_API pvl_status pvl_cache_create(const pvl_config *cfg, pvl_cache **out);

/* Frees the cache, its pool, its sequences and the plans still made from
 * it. NULL is accepted (returns PVL_SUCCESS). The caller ensures no device
 * work of the cache is still in flight. */
PVL_API pvl_status pvl_cache_destroy(pvl_cache *cache);

/* The configuration the cache was created with (backend resolved, num_blocks
 * derived). */
PVL_API pvl_status pvl_cache_config(const pvl_cache *cache, pvl_config *out);

/* Message of the last failing call on `cache` or on a plan made from it
 * ("" if none yet): the function, what was wrong, and the values. Owned by
 * the cache; valid until the next failing call. NULL cache: a static
 * message. */
PVL_API const char *pvl_cache_last_error(const pvl_cache *cache);

/* Message of the last failing call of the calling thread that had no cache
 * to record it in: pvl_cache_create, pvl_config_init, pvl_abi_layout and
 * the pvl_policy_* functions. Thread-local; valid until that thread's next
 * such failure. Also written by pvl_backend_available and by any call whose
 * cache or plan argument is NULL; not by pvl_policy_rows given a cache,
 * which records in that cache like every call that has one. */
PVL_API const char *pvl_create_last_error(void);

/* ------------------------------------------------------------------------ */
/* Sequences                                                                */
/* ------------------------------------------------------------------------ */

/* Opaque sequence id, never 0. An id is not reused for the life of the
 * cache (a slot would have to be reused 2^40 times), so a stale id is
 * detected (UNKNOWN_SEQUENCE), not aliased. */
typedef uint64_t pvl_seq_id;

/* Prompt positions [begin, end) that hold visual tokens. */
typedef struct pvl_span {
  uint32_t begin;
  uint32_t end;
} pvl_span;

/* Admits a request of `n_prompt` tokens (>= 1): reserves
 * ceil(n_prompt / block_size) blocks in every layer, all of them or none.
 * `visual` lists n_visual spans (sorted, non-overlapping, non-empty, inside
 * [0, n_prompt)); it may be NULL when n_visual = 0. The slots hold garbage
 * until written with pvl_kv_write. The sequence's next logical position is
 * n_prompt. Fails with OUT_OF_BLOCKS (pool), CAPACITY (max_seqs live),
 * INVALID_ARGUMENT, NO_MEMORY.
 * With a communicator: COLLECTIVE; every rank admits or none does, and the
 * ids agree across ranks (same calls, same ids). */
PVL_API pvl_status pvl_seq_add(pvl_cache *cache, uint32_t n_prompt,
                               const pvl_span *visual, uint32_t n_visual,
                               pvl_seq_id *out);

/* Releases the sequence: every block whose refcount drops to zero returns
 * to the pool. Local, but with a communicator call it on every rank (it
 * cannot fail for a live id, so no exchange is needed). */
PVL_API pvl_status pvl_seq_free(pvl_cache *cache, pvl_seq_id seq);

/* Makes a child that shares every block of `parent` (refcounts rise; no
 * data is copied). A later append to either side copies a shared partial
 * last block first (copy-on-write), so writes never leak across the fork.
 * With a communicator: COLLECTIVE (all ranks fork or none). */
PVL_API pvl_status pvl_seq_fork(pvl_cache *cache, pvl_seq_id parent,
                                pvl_seq_id *child);

/* Adds one token slot to every layer of each of the n sequences (the next
 * decode token), taking a new block where a layer's last block is full and
 * copying a shared partial last block (copy-on-write; device copies go on
 * `stream`). All or nothing: if the pool cannot serve the whole batch,
 * returns OUT_OF_BLOCKS and changes nothing. A sequence may appear once.
 * With a communicator: COLLECTIVE; if any rank cannot serve the batch
 * (split by layers, ranks hold different numbers of layers), every rank
 * returns that rank's OUT_OF_BLOCKS and none appends. */
PVL_API pvl_status pvl_seq_append(pvl_cache *cache, const pvl_seq_id *seqs,
                                  uint32_t n, void *stream);

/* Keeps only the `n_keep` slots listed in `keep` (strictly ascending slot
 * indices of this layer) of one layer of a sequence, in their order, and
 * moves them into the fewest blocks: the kept tokens land in slots
 * [0, n_keep). Blocks no longer used return to the pool (or lose a
 * reference, if shared with a fork). Needs transiently at most
 * ceil(n_keep / block_size) free blocks (the moved tail is gathered into
 * fresh blocks, so the move is race-free on a GPU and never writes a block
 * another sequence shares); fails with OUT_OF_BLOCKS otherwise. This is the
 * compaction step of compression, public so a stack with its own scores can
 * use it. The logical positions of the kept tokens are remembered
 * (pvl_seq_positions). n_keep = 0 empties the layer.
 * Split by heads: COLLECTIVE (the tables stay identical on all ranks).
 * Split by layers: local (the layer lives on this rank only). */
PVL_API pvl_status pvl_seq_retain(pvl_cache *cache, pvl_seq_id seq,
                                  uint32_t layer, const uint32_t *keep,
                                  uint32_t n_keep, void *stream);

typedef struct pvl_seq_info {
  uint32_t n_prompt;       /* prompt length at admission */
  uint32_t n_decoded;      /* slots appended since admission (a fork
                              starts from its parent's count) */
  uint32_t position;       /* next logical position: n_prompt + n_decoded */
  uint32_t n_visual_spans; /* spans given at admission */
  uint32_t min_tokens;     /* fewest tokens held by one layer */
  uint32_t max_tokens;     /* most tokens held by one layer */
  uint64_t total_tokens;   /* sum of tokens over layers */
  uint64_t total_blocks;   /* sum of blocks over layers (shared included) */
} pvl_seq_info;

PVL_API pvl_status pvl_seq_get_info(const pvl_cache *cache, pvl_seq_id seq,
                                    pvl_seq_info *out);

/* Tokens (slots) and blocks of one layer of a sequence. */
PVL_API pvl_status pvl_seq_layer_size(const pvl_cache *cache, pvl_seq_id seq,
                                      uint32_t layer, uint32_t *n_tokens,
                                      uint32_t *n_blocks);

/* Copies the block ids of one layer (in table order) into ids[0..cap);
 * *n receives the table's block count. CAPACITY if cap is too small. */
PVL_API pvl_status pvl_seq_blocks(const pvl_cache *cache, pvl_seq_id seq,
                                  uint32_t layer, int32_t *ids, uint32_t cap,
                                  uint32_t *n);

/* Copies the logical position of every slot of one layer into
 * pos[0..cap) (slot i of an uncompressed layer is position i).
 * CAPACITY if cap < the layer's token count. */
PVL_API pvl_status pvl_seq_positions(const pvl_cache *cache, pvl_seq_id seq,
                                     uint32_t layer, uint32_t *pos,
                                     uint32_t cap, uint32_t *n);

/* The visual spans given at admission into spans[0..cap); CAPACITY if cap
 * is smaller than their number. */
PVL_API pvl_status pvl_seq_visual_spans(const pvl_cache *cache,
                                        pvl_seq_id seq, pvl_span *spans,
                                        uint32_t cap, uint32_t *n);

/* ------------------------------------------------------------------------ */
/* Scheduler queries (what vLLM's scheduler asks its block manager)          */
/* ------------------------------------------------------------------------ */

typedef enum pvl_admit {
  PVL_ADMIT_OK = 0,    /* enough free blocks now */
  PVL_ADMIT_LATER = 1, /* fits the pool, but not its free blocks now, or
                          max_seqs sequences are live */
  PVL_ADMIT_NEVER = 2  /* larger than the whole pool */
} pvl_admit;

/* Whether pvl_seq_add(n_prompt) would find its blocks. With a
 * communicator: COLLECTIVE, the worst answer over the ranks (NEVER over
 * LATER over OK), so a scheduler that admits on OK finds pvl_seq_add
 * succeed on every rank. */
PVL_API pvl_status pvl_can_add(const pvl_cache *cache, uint32_t n_prompt,
                               pvl_admit *out);

/* Blocks pvl_seq_add(n_prompt) reserves: num_layers * ceil(n/block_size);
 * n_prompt = 0 is INVALID_ARGUMENT, as for pvl_seq_add. Local: this rank's
 * layers (pvl_blocks_for_append too). */
PVL_API pvl_status pvl_blocks_for_prompt(const pvl_cache *cache,
                                         uint32_t n_prompt, uint64_t *out);

/* Free blocks the next pvl_seq_append of these sequences needs at once:
 * new blocks plus copy-on-write copies. A sequence and its fork in one
 * batch both copy their shared last block (the original is then freed), so
 * this is the gross count, which is what the append checks. Rejects unknown
 * and duplicate ids as the append does. */
PVL_API pvl_status pvl_blocks_for_append(const pvl_cache *cache,
                                         const pvl_seq_id *seqs, uint32_t n,
                                         uint64_t *out);

/* ------------------------------------------------------------------------ */
/* Statistics                                                               */
/* ------------------------------------------------------------------------ */

typedef struct pvl_stats {
  uint32_t num_blocks;    /* pool size */
  uint32_t free_blocks;   /* on the free list */
  uint32_t used_blocks;   /* refcount >= 1 */
  uint32_t shared_blocks; /* refcount >= 2 */
  uint32_t num_seqs;      /* live sequences */
  uint64_t tokens;        /* slots over all (sequence, layer) tables */
  uint64_t block_bytes;   /* bytes of one block */
  uint64_t pool_bytes;    /* bytes of the pool's storage */
} pvl_stats;

PVL_API pvl_status pvl_cache_get_stats(const pvl_cache *cache,
                                       pvl_stats *out);

/* Tokens held per layer, summed over live sequences: out[0..num_layers). */
PVL_API pvl_status pvl_cache_layer_tokens(const pvl_cache *cache,
                                          uint64_t *out, uint32_t n_layers);

/* ------------------------------------------------------------------------ */
/* K/V data                                                                 */
/* ------------------------------------------------------------------------ */

/* Writes n tokens into slots [first, first + n) of one layer of a sequence.
 * k and v are [n][num_kv_heads][head_dim] in the cache dtype (token-major,
 * as a K/V projection produces them; K after RoPE). Writing into a block
 * shared with a fork is refused (BAD_STATE): shared blocks are read-only.
 * Values are stored as given, Inf and NaN included (see the conventions at
 * the top for what the readers do with them). */
PVL_API pvl_status pvl_kv_write(pvl_cache *cache, pvl_seq_id seq,
                                uint32_t layer, uint32_t first, uint32_t n,
                                const void *k, const void *v, void *stream);

/* Reads slots [first, first + n) of one layer back into k and v, with the
 * layout pvl_kv_write takes. */
PVL_API pvl_status pvl_kv_read(const pvl_cache *cache, pvl_seq_id seq,
                               uint32_t layer, uint32_t first, uint32_t n,
                               void *k, void *v, void *stream);

/* ------------------------------------------------------------------------ */
/* Batch plans and decode attention                                         */
/* ------------------------------------------------------------------------ */

/* A batch plan: for one decode step, the per-layer page tables of a batch,
 * as arrays the kernels read. Its buffers have a fixed capacity (a CUDA
 * graph can capture a step) and stay resident: pvl_plan_build sends only
 * what changed since the previous build. */
typedef struct pvl_plan pvl_plan;

/* Makes a plan for batches of at most max_seqs sequences (1..max_seqs of
 * the cache). `block_capacity` is the number of block-id entries the plan's
 * tables may hold, all layers together, rows' slack included (on CUDA: 4
 * bytes of device memory each). 0 picks num_blocks * 5/4 + 4 * num_layers *
 * max_seqs, which holds any batch that does not share blocks. A build that
 * needs more fails with CAPACITY and leaves the plan as it was. */
PVL_API pvl_status pvl_plan_create(pvl_cache *cache, uint32_t max_seqs,
                                   uint64_t block_capacity, pvl_plan **out);

/* NULL is accepted. */
PVL_API pvl_status pvl_plan_destroy(pvl_plan *plan);

/* Points the plan at `seqs` (n <= max_seqs, each once) as they are now.
 * Sequence i of the batch is row i of every layer's table. Call it after
 * pvl_seq_append (and after any retain or fork) and before the step's
 * kernels. The device copy of the changes goes on `stream`.
 * Each row holds its block ids in a region of the plan's id array, with
 * slack; a row that outgrows its region takes the free space after it, or
 * moves (its ids are sent again) into a free region, such as one a moved
 * row left. Only when no free region is long enough is the whole batch
 * laid out again (pvl_plan_info.full_rebuilds). */
PVL_API pvl_status pvl_plan_build(pvl_plan *plan, const pvl_seq_id *seqs,
                                  uint32_t n, void *stream);

typedef struct pvl_plan_info {
  uint32_t n_seqs;          /* batch of the last build */
  uint32_t max_seqs;
  uint64_t block_capacity;  /* block-id entries, all layers together */
  uint64_t last_update_bytes; /* bytes sent by the last build */
  uint64_t last_update_entries; /* entries changed by the last build */
  uint64_t full_rebuilds;       /* builds that rewrote the plan whole:
                                   the last resort, when the free space
                                   is too fragmented for a row that
                                   outgrew its region */
} pvl_plan_info;

PVL_API pvl_status pvl_plan_get_info(const pvl_plan *plan,
                                     pvl_plan_info *out);

/* Writes the newest token of every sequence of the plan into layer
 * `layer`: row b's token goes into the layer's last slot, which must be
 * the slot of sequence b's newest position (pvl_seq_info.position - 1), as
 * after pvl_seq_append. k and v are [n_seqs][num_kv_heads][head_dim]. One
 * launch for the whole batch. Values are stored as given, Inf and NaN
 * included. Fails with BAD_STATE and writes nothing if the plan was never
 * built or is stale (a batch member appended, retained, compacted or freed
 * since pvl_plan_build), or if for some row the layer
 * - is empty (pvl_seq_retain with n_keep = 0),
 * - ends with an older position: a retain, pvl_compress or pvl_decode_cap
 *   dropped the newest slot, and writing there would overwrite a kept
 *   token. The message names the row, the sequence and both positions.
 *   pvl_seq_append gives the next token a slot of its own (so cap, then
 *   append, then write works); pvl_kv_write writes any slot by index;
 * - ends in a block shared with a fork (append first: it copies it).
 * Host cost O(1) when no row of the plan has such a layer and no block is
 * shared, else O(batch). */
PVL_API pvl_status pvl_plan_kv_write(pvl_plan *plan, uint32_t layer,
                                     const void *k, const void *v,
                                     void *stream);

/* Decode attention of layer `layer` for every sequence of the plan:
 * out[b][h] = softmax(q[b][h] . K^T * scale) V over the layer's slots of
 * sequence b, query head h reading KV head h / (num_q_heads/num_kv_heads).
 * q and out are [n_seqs][num_q_heads][head_dim] in the cache dtype; fp32
 * accumulation. scale = 0 means 1/sqrt(head_dim); otherwise it must be
 * finite and > 0. A layer with no tokens yields zeros. q.k overflowing
 * float (finite f32 or bf16 inputs can) or Inf/NaN in q, K or V is not an
 * error: PVL_SUCCESS, and only the outputs (sequence, head) that read such
 * a logit or value are non-finite (all NaN when the softmax is undefined);
 * see the conventions at the top. Fails with BAD_STATE and writes nothing
 * if the plan was never built (a built empty batch is fine: nothing to do)
 * or is stale (see pvl_plan_kv_write). */
PVL_API pvl_status pvl_attention_decode(pvl_plan *plan, uint32_t layer,
                                        const void *q, void *out, float scale,
                                        void *stream);

/* ------------------------------------------------------------------------ */
/* Compression: policies, observation, compress                             */
/* ------------------------------------------------------------------------ */
/*
 * A policy is a budget allocator (how many prompt tokens each layer keeps) x
 * a scorer (which ones). VL-Cache (Tu et al., ICLR 2025, arXiv 2410.23317)
 * is the sparsity-aware allocator x the post-vision scorer; the baselines
 * follow kvpress's conventions so numbers are comparable.
 *
 * Flow for one request, after pvl_seq_add:
 *   1. pvl_policy_rows(policy, cache, seq, &first, &n) says which prompt
 *      queries the policy needs (VL-Cache: the post-vision window; H2O: all
 *      of them; SnapKV/PyramidKV: the last snap_window; others: none).
 *   2. For each layer, once its K is written: pvl_observe(cache, seq, layer,
 *      q, first, n, ...) with those query rows (after RoPE). It computes,
 *      blockwise from the cached K and without materializing attention, the
 *      layer's threshold counts (Eq. 1-2) and per-key attention sums.
 *      Observing in several chunks of rows accumulates.
 *   3. pvl_compress(cache, seq, policy, &report, stream): budgets for all
 *      layers, selection per layer, compaction; emptied blocks return to the
 *      pool at once.
 *
 * Formulas (notation of docs/design.md section 5: prompt length m, L layers,
 * keep ratio alpha, H query heads, window rows i at positions P_i):
 * - Attention of a row: A_ij = softmax_j(scale * q_i . k_j) over the keys
 *   the row sees (key position <= P_i: causal), per query head.
 * - Eq. 1: an entry counts as kept iff A_ij >= p * max_j A_ij, evaluated on
 *   logits as s_ij >= max_j s_ij + ln p.
 * - Eq. 2: gamma_{l,h} = (entries below the threshold) / (causal entries of
 *   the observed rows); gamma_l = mean over heads; density d_l = 1 - gamma_l.
 * - Algorithm 1 (VL-Cache budgets): Z = sum_l d_l; beta_l = clip(d_l / Z *
 *   alpha * L, min_layer_ratio, 1); k_l = round(beta_l * m), round half
 *   up, and at least 1. Z = 0 gives beta_l = alpha. The paper does not hand
 *   clipped budget to other layers, so the realised total drifts from
 *   alpha * L * m; the report gives the realised ratio.
 *   renormalize = 1: water-filling instead. With T = round(alpha * L * m)
 *   clamped to [L * lo, L * m] and lo = max(1, ceil(min_layer_ratio * m)),
 *   find lambda with sum_l clip(lambda * d_l * m, lo, m) = T, floor each
 *   term and give the remaining units one each to the largest fractional
 *   parts (ties: lower layer first) below m, so sum_l k_l = T exactly.
 *   Layers of density 0 get lo, and more only if the others are all at m
 *   (then the rest is spread evenly over them).
 * - Uniform budgets (streaming, h2o, snapkv): k_l = max(1, round(alpha*m)).
 * - PyramidKV budgets (kvpress): w = snap_window, C = alpha * m,
 *   lo = C / beta, hi = 2C - lo; if hi >= m - w then hi = m - w and
 *   lo = 2C - hi; unless m >= hi >= lo >= w (else uniform), k_l =
 *   round(hi - l * (hi - lo) / (L - 1)).
 * - Scores (one ranking per layer, shared by its KV heads: a block holds all
 *   of a layer's heads, so a layer keeps one set of tokens; kvpress ranks
 *   per KV head instead):
 *     vlcache:  s_j = sum over observed rows and all heads of A_ij;
 *     h2o:      s_j = (sum over rows and heads of A_ij) / (rows that see j)
 *               (kvpress ObservedAttention), rows = all prompt queries;
 *     snapkv, pyramidkv: mean over the window rows, then a 1-D average pool
 *               of width pool_kernel with zero padding (count_include_pad,
 *               as torch's avg_pool1d), over the keys before the window.
 *   Visual and text keys compete in one ranking.
 * - Selection of k_l prompt tokens: the most recent r_l = ceil(recent_ratio
 *   * k_l) prompt tokens always (snapkv/pyramidkv: at least the window),
 *   then the top scores among the rest; ties break toward the later
 *   position; kept tokens keep their order and logical positions.
 *   streaming: the first min(sink_tokens, k_l) tokens and the most recent
 *   rest. full: everything (its budget is m; pvl_policy_select refuses a
 *   smaller one). Tokens appended by decode are never candidates
 *   of pvl_compress: they stay.
 * - No visual span (or none with a prompt token after it): the window
 *   falls back to the last min(fallback_window, m) prompt tokens
 *   (SnapKV-like), and the report says so.
 */

typedef enum pvl_policy_kind {
  PVL_POLICY_FULL = 0,
  PVL_POLICY_STREAMING = 1,
  PVL_POLICY_H2O = 2,
  PVL_POLICY_SNAPKV = 3,
  PVL_POLICY_PYRAMIDKV = 4,
  PVL_POLICY_VLCACHE = 5
} pvl_policy_kind;

typedef struct pvl_policy {
  size_t size;             /* sizeof(pvl_policy), set by pvl_policy_init */
  pvl_policy_kind kind;
  float keep_ratio;        /* alpha, in (0, 1]; default 0.1 */
  float threshold;         /* p of Eq. 1, in (0, 1); default 0.01 */
  float min_layer_ratio;   /* clip floor of beta_l, in (0, 1]; 0.01 */
  float recent_ratio;      /* forced recent share of k_l, [0, 1]; 0.1 */
  uint32_t window_cap;     /* post-vision rows at most (the last ones);
                              0 = all; default 0 */
  uint32_t fallback_window;/* rows when there is no post-vision window;
                              default 32 */
  uint32_t renormalize;    /* 1 = water-filling budgets; default 0 */
  uint32_t sink_tokens;    /* streaming sinks; default 4 */
  uint32_t snap_window;    /* snapkv/pyramidkv window; default 32 */
  uint32_t pool_kernel;    /* snapkv/pyramidkv pooling width (odd); 5 */
  float pyramid_beta;      /* pyramidkv shape, >= 1; default 20 */
  uint32_t decode_cap;     /* beyond the paper: tokens per layer during
                              decode before pvl_decode_cap recompresses;
                              0 = off (default) */
  uint32_t decode_cap_slack; /* recompress down to decode_cap - slack;
                              default 0 = decode_cap / 8 */
} pvl_policy;

/* Fills `policy` with the defaults of `kind` (the paper's VL-Cache setup
 * for PVL_POLICY_VLCACHE: alpha 0.1, p 0.01, clip 0.01, recent 10 %). */
PVL_API pvl_status pvl_policy_init(pvl_policy *policy, pvl_policy_kind kind);

/* Short lowercase name ("vlcache", "h2o", ...); NULL for an unknown kind.
 * pvl_policy_parse is the reverse (INVALID_ARGUMENT for unknown names). */
PVL_API const char *pvl_policy_name(pvl_policy_kind kind);
PVL_API pvl_status pvl_policy_parse(const char *name, pvl_policy_kind *out);

/* Budgets k_l of every layer for a prompt of m tokens: budgets[0..L).
 * `density` (d_l in [0, 1], L values) is read by VL-Cache only and may be
 * NULL for the other policies. Pure function of its arguments. */
PVL_API pvl_status pvl_policy_budgets(const pvl_policy *policy,
                                      uint32_t num_layers, uint32_t m,
                                      const float *density,
                                      uint32_t *budgets);

/* Turns raw per-key attention sums into the policy's ranking scores (see
 * the formulas above): raw[j] = sum over rows and heads of A_ij, seen[j] =
 * rows that see key j, n_rows = rows observed. out[0..m). For snapkv and
 * pyramidkv the keys of the window get +infinity (always kept). A raw value
 * that is not finite is INVALID_ARGUMENT, and out is then not written. */
PVL_API pvl_status pvl_policy_scores(const pvl_policy *policy, uint32_t m,
                                     const float *raw, const uint32_t *seen,
                                     uint32_t n_rows, float *out);

/* Selects `budget` of m candidates (positions 0..m-1, in order) by the
 * policy's rule: keep[0..*n_keep) strictly ascending, *n_keep =
 * min(budget, m). `scores` (m values) is ignored by full and streaming
 * and may then be NULL; a NaN score is INVALID_ARGUMENT (+-Inf rank as the
 * largest and smallest scores). */
PVL_API pvl_status pvl_policy_select(const pvl_policy *policy, uint32_t m,
                                     uint32_t budget, const float *scores,
                                     uint32_t *keep, uint32_t *n_keep);

/* The prompt query rows the policy observes for this sequence: positions
 * [*first, *first + *n). *fallback = 1 when VL-Cache had no post-vision
 * window and used the last fallback_window tokens instead. Takes a cache,
 * so its failures are recorded there (pvl_cache_last_error), not in
 * pvl_create_last_error as the other pvl_policy_* functions'. */
PVL_API pvl_status pvl_policy_rows(const pvl_policy *policy,
                                   const pvl_cache *cache, pvl_seq_id seq,
                                   uint32_t *first, uint32_t *n,
                                   uint32_t *fallback);

/* Observes n_rows query rows of one layer of a sequence: q is
 * [n_rows][num_q_heads][head_dim] in the cache dtype (after RoPE), row i
 * being the query of logical position first_pos + i. Rows are queries of
 * tokens the sequence has: first_pos + n_rows <= its next logical position
 * (pvl_seq_info.position: the prompt and the decode tokens appended so
 * far), else INVALID_ARGUMENT. A row sees the keys of the layer whose
 * logical position is <= its own. Computes blockwise, in
 * two passes over the keys (row max and sum of exponentials, then
 * probabilities, per-key sums and threshold counts), never a rows x keys
 * matrix. Accumulates into the layer's observation, which pvl_compress
 * consumes; an observation is dropped when the layer changes (append,
 * retain) before it is used. threshold is the policy's p; scale as in
 * pvl_attention_decode (0 = 1/sqrt(head_dim)). Non-finite values: the CPU
 * backend refuses a q holding Inf or NaN (INVALID_ARGUMENT naming the row
 * and head; nothing accumulated); Inf/NaN in the layer's K, a logit that
 * overflows float, or (CUDA) a non-finite q leave non-finite per-key sums,
 * which pvl_compress and pvl_decode_cap refuse (see the conventions).
 * CPU: the call uses up to PVL_CPU_THREADS threads (an environment variable
 * read at cache creation; default min(2, online CPUs)), started and joined
 * within the call, and the widest of its generic, AVX2 and AVX-512 code the
 * CPU runs (PVL_CPU_ISA = generic or avx2 lowers it); the result is
 * bit-identical for every thread count and ISA.
 * CUDA: the call queues its work on `stream` and returns without waiting
 * for the device; the sums stay there until pvl_compress (all layers, one
 * wait), pvl_decode_cap or pvl_seq_observation reads them, so a whole
 * prefill can be queued without a round trip per layer. */
PVL_API pvl_status pvl_observe(pvl_cache *cache, pvl_seq_id seq,
                               uint32_t layer, const void *q,
                               uint32_t first_pos, uint32_t n_rows,
                               float threshold, float scale, void *stream);

/* What the layer's observation holds: sparsity gamma_{l,h} per query head
 * (gamma[0..num_q_heads), may be NULL), gamma_l (mean over heads), raw
 * per-key sums raw[0..cap) and seen counts seen[0..cap) (either may be NULL
 * when cap = 0), *n_keys = keys covered, *n_rows = rows observed.
 * BAD_STATE if the layer has no valid observation. A non-finite
 * observation is returned as it is (raw holds its Inf or NaN). */
PVL_API pvl_status pvl_seq_observation(const pvl_cache *cache,
                                       pvl_seq_id seq, uint32_t layer,
                                       float *gamma, float *gamma_layer,
                                       float *raw, uint32_t *seen,
                                       uint32_t cap, uint32_t *n_keys,
                                       uint32_t *n_rows);

typedef struct pvl_compress_report {
  /* Caller-provided arrays of num_layers entries, or NULL. */
  uint32_t *budget;   /* k_l */
  uint32_t *kept;     /* prompt tokens kept per layer (= min(k_l, m)) */
  float *density;     /* d_l used (VL-Cache), else 1 */
  /* Filled by the call. */
  uint32_t n_prompt;       /* m */
  uint32_t window_first;   /* observed rows, as pvl_policy_rows */
  uint32_t window_rows;
  uint32_t window_fallback;/* 1: no post-vision window, fell back */
  uint64_t kept_total;     /* sum of kept prompt tokens over layers */
  /* Block counts, all layers together. The sequence's own saving is
   * blocks_before - blocks_after. The pool's free count changes by
   * blocks_freed - blocks_taken, which is the same number unless blocks are
   * shared with a fork (a shared block leaves the sequence but stays in
   * use by the fork, so it is not freed). Example: a 76-block prompt whose
   * kept tokens are all gathered into 8 fresh blocks reports before 76,
   * after 8, freed 76, taken 8: the pool gains 68 = 76 - 8 free blocks. */
  uint32_t blocks_before;  /* blocks in the sequence's tables before */
  uint32_t blocks_after;   /* blocks in its tables after */
  uint32_t blocks_freed;   /* blocks that went back on the pool's free list
                              (refcount reached 0), fresh ones excluded */
  double keep_ratio;       /* realised: kept_total / (L * m) */
  uint32_t blocks_taken;   /* fresh blocks taken from the pool to gather
                              the moved kept tokens into (compaction never
                              moves tokens in place); they are part of
                              blocks_after */
} pvl_compress_report;

/* Compresses the prompt of a sequence by `policy`: budgets from the
 * observed densities (VL-Cache), a selection per layer from the observed
 * scores (every layer must have been observed with pvl_observe, except
 * for full and streaming: else BAD_STATE), then compaction of every layer
 * (pvl_seq_retain) and release of the emptied blocks. BAD_STATE, changing
 * nothing, for: a sequence compressed before (a sequence is compressed
 * once); a sequence a layer of which was retained by hand (pvl_seq_retain
 * or pvl_decode_cap: its slots are no longer the prompt positions); and,
 * for a scored policy, a layer whose observation holds a non-finite sum
 * (the message names the layer; see the conventions at the top). All
 * layers or none: if a layer cannot be compacted (OUT_OF_BLOCKS:
 * compaction gathers into fresh blocks, at most the final block count)
 * nothing is changed. `report` may be NULL.
 * With a communicator: COLLECTIVE. Split by layers: the per-layer
 * densities of all ranks are gathered, so the budgets equal those of one
 * cache holding every layer; each rank compacts its layers with the
 * budgets of their global indices. Split by heads: the per-key attention
 * sums are summed over ranks and the per-head threshold counts gathered in
 * model head order, so every rank keeps exactly the same tokens (equal to
 * one cache over all heads away from exact score ties: the sums add in
 * another order). The report covers this rank's (local) layers. */
PVL_API pvl_status pvl_compress(pvl_cache *cache, pvl_seq_id seq,
                                const pvl_policy *policy,
                                pvl_compress_report *report, void *stream);

/* Decode-time cap (beyond the paper; needs policy->decode_cap > 0): if
 * layer `layer` of the sequence holds more than decode_cap tokens,
 * recompresses it to decode_cap - slack tokens over all its slots (prompt
 * and decoded), keeping the recent ceil(recent_ratio * budget) and the top
 * scores of the layer's observation (observe the recent decode queries
 * first: BAD_STATE without one, and BAD_STATE, changing nothing, if it
 * holds a non-finite sum). *did = 1 if it recompressed, 0 if the layer was
 * within the cap. Split by heads: COLLECTIVE when the layer
 * exceeds the cap (its length is the same on every rank): the scores are
 * summed over ranks, so all keep the same tokens. Split by layers: local. */
PVL_API pvl_status pvl_decode_cap(pvl_cache *cache, pvl_seq_id seq,
                                  uint32_t layer, const pvl_policy *policy,
                                  uint32_t *did, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* PAGEDVL_H */
