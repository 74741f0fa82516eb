/* Internal types of libpagedvl: the cache, its pool, page tables, sequences,
 * plans and the backend interface. Included by every libpagedvl/ module;
 * never installed. */
#ifndef PVL_INTERNAL_H
#define PVL_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pagedvl.h"
#include "pvl_kernels.h"

#define PVL_INTERNAL __attribute__((visibility("hidden")))

/* ---- allocator seam (alloc.c) ---- */

PVL_INTERNAL const pvl_allocator *pvl__default_allocator(void);
PVL_INTERNAL void *pvl__alloc(const pvl_allocator *a, size_t size);
PVL_INTERNAL void *pvl__alloc_aligned(const pvl_allocator *a, size_t size,
                                      size_t align);
PVL_INTERNAL void pvl__free(const pvl_allocator *a, void *p, size_t size);
PVL_INTERNAL void pvl__free_aligned(const pvl_allocator *a, void *p,
                                    size_t size, size_t align);
/* Grows *p from old_n to new_n elements of elem bytes (alloc, copy, free):
 * on failure *p is untouched and false is returned. */
PVL_INTERNAL bool pvl__grow(const pvl_allocator *a, void **p, size_t elem,
                            size_t old_n, size_t new_n);

/* Overflow-checked size arithmetic. */
static inline bool pvl__mul_ok(size_t a, size_t b, size_t *out) {
  return !__builtin_mul_overflow(a, b, out);
}

/* ---- block pool (pool.c) ---- */

typedef struct pvl_pool {
  uint32_t num_blocks;
  uint32_t num_free;
  uint32_t num_shared; /* blocks with refcount >= 2 (0: no copy-on-write) */
  int32_t *free_stack; /* [num_blocks]; the top num_free entries are free */
  uint32_t *refcount;  /* [num_blocks]; 0 = free */
} pvl_pool;

PVL_INTERNAL pvl_status pvl__pool_init(pvl_pool *p, const pvl_allocator *a,
                                       uint32_t num_blocks);
PVL_INTERNAL void pvl__pool_fini(pvl_pool *p, const pvl_allocator *a);
/* Caller checked num_free > 0. */
PVL_INTERNAL int32_t pvl__pool_alloc(pvl_pool *p);
PVL_INTERNAL void pvl__pool_incref(pvl_pool *p, int32_t block);
/* Drops one reference; the block returns to the free list at zero. Returns
 * false (and changes nothing) for a free or out-of-range block. */
PVL_INTERNAL bool pvl__pool_decref(pvl_pool *p, int32_t block);

/* ---- page table of one (sequence, layer) (table.c) ---- */

typedef struct pvl_table {
  int32_t *blocks;   /* [cap_blocks] */
  uint32_t *pos;     /* NULL: slot i is position i; else [cap_pos] */
  uint32_t n_tokens;
  uint32_t n_blocks; /* ceil(n_tokens / block_size) */
  uint32_t cap_blocks;
  uint32_t cap_pos;
  uint64_t epoch; /* stamped on every change other than an append */
} pvl_table;

/* ---- observations (compress.c) ---- */

/* What pvl_observe accumulated for one (sequence, layer). Valid while the
 * table is unchanged (same epoch and token count). */
typedef struct pvl_obs {
  uint64_t epoch;
  uint32_t n_keys; /* the table's n_tokens when observed */
  uint32_t n_rows;
  double *raw;     /* [n_keys] sum over rows and heads of A_ij */
  uint32_t *seen;  /* [n_keys] rows that saw key j */
  uint64_t *below; /* [num_q_heads] entries under the Eq. 1 threshold */
  uint64_t *total; /* [num_q_heads] causal entries */
  void *dev;       /* backend-private: the sums kept on the device (CUDA,
                      from the first pvl_observe on), or NULL */
  bool stale;      /* raw/seen/below/total lag `dev`: fetch before reading
                      them (pvl__obs_fetch) */
} pvl_obs;

/* ---- sequences (seq.c) ---- */

typedef struct pvl_seq {
  pvl_seq_id id;
  uint32_t n_prompt;
  uint32_t n_decoded;
  uint32_t n_spans;
  pvl_span *spans;
  pvl_table *tables; /* [num_layers] */
  uint64_t mark;     /* duplicate detection within one batch call */
  uint64_t version;  /* stamped when any table's block list or base
                        (tokens - n_decoded) changes: plans skip sequences
                        whose version they already hold */
  pvl_obs **obs;     /* [num_layers] or NULL; entries NULL until observed */
  uint32_t n_old_tail; /* layers whose last slot is not the newest position
                          (pvl__tail_old): plans refuse to write them */
  bool compressed;   /* pvl_compress ran */
} pvl_seq;

/* Whether the last slot of t is not the slot of the sequence's newest
 * position n_prompt + n_decoded - 1: an empty layer, or one whose newest
 * slot a retain dropped. An append makes it false again (its slot gets the
 * new newest position); only a retain can make it true. */
static inline bool pvl__tail_old(const pvl_seq *s, const pvl_table *t) {
  if (t->n_tokens == 0) return true;
  const uint32_t last = t->pos ? t->pos[t->n_tokens - 1] : t->n_tokens - 1;
  return last != s->n_prompt + s->n_decoded - 1;
}

/* Compaction in two steps, so pvl_compress can prepare every layer (and
 * fail) before it changes any. */
typedef struct pvl_retain_prep {
  uint32_t *new_pos; /* position map to install, or NULL (identity) */
  uint32_t cap_pos;
  uint32_t n_stay;   /* leading blocks kept in place */
  uint32_t n_new;    /* fresh blocks the gather fills */
  uint32_t n_freed;  /* blocks returned to the free list at commit */
} pvl_retain_prep;

PVL_INTERNAL pvl_status pvl__retain_prepare(pvl_cache *c, pvl_table *t,
                                            const uint32_t *keep,
                                            uint32_t n_keep,
                                            pvl_retain_prep *prep,
                                            const char *fn);
/* Consumes prep (also on failure). Fails only if the pool is short or the
 * backend's gather fails; the table is then unchanged. */
PVL_INTERNAL pvl_status pvl__retain_commit(pvl_cache *c, pvl_seq *s,
                                           uint32_t layer,
                                           const uint32_t *keep,
                                           uint32_t n_keep,
                                           pvl_retain_prep *prep,
                                           void *stream, const char *fn);
PVL_INTERNAL void pvl__retain_abort(pvl_cache *c, pvl_retain_prep *prep);
PVL_INTERNAL void pvl__obs_drop(pvl_cache *c, pvl_seq *s, uint32_t layer);
/* Brings the host arrays of obs[0..n) (NULL entries skipped) up to date
 * with sums the backend keeps on the device; records the error under fn. */
PVL_INTERNAL pvl_status pvl__obs_fetch(pvl_cache *c, pvl_obs *const *obs,
                                       uint32_t n, void *stream,
                                       const char *fn);
PVL_INTERNAL void pvl__obs_free_all(pvl_cache *c, pvl_seq *s);

/* ---- policies (policy.c) ---- */

PVL_INTERNAL pvl_status pvl__policy_check(const pvl_cache *c,
                                          const pvl_policy *p,
                                          const char *fn);
PVL_INTERNAL uint32_t pvl__policy_recent(const pvl_policy *p, uint32_t m,
                                         uint32_t k);
/* keep[0..min(k, m)) ascending; scores unchecked. NO_MEMORY only. */
PVL_INTERNAL pvl_status pvl__select(const pvl_allocator *a,
                                    const pvl_policy *p, uint32_t m,
                                    uint32_t k, const float *scores,
                                    uint32_t *keep);
/* The k best of scores[0..n) (higher first, ties: later index) written
 * ascending to out[0..k). NO_MEMORY only. */
PVL_INTERNAL pvl_status pvl__top(const pvl_allocator *a, const float *scores,
                                 uint32_t n, uint32_t k, uint32_t *out);
PVL_INTERNAL void pvl__policy_rows(const pvl_policy *p, uint32_t m,
                                   const pvl_span *spans, uint32_t n_spans,
                                   uint32_t *first, uint32_t *n,
                                   uint32_t *fallback);

/* ---- backend (backend_cpu.c, backend_cuda.c) ---- */

typedef struct pvl_backend_ops {
  const char *name;
  /* Allocates the pool storage (cache->storage) for cache->cfg.num_blocks
   * blocks, deriving num_blocks first if it is 0. */
  pvl_status (*init)(pvl_cache *c);
  /* 1 if a cache could be created on `device` (no shape checks). */
  int (*available)(int32_t device);
  void (*fini)(pvl_cache *c);
  /* Copy-on-write: block dst[i] <- src[i] for i < n (host arrays). */
  pvl_status (*copy_blocks)(pvl_cache *c, const int32_t *src,
                            const int32_t *dst, uint32_t n, void *stream);
  /* Compaction: token i -> block dst_blocks[i / bs] offset i % bs, from pool
   * slot src_slots[i] (host arrays). */
  pvl_status (*gather)(pvl_cache *c, const int64_t *src_slots,
                       const int32_t *dst_blocks, uint32_t n, void *stream);
  /* kv_write / kv_read over a table range (host block-id array). */
  pvl_status (*write_range)(pvl_cache *c, const int32_t *blocks,
                            uint32_t first, uint32_t n, const void *k,
                            const void *v, void *stream);
  pvl_status (*read_range)(const pvl_cache *c, const int32_t *blocks,
                           uint32_t first, uint32_t n, void *k, void *v,
                           void *stream);
  /* Plan device buffers: allocate/free, apply (index, value) pairs. */
  pvl_status (*plan_init)(pvl_plan *p);
  void (*plan_fini)(pvl_plan *p);
  pvl_status (*plan_upload)(pvl_plan *p, const int32_t *pairs, uint32_t n,
                            void *stream);
  pvl_status (*plan_kv_write)(pvl_plan *p, uint32_t layer, const void *k,
                              const void *v, void *stream);
  pvl_status (*attention)(pvl_plan *p, uint32_t layer, const void *q,
                          void *out, float scale, void *stream);
  /* Accumulates the observation of n_rows query rows (positions first_pos
   * + i) over the table's keys (positions t->pos or identity) into obs. */
  pvl_status (*observe)(pvl_cache *c, const pvl_table *t, const void *q,
                        uint32_t first_pos, uint32_t n_rows, float scale,
                        float log_p, pvl_obs *obs, void *stream);
  /* A backend that keeps the sums on the device (obs->dev, obs->stale set
   * by observe, so observe need not wait for the device) fetches them into
   * the host arrays of every stale obs[i] (NULL entries skipped) and
   * returns when they are there; obs_release frees obs->dev without
   * waiting. Both NULL on the CPU, which sums into the host arrays. */
  pvl_status (*obs_fetch)(pvl_cache *c, pvl_obs *const *obs, uint32_t n,
                          void *stream);
  void (*obs_release)(pvl_cache *c, pvl_obs *o);
  /* Segmented top-k (pvl_compress, all layers at once):
   * segment i holds scores[seg_off[i] .. seg_off[i + 1]); its n_top[i]
   * best (ties: later index) go ascending to keep[keep_off[i] ..]. Host
   * arrays in and out; returns when keep is filled. */
  pvl_status (*select_top)(pvl_cache *c, const float *scores,
                           const int32_t *seg_off, const int32_t *n_top,
                           const int32_t *keep_off, uint32_t n_seg,
                           uint32_t total, int32_t *keep,
                           uint32_t total_keep, void *stream);
} pvl_backend_ops;

PVL_INTERNAL extern const pvl_backend_ops pvl__cpu_backend;
/* NULL when the library was built without CUDA. */
PVL_INTERNAL const pvl_backend_ops *pvl__cuda_backend(void);
/* Whether the CUDA kernels run on a device of compute capability
 * major.minor (they need sm_80: cp.async, bf16 conversions). If not and
 * why is not NULL, the reason (capability found and needed) goes there.
 * Pure, so the CPU build tests it (cache.c). */
PVL_INTERNAL bool pvl__cuda_arch_supported(int major, int minor, char *why,
                                           size_t why_len);

/* ---- communicators (comm.c, comm_nccl.c) ---- */

/* Collectives on host buffers. There is one primitive, all-gather: sums
 * over ranks are computed by every rank from the gathered terms, in rank
 * order, so they are bit-identical on every rank whatever reduction
 * algorithm NCCL would pick. `tag` names the exchange (the library call and
 * its step, see dist.c) so the in-process communicator can report ranks
 * that call collectives out of order. Failures write `msg`. */
typedef struct pvl_comm_ops {
  const char *name;
  /* out[r * bytes .. (r + 1) * bytes) = rank r's in[0..bytes). */
  pvl_status (*allgather)(pvl_comm *m, const void *in, void *out,
                          size_t bytes, uint32_t tag, char *msg,
                          size_t msg_len);
  /* Makes room for exchanges of `bytes` per rank (NCCL: device scratch),
   * called before the agreement that precedes such an exchange so that a
   * failure here is one every rank hears of; NULL = nothing to reserve. */
  pvl_status (*reserve)(pvl_comm *m, size_t bytes, char *msg,
                        size_t msg_len);
  void (*destroy)(pvl_comm *m);
} pvl_comm_ops;

struct pvl_comm {
  const pvl_comm_ops *ops;
  int32_t rank;
  int32_t size;
  int32_t device; /* CUDA device of an NCCL communicator, -1 in-process */
  void *impl;
};

/* Name of the library call an exchange tag belongs to (dist.c). */
PVL_INTERNAL const char *pvl__dist_tag_name(uint32_t tag);

/* ---- split caches (dist.c) ---- */

/* Calls that run collectives (tag = call << 8 | step). */
enum {
  PVL_CALL_CREATE = 1,
  PVL_CALL_SEQ_ADD,
  PVL_CALL_SEQ_FORK,
  PVL_CALL_SEQ_APPEND,
  PVL_CALL_SEQ_RETAIN,
  PVL_CALL_CAN_ADD,
  PVL_CALL_COMPRESS,
  PVL_CALL_DECODE_CAP,
  PVL_CALL_COUNT_
};

/* A cache's place in a split model. */
typedef struct pvl_dist {
  pvl_comm *comm;
  pvl_split split;
  uint32_t nranks;
  uint32_t rank;
  uint32_t model_layers;   /* layers of the model */
  uint32_t model_q_heads;  /* query heads of the model */
  uint32_t group;          /* query heads per KV head */
  uint32_t *begin;         /* [nranks] first layer (LAYERS) or KV head
                              (HEADS) of each rank */
  uint32_t *count;         /* [nranks] */
  uint32_t max_count;
  /* The collective call in progress: pvl__dist_begin .. pvl__dist_end. */
  uint32_t call;
  uint32_t step;    /* exchanges made so far in this call */
  bool settled;     /* an exchange already made every rank fail */
  uint64_t seq;     /* collective calls made on this cache */
} pvl_dist;

/* Statistics of every rank combined, for pvl_compress (see dist.c). */
typedef struct pvl_dist_stats {
  pvl_obs **obs;       /* HEADS: [num_layers] combined observations
                          (summed raw, model-order head counts), else NULL:
                          use the sequence's own */
  float *density_all;  /* LAYERS: d_l of every model layer, else NULL */
  void *mem;           /* one allocation behind the arrays */
  size_t bytes;
} pvl_dist_stats;

struct pvl_cache;
/* pvl_cache_create with cfg->comm set: resolves the rank's range, makes
 * the local cache with `make`, and agrees with the other ranks. */
PVL_INTERNAL pvl_status pvl__dist_cache_create(
    const pvl_config *cfg, pvl_cache **out,
    pvl_status (*make)(const pvl_config *cfg, pvl_cache **out));
PVL_INTERNAL void pvl__dist_free(pvl_cache *c);
/* Brackets a collective call (no-ops for a single-rank cache, and for the
 * local calls of a split, e.g. retain when split by layers). A call whose
 * body fails on this rank before its exchanges are done joins the next
 * one with its failure in pvl__dist_end, so the other ranks fail too. */
PVL_INTERNAL bool pvl__dist_begin(struct pvl_cache *c, uint32_t call);
PVL_INTERNAL pvl_status pvl__dist_end(struct pvl_cache *c, pvl_status st);
/* An agreement point: every rank's status and fingerprint of its
 * arguments. SUCCESS only if all succeeded with equal fingerprints. */
PVL_INTERNAL pvl_status pvl__dist_agree(struct pvl_cache *c, pvl_status st,
                                        uint64_t fp, const char *fn);
/* pvl_compress, after its local checks: combines every rank's statistics
 * (one agreement point, then the data exchanges). Changes nothing of the
 * sequence; release ds with pvl__dist_stats_free (also after a failure). */
PVL_INTERNAL pvl_status pvl__dist_compress_stats(pvl_cache *c,
                                                 const pvl_seq *s,
                                                 const pvl_policy *p,
                                                 pvl_dist_stats *ds,
                                                 const char *fn);
/* Budgets of the local layers: over every model layer when split by
 * layers (the budgets of their global indices), else pvl_policy_budgets. */
PVL_INTERNAL pvl_status pvl__dist_budgets(const pvl_cache *c,
                                          const pvl_dist_stats *ds,
                                          const pvl_policy *p, uint32_t m,
                                          const float *density,
                                          uint32_t *budget);
PVL_INTERNAL void pvl__dist_stats_free(pvl_cache *c, pvl_dist_stats *ds);
/* pvl_decode_cap split by heads: the layer's observation with raw sums
 * added over ranks, into *out (freed with pvl__dist_obs_free). */
PVL_INTERNAL pvl_status pvl__dist_layer_obs(pvl_cache *c, const pvl_obs *o,
                                            pvl_obs **out, const char *fn);
PVL_INTERNAL void pvl__dist_obs_free(pvl_cache *c, pvl_obs *o);
/* gamma_l = mean over the H heads of below / total (Eq. 2), per head into
 * per_head (may be NULL); shared by compress.c and dist.c so a split cache
 * computes it bit for bit as one cache does. */
PVL_INTERNAL double pvl__gamma(const uint64_t *below, const uint64_t *total,
                               uint32_t H, float *per_head);
/* After a successful agreement: *v = the largest of the ranks' values. */
PVL_INTERNAL pvl_status pvl__dist_max_i32(pvl_cache *c, int32_t *v,
                                          const char *fn);
/* 64-bit FNV-1a, to fingerprint arguments that must agree. */
PVL_INTERNAL uint64_t pvl__fp(uint64_t h, const void *p, size_t n);
#define PVL_FP_INIT 0xcbf29ce484222325ull

/* ---- cache (cache.c) ---- */

#define PVL_ERRMSG_LEN 512

struct pvl_cache {
  pvl_config cfg;
  const pvl_allocator *alloc;
  const pvl_backend_ops *be;
  void *be_state; /* backend-private (CUDA: device info, scratch) */
  pvl_kv_geom geom;
  size_t elem_size;
  size_t block_bytes;

  pvl_pool pool;
  void *storage; /* pool storage (host or device) */

  /* Sequence slots: id = (generation << 24) | slot. */
  pvl_seq **slots;        /* [max_seqs], NULL when free */
  uint64_t *slot_gen;     /* [max_seqs] generation of the slot's last id */
  uint32_t *free_slots;   /* [max_seqs] stack */
  uint32_t num_free_slots;
  uint32_t num_seqs;

  uint64_t *layer_tokens; /* [num_layers] tokens held per layer */
  uint64_t epoch_clock;   /* source of pvl_table.epoch stamps */
  uint64_t mark_clock;    /* source of pvl_seq.mark stamps */
  uint64_t mut_clock;     /* bumped by every call that changes a table's
                             blocks or tokens, or frees or adds a sequence:
                             a plan built at the current value is fresh */

  /* Scratch for multi-step calls (append, retain), grown on demand. */
  void *scratch;
  size_t scratch_bytes;

  struct pvl_plan *plans; /* live plans, destroyed with the cache */

  pvl_dist *dist; /* NULL: a single rank (no communicator) */

  char err[PVL_ERRMSG_LEN];
};

/* Records the error message for `c` (may be NULL) and returns `st`. */
PVL_INTERNAL pvl_status pvl__fail(const pvl_cache *c, pvl_status st,
                                  const char *fn, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define PVL_FAIL(c, st, ...) pvl__fail((c), (st), __func__, __VA_ARGS__)
/* Prefixes the recorded message with the public function `fn` (for errors
 * raised inside backends and helpers) and returns `st`. */
PVL_INTERNAL pvl_status pvl__prefix(const pvl_cache *c, pvl_status st,
                                    const char *fn);
#define PVL_PREFIX(c, st) pvl__prefix((c), (st), __func__)

/* Ensures the scratch buffer holds `bytes`; NULL on allocation failure. */
PVL_INTERNAL void *pvl__scratch(pvl_cache *c, size_t bytes);

/* Resolves a seq id; NULL if unknown (no error recorded). */
PVL_INTERNAL pvl_seq *pvl__seq_get(const pvl_cache *c, pvl_seq_id id);
/* Frees every sequence (cache destruction). */
PVL_INTERNAL void pvl__seq_free_all(pvl_cache *c);
/* Resolves a batch of ids, rejecting unknown ids and duplicates; on success
 * out[i] is the sequence of ids[i]. Records the error. */
PVL_INTERNAL pvl_status pvl__seq_resolve_batch(pvl_cache *c,
                                               const pvl_seq_id *ids,
                                               uint32_t n, pvl_seq **out,
                                               const char *fn);

/* ---- plans (plan.c) ---- */

typedef struct pvl_plan_row {
  uint64_t epoch;  /* table epoch when the row was written */
  int32_t offset;  /* start in the id array */
  uint32_t cap;    /* ids reserved for the row */
  uint32_t synced; /* ids of the table already on the device */
  int32_t base;    /* base_len on the device */
  int32_t reg;     /* region descriptor + 1 of [offset, offset + cap);
                      0 = none (cap 0), so a zeroed row owns nothing */
} pvl_plan_row;

/* A region of the plan's id array: one row's ids, or free space. Regions
 * tile [0, block_cap); free ones are never adjacent (merged on free). */
typedef struct pvl_plan_region {
  int32_t off, len;
  int32_t prev, next;   /* neighbours in address order, -1 at the ends */
  int32_t fprev, fnext; /* free regions: the list of their size class;
                           unused descriptors: fnext links the spares */
  int32_t free;
} pvl_plan_region;

/* Size classes of free regions (two levels, as TLSF: the power of two of
 * the length, then 2^PVL_PLAN_SL_LOG subranges of it). */
#define PVL_PLAN_SL_LOG 3
#define PVL_PLAN_SL_N (1 << PVL_PLAN_SL_LOG)
#define PVL_PLAN_FL_N 28 /* lengths < 2^31 */

/* One region change of a build, applied to the row at commit or undone. */
typedef struct pvl_plan_move {
  uint32_t row;  /* b * num_layers + l */
  int32_t reg;   /* descriptor of the row's new region (relocation) or of
                    its grown region (extension) */
  uint32_t len;  /* extension: the region's length before */
  uint8_t grown; /* 1: extended in place, 0: relocated */
  uint8_t same;  /* the row holds the same table as before */
} pvl_plan_move;

struct pvl_plan {
  pvl_cache *cache;
  struct pvl_plan *next; /* cache's list of plans */
  uint32_t max_seqs;
  uint32_t n_seqs;
  uint64_t block_cap;
  pvl_plan_view view;     /* buf is device (or host) memory */
  void *be_state;         /* backend-private (device buffer, workspace) */
  int32_t *host_buf;      /* CPU backend: the plan buffer itself */
  pvl_plan_row *rows;     /* [max_seqs][num_layers], batch row major */
  pvl_seq_id *row_seq;    /* [max_seqs] sequence of each batch row, 0 none */
  uint64_t *row_version;  /* [max_seqs] its version when last written */
  int32_t *n_appended;    /* [max_seqs] as on the device */
  pvl_seq **seqs;         /* [max_seqs] sequences of the last build */
  uint8_t *action;        /* [max_seqs][num_layers] scratch for builds */
  uint8_t *skip;          /* [max_seqs] scratch: row already current */
  uint64_t built_clock;   /* cache->mut_clock at the last build */
  uint32_t old_tail_rows; /* rows of the last build with n_old_tail > 0 */
  bool built;             /* a build has succeeded */
  bool stale;             /* device buffer may disagree: rewrite all */
  /* Allocator of the id array (regions, free lists by size class). */
  pvl_plan_region *regs; /* [regs_cap] descriptors */
  uint32_t regs_cap;
  uint32_t regs_used; /* descriptors in use (free or live regions) */
  uint32_t regs_hw;   /* descriptors ever handed out */
  int32_t regs_spare; /* stack of returned descriptors, -1 empty */
  uint32_t fl_bits;   /* first levels with a non-empty list */
  uint8_t sl_bits[PVL_PLAN_FL_N];
  int32_t heads[PVL_PLAN_FL_N][PVL_PLAN_SL_N];
  pvl_plan_move *moves; /* [moves_cap] scratch of a build */
  uint32_t moves_cap;
  int32_t *pairs;         /* staging (index, value) pairs */
  size_t pairs_cap;       /* in pairs */
  pvl_plan_info info;
};

PVL_INTERNAL void pvl__plan_destroy_all(pvl_cache *c);
/* Verifies a plan's allocator: the regions tile the id array, free ones
 * are merged and listed in their class, every row of the batch owns a
 * region of its cap and no two rows share one. For tests; the first
 * violation goes into msg. */
PVL_INTERNAL pvl_status pvl__plan_check(const pvl_plan *p, char *msg,
                                        size_t msg_len);

/* ---- dtype conversion (dtype.c) ---- */

PVL_INTERNAL float pvl__f16_to_f32(uint16_t h);
PVL_INTERNAL uint16_t pvl__f32_to_f16(float f);
PVL_INTERNAL float pvl__bf16_to_f32(uint16_t h);
PVL_INTERNAL uint16_t pvl__f32_to_bf16(float f);
/* Loads n elements of `dtype` at src into fp32 dst, and the reverse. */
PVL_INTERNAL void pvl__load_f32(pvl_dtype dtype, const void *src, float *dst,
                                size_t n);
PVL_INTERNAL void pvl__store_f32(pvl_dtype dtype, const float *src, void *dst,
                                 size_t n);

/* ---- invariant checks for tests (check.c) ---- */

/* Verifies every invariant of the cache: each block is free XOR referenced
 * exactly refcount times by the live tables; the free list has no
 * duplicates; tables' block counts match their token counts; per-layer
 * token sums match. Writes the first violation into msg. Exported under the
 * internal prefix so tests linking the static library can call it. */
PVL_INTERNAL pvl_status pvl__cache_check(const pvl_cache *c, char *msg,
                                         size_t msg_len);
PVL_INTERNAL uint32_t pvl__block_refcount(const pvl_cache *c, int32_t block);

/* ---- the layout table of pvl_abi_layout (abi.c), for tests ---- */

/* Type i of the table (i < pvl__abi_num_types()): name, sizeof, alignof and
 * field count (0 for enums and scalars); field j of type i in declaration
 * order. INVALID_ARGUMENT past the end. */
PVL_INTERNAL size_t pvl__abi_num_types(void);
PVL_INTERNAL pvl_status pvl__abi_type(size_t i, const char **name,
                                      size_t *size, size_t *align,
                                      size_t *n_fields);
PVL_INTERNAL pvl_status pvl__abi_field(size_t i, size_t j, const char **name,
                                       size_t *offset, size_t *size);

#endif /* PVL_INTERNAL_H */
