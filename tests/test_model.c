/* Model-based random test of the block manager: random add / append / fork
 * / retain / free / write / plan operations run on a cache and on a trivial
 * model (per sequence and layer: tokens, their positions and data tags, and
 * abstract block ids with refcounts). After EVERY step the cache must pass
 * pvl__cache_check and agree with the model on everything observable:
 * statistics, tokens per layer, sequence info, positions, data, and the
 * block sharing structure (a bijection between model and real block ids).
 * A failing operation must change nothing, since the model does not move.
 *
 * PVL_MODEL_OPS scales the operation count (default 100000 for the main
 * run); PVL_TEST_SEED replays a seed. */
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

typedef struct mtab {
  uint32_t n, nb;
  uint32_t *pos; /* [max tokens] logical positions */
  float *tag;    /* [max tokens] data tags (0 = not written yet) */
  int32_t *blk;  /* [max blocks] model block ids */
} mtab;

typedef struct mseq {
  bool live;
  pvl_seq_id id;
  uint32_t n_prompt, n_decoded, n_spans;
  pvl_span spans[3];
  mtab *t; /* [L] */
} mseq;

typedef struct model {
  uint32_t L, bs, NB, MS, max_prompt;
  pvl_cache *c;
  tu_alloc ta;
  mseq *s; /* [MS] */
  uint32_t live;
  uint32_t *ref; /* [NB] model refcounts */
  int32_t *fl;   /* [NB] model free list */
  uint32_t nfree;
  uint32_t tag_clock;
  pvl_seq_id stale[16];
  uint32_t n_stale;
  /* The plan and what the model knows about it. */
  pvl_plan *plan;
  uint64_t plan_cap;
  pvl_seq_id *batch; /* [MS] */
  uint32_t nbatch;
  bool *fresh; /* [L] the plan describes layer l as it is now */
  int32_t *r2m, *m2r;
  tu_rng r;
  long step;
  const char *op;
  /* Counters, to show the run covered what it should. */
  int opi;
  long count[16][16]; /* [op][status] of the operation's main call */
  long rows_compared; /* attention rows checked against the reference */
} model;

#define CTX "seed %llu step %ld op %s: "
#define CTXA (unsigned long long)M->r.seed, M->step, M->op
#define MASSERT(cond, ...)                                                     \
  do {                                                                         \
    if (!(cond)) {                                                             \
      char m_[768];                                                            \
      snprintf(m_, sizeof(m_), __VA_ARGS__);                                   \
      cr_assert(false, CTX "%s", CTXA, m_);                                    \
    }                                                                          \
  } while (0)
#define MRESULT(st, want)                                                      \
  do {                                                                         \
    MEXPECT(st, want);                                                         \
    M->count[M->opi][(int)(st)&15]++;                                          \
  } while (0)
#define MEXPECT(st, want)                                                      \
  MASSERT((st) == (want), "status %s, model expects %s (%s)",                  \
          pvl_status_string(st), pvl_status_string(want),                      \
          pvl_cache_last_error(M->c))

enum {
  OP_ADD,
  OP_APPEND,
  OP_FORK,
  OP_RETAIN,
  OP_FREE,
  OP_WRITE,
  OP_BUILD,
  OP_ATTEND,
  OP_PLAN_WRITE,
  OP_QUERY,
  OP_STALE,
  N_OPS
};
static const char *op_names[N_OPS] = {"add",        "append", "fork",  "retain",
                                      "free",       "write",  "build", "attend",
                                      "plan_write", "query",  "stale"};

/* ---- model primitives ---- */

static uint32_t max_tokens(const model *M) { return M->NB * M->bs + 1; }

static int32_t m_alloc(model *M) {
  MASSERT(M->nfree > 0, "model pool empty");
  int32_t b = M->fl[--M->nfree];
  M->ref[b] = 1;
  return b;
}

static void m_decref(model *M, int32_t b) {
  MASSERT(M->ref[b] > 0, "model double free of %d", b);
  if (--M->ref[b] == 0) M->fl[M->nfree++] = b;
}

static float new_tag(model *M) {
  M->tag_clock = M->tag_clock % 60000 + 1;
  return (float)M->tag_clock;
}

static mseq *m_slot_free(model *M) {
  for (uint32_t i = 0; i < M->MS; i++)
    if (!M->s[i].live) return &M->s[i];
  return NULL;
}

static mseq *m_random_live(model *M) {
  if (!M->live) return NULL;
  uint32_t k = tu_below(&M->r, M->live);
  for (uint32_t i = 0; i < M->MS; i++)
    if (M->s[i].live && k-- == 0) return &M->s[i];
  return NULL;
}

static mseq *m_find(model *M, pvl_seq_id id) {
  for (uint32_t i = 0; i < M->MS; i++)
    if (M->s[i].live && M->s[i].id == id) return &M->s[i];
  return NULL;
}

static void m_remember_stale(model *M, pvl_seq_id id) {
  M->stale[M->n_stale++ % 16] = id;
}

/* The plan goes stale, in every layer, when the tables of a batch member
 * change (the library tracks changes per sequence, not per layer). */
static void m_touch(model *M, pvl_seq_id id, int layer) {
  (void)layer;
  for (uint32_t b = 0; b < M->nbatch; b++) {
    if (M->batch[b] != id) continue;
    for (uint32_t l = 0; l < M->L; l++) M->fresh[l] = false;
  }
}

/* Writes model tags [first, first + n) of a layer into the cache. */
static void m_write_tags(model *M, mseq *s, uint32_t l, uint32_t first,
                         uint32_t n) {
  pvl_status st = tu_write_tags(M->c, s->id, l, first, n, s->t[l].tag + first);
  MEXPECT(st, PVL_SUCCESS);
}

static bool m_range_shared(const model *M, const mseq *s, uint32_t l,
                           uint32_t first, uint32_t n) {
  if (n == 0) return false;
  for (uint32_t b = first / M->bs; b <= (first + n - 1) / M->bs; b++)
    if (M->ref[s->t[l].blk[b]] > 1) return true;
  return false;
}

/* ---- verification of everything observable ---- */

static void verify(model *M) {
  char msg[512] = "";
  pvl_status st = pvl__cache_check(M->c, msg, sizeof(msg));
  MASSERT(st == PVL_SUCCESS, "pvl__cache_check: %s", msg);
  pvl_stats stats;
  MEXPECT(pvl_cache_get_stats(M->c, &stats), PVL_SUCCESS);
  uint32_t shared = 0;
  for (uint32_t b = 0; b < M->NB; b++) shared += M->ref[b] >= 2;
  MASSERT(stats.free_blocks == M->nfree, "free blocks %u, model %u",
          stats.free_blocks, M->nfree);
  MASSERT(stats.used_blocks == M->NB - M->nfree, "used %u", stats.used_blocks);
  MASSERT(stats.shared_blocks == shared, "shared %u, model %u",
          stats.shared_blocks, shared);
  MASSERT(stats.num_seqs == M->live, "num_seqs %u, model %u", stats.num_seqs,
          M->live);
  uint64_t lt[8] = {0}, mlt[8] = {0};
  MEXPECT(pvl_cache_layer_tokens(M->c, lt, M->L), PVL_SUCCESS);

  for (uint32_t b = 0; b < M->NB; b++) M->r2m[b] = M->m2r[b] = -1;
  const uint32_t maxt = max_tokens(M);
  int32_t *ids = malloc((M->NB + 1) * sizeof(int32_t));
  uint32_t *pos = malloc(maxt * sizeof(uint32_t));
  float *tags = malloc(maxt * sizeof(float));
  uint64_t total = 0;
  for (uint32_t i = 0; i < M->MS; i++) {
    mseq *s = &M->s[i];
    if (!s->live) continue;
    pvl_seq_info info;
    MEXPECT(pvl_seq_get_info(M->c, s->id, &info), PVL_SUCCESS);
    uint32_t mn = UINT32_MAX, mx = 0;
    uint64_t tt = 0, tb = 0;
    for (uint32_t l = 0; l < M->L; l++) {
      mtab *t = &s->t[l];
      mn = t->n < mn ? t->n : mn;
      mx = t->n > mx ? t->n : mx;
      tt += t->n;
      tb += t->nb;
      mlt[l] += t->n;
    }
    total += tt;
    MASSERT(info.n_prompt == s->n_prompt && info.n_decoded == s->n_decoded &&
                info.position == s->n_prompt + s->n_decoded &&
                info.n_visual_spans == s->n_spans,
            "seq %llx info: prompt %u decoded %u position %u spans %u",
            (unsigned long long)s->id, info.n_prompt, info.n_decoded,
            info.position, info.n_visual_spans);
    MASSERT(info.min_tokens == mn && info.max_tokens == mx &&
                info.total_tokens == tt && info.total_blocks == tb,
            "seq %llx info: min %u max %u tokens %llu blocks %llu, model %u "
            "%u %llu %llu",
            (unsigned long long)s->id, info.min_tokens, info.max_tokens,
            (unsigned long long)info.total_tokens,
            (unsigned long long)info.total_blocks, mn, mx,
            (unsigned long long)tt, (unsigned long long)tb);
    for (uint32_t l = 0; l < M->L; l++) {
      mtab *t = &s->t[l];
      uint32_t nt = 0, nb = 0;
      MEXPECT(pvl_seq_layer_size(M->c, s->id, l, &nt, &nb), PVL_SUCCESS);
      MASSERT(nt == t->n && nb == t->nb,
              "seq %llx layer %u: %u tokens %u blocks, model %u %u",
              (unsigned long long)s->id, l, nt, nb, t->n, t->nb);
      uint32_t got = 0;
      MEXPECT(pvl_seq_blocks(M->c, s->id, l, ids, M->NB, &got), PVL_SUCCESS);
      for (uint32_t j = 0; j < got; j++) {
        int32_t real = ids[j], m = t->blk[j];
        MASSERT(real >= 0 && (uint32_t)real < M->NB, "block id %d", real);
        if (M->r2m[real] < 0 && M->m2r[m] < 0) {
          M->r2m[real] = m;
          M->m2r[m] = real;
        }
        MASSERT(M->r2m[real] == m && M->m2r[m] == real,
                "seq %llx layer %u block %u: real %d / model %d break the "
                "sharing structure (real %d is model %d, model %d is real %d)",
                (unsigned long long)s->id, l, j, real, m, real, M->r2m[real], m,
                M->m2r[m]);
      }
      MEXPECT(pvl_seq_positions(M->c, s->id, l, pos, maxt, &got), PVL_SUCCESS);
      for (uint32_t j = 0; j < t->n; j++)
        MASSERT(pos[j] == t->pos[j],
                "seq %llx layer %u slot %u: position %u, model %u",
                (unsigned long long)s->id, l, j, pos[j], t->pos[j]);
      MEXPECT(tu_read_tags(M->c, s->id, l, 0, t->n, tags), PVL_SUCCESS);
      for (uint32_t j = 0; j < t->n; j++)
        if (t->tag[j] != 0)
          MASSERT(tags[j] == t->tag[j],
                  "seq %llx layer %u slot %u: tag %g, model %g",
                  (unsigned long long)s->id, l, j, (double)tags[j],
                  (double)t->tag[j]);
    }
  }
  for (uint32_t l = 0; l < M->L; l++)
    MASSERT(lt[l] == mlt[l], "layer %u holds %llu tokens, model %llu", l,
            (unsigned long long)lt[l], (unsigned long long)mlt[l]);
  MASSERT(stats.tokens == total, "tokens %llu, model %llu",
          (unsigned long long)stats.tokens, (unsigned long long)total);
  free(ids);
  free(pos);
  free(tags);
}

/* ---- operations ---- */

static void op_add(model *M) {
  uint32_t n = tu_range(&M->r, 1, M->max_prompt);
  pvl_span sp[3];
  uint32_t ns = tu_below(&M->r, 4);
  if (ns > n) ns = n;
  /* Sorted, non-overlapping, non-empty spans: cut [0, n) at random. */
  uint32_t at = 0, k = 0;
  for (uint32_t i = 0; i < ns && at < n; i++) {
    uint32_t b = tu_range(&M->r, at, n - 1);
    uint32_t e = tu_range(&M->r, b + 1, n);
    sp[k++] = (pvl_span){b, e};
    at = e;
  }
  ns = k;
  bool broken = ns > 0 && tu_below(&M->r, 25) == 0;
  if (broken) sp[0].end = sp[0].begin; /* empty: invalid */
  const uint32_t need = M->L * tu_ceil_div(n, M->bs);
  pvl_status want = broken             ? PVL_ERR_INVALID_ARGUMENT
                    : need > M->nfree  ? PVL_ERR_OUT_OF_BLOCKS
                    : M->live == M->MS ? PVL_ERR_CAPACITY
                                       : PVL_SUCCESS;
  pvl_admit adm;
  MEXPECT(pvl_can_add(M->c, n, &adm), PVL_SUCCESS);
  pvl_admit wadm = need > M->NB                            ? PVL_ADMIT_NEVER
                   : (need > M->nfree || M->live == M->MS) ? PVL_ADMIT_LATER
                                                           : PVL_ADMIT_OK;
  MASSERT(adm == wadm, "can_add(%u) = %d, model %d", n, (int)adm, (int)wadm);
  pvl_seq_id id = 0;
  pvl_status st = pvl_seq_add(M->c, n, ns ? sp : NULL, ns, &id);
  MRESULT(st, want);
  if (st != PVL_SUCCESS) return;
  mseq *s = m_slot_free(M);
  s->live = true;
  s->id = id;
  s->n_prompt = n;
  s->n_decoded = 0;
  s->n_spans = ns;
  memcpy(s->spans, sp, ns * sizeof(pvl_span));
  M->live++;
  for (uint32_t l = 0; l < M->L; l++) {
    mtab *t = &s->t[l];
    t->n = n;
    t->nb = tu_ceil_div(n, M->bs);
    for (uint32_t j = 0; j < t->nb; j++) t->blk[j] = m_alloc(M);
    for (uint32_t j = 0; j < n; j++) {
      t->pos[j] = j;
      t->tag[j] = new_tag(M);
    }
    m_write_tags(M, s, l, 0, n);
  }
}

static void op_append(model *M) {
  pvl_seq_id ids[64];
  mseq *seqs[64];
  uint32_t n = 0;
  if (M->live) {
    uint32_t k = tu_range(&M->r, 1, M->live);
    uint32_t picked[64];
    tu_subset(&M->r, M->live, k, picked);
    uint32_t li = 0, pi = 0;
    for (uint32_t i = 0; i < M->MS && pi < k; i++) {
      if (!M->s[i].live) continue;
      if (li++ == picked[pi]) {
        seqs[n] = &M->s[i];
        ids[n++] = M->s[i].id;
        pi++;
      }
    }
    /* random order */
    for (uint32_t i = n; i > 1; i--) {
      uint32_t j = tu_below(&M->r, i);
      pvl_seq_id t = ids[i - 1];
      ids[i - 1] = ids[j];
      ids[j] = t;
      mseq *u = seqs[i - 1];
      seqs[i - 1] = seqs[j];
      seqs[j] = u;
    }
  }
  pvl_status want = PVL_SUCCESS;
  uint32_t roll = tu_below(&M->r, 40);
  if (n > 0 && roll == 0) { /* a duplicate */
    ids[n] = ids[tu_below(&M->r, n)];
    n++;
    want = PVL_ERR_INVALID_ARGUMENT;
  } else if (roll == 1 && M->n_stale) { /* a stale id */
    ids[n++] = M->stale[tu_below(&M->r, M->n_stale < 16 ? M->n_stale : 16)];
    want = PVL_ERR_UNKNOWN_SEQUENCE;
  }
  /* Kinds, decided up front as the contract's copy-on-write requires. */
  uint8_t kind[64][8];
  uint64_t need = 0;
  for (uint32_t i = 0; want == PVL_SUCCESS && i < n; i++)
    for (uint32_t l = 0; l < M->L; l++) {
      mtab *t = &seqs[i]->t[l];
      kind[i][l] = t->n % M->bs == 0               ? 1
                   : M->ref[t->blk[t->nb - 1]] > 1 ? 2
                                                   : 0;
      need += kind[i][l] != 0;
    }
  if (want == PVL_SUCCESS) {
    uint64_t q = 0;
    MEXPECT(pvl_blocks_for_append(M->c, ids, n, &q), PVL_SUCCESS);
    MASSERT(q == need, "blocks_for_append %llu, model %llu",
            (unsigned long long)q, (unsigned long long)need);
    if (need > M->nfree) want = PVL_ERR_OUT_OF_BLOCKS;
  }
  pvl_status st = pvl_seq_append(M->c, ids, n, NULL);
  MRESULT(st, want);
  if (st != PVL_SUCCESS) return;
  for (uint32_t i = 0; i < n; i++) {
    mseq *s = seqs[i];
    for (uint32_t l = 0; l < M->L; l++) {
      mtab *t = &s->t[l];
      if (kind[i][l] == 1) {
        t->blk[t->nb++] = m_alloc(M);
      } else if (kind[i][l] == 2) {
        int32_t nb = m_alloc(M);
        m_decref(M, t->blk[t->nb - 1]);
        t->blk[t->nb - 1] = nb;
      }
      t->pos[t->n] = s->n_prompt + s->n_decoded;
      t->tag[t->n] = new_tag(M);
      t->n++;
    }
    s->n_decoded++;
    m_touch(M, s->id, -1);
  }
  /* Every appended slot is exclusive: the stack writes the new token. */
  for (uint32_t i = 0; i < n; i++)
    for (uint32_t l = 0; l < M->L; l++)
      if (tu_below(&M->r, 8) != 0)
        m_write_tags(M, seqs[i], l, seqs[i]->t[l].n - 1, 1);
      else
        seqs[i]->t[l].tag[seqs[i]->t[l].n - 1] = 0; /* left unwritten */
}

static void op_fork(model *M) {
  mseq *p = m_random_live(M);
  if (!p) return;
  pvl_status want = M->live == M->MS ? PVL_ERR_CAPACITY : PVL_SUCCESS;
  pvl_seq_id id = 0;
  pvl_status st = pvl_seq_fork(M->c, p->id, &id);
  MRESULT(st, want);
  if (st != PVL_SUCCESS) return;
  mseq *s = m_slot_free(M);
  mtab *keep_t = s->t;
  *s = *p;
  s->t = keep_t;
  s->id = id;
  for (uint32_t l = 0; l < M->L; l++) {
    mtab *d = &s->t[l], *o = &p->t[l];
    d->n = o->n;
    d->nb = o->nb;
    memcpy(d->pos, o->pos, o->n * sizeof(uint32_t));
    memcpy(d->tag, o->tag, o->n * sizeof(float));
    memcpy(d->blk, o->blk, o->nb * sizeof(int32_t));
    for (uint32_t j = 0; j < o->nb; j++) M->ref[o->blk[j]]++;
  }
  M->live++;
  pvl_span sp[4];
  uint32_t ns = 0;
  MEXPECT(pvl_seq_visual_spans(M->c, id, sp, 4, &ns), PVL_SUCCESS);
  MASSERT(ns == p->n_spans, "fork has %u spans, parent %u", ns, p->n_spans);
  for (uint32_t i = 0; i < ns; i++)
    MASSERT(sp[i].begin == p->spans[i].begin && sp[i].end == p->spans[i].end,
            "fork span %u", i);
}

static void op_retain(model *M) {
  mseq *s = m_random_live(M);
  if (!s) return;
  uint32_t l = tu_below(&M->r, M->L);
  mtab *t = &s->t[l];
  const uint32_t n = t->n;
  uint32_t *keep = malloc((n + 1) * sizeof(uint32_t));
  uint32_t k = 0;
  switch (tu_below(&M->r, 6)) {
  case 0: k = 0; break;
  case 1:
    k = n;
    for (uint32_t i = 0; i < k; i++) keep[i] = i;
    break;
  case 2:
    k = tu_range(&M->r, 0, n);
    for (uint32_t i = 0; i < k; i++) keep[i] = i;
    break;
  case 3:
    k = tu_range(&M->r, 0, n);
    for (uint32_t i = 0; i < k; i++) keep[i] = n - k + i;
    break;
  default:
    k = tu_range(&M->r, 0, n);
    tu_subset(&M->r, n, k, keep);
    break;
  }
  pvl_status want = PVL_SUCCESS;
  if (k > 0 && tu_below(&M->r, 30) == 0) {
    keep[k - 1] = n; /* out of range */
    want = PVL_ERR_INVALID_ARGUMENT;
  }
  /* Slots [0, p) stay; whole blocks before p / bs are kept in place, the
   * other kept tokens are gathered into fresh blocks. */
  uint32_t p = 0;
  while (p < k && keep[p] == p) p++;
  const bool moves = p < k;
  const uint32_t n_final = tu_ceil_div(k, M->bs);
  const uint32_t n_stay = moves ? p / M->bs : n_final;
  const uint32_t n_new = n_final - n_stay;
  if (want == PVL_SUCCESS && n_new > M->nfree) want = PVL_ERR_OUT_OF_BLOCKS;
  pvl_status st = pvl_seq_retain(M->c, s->id, l, keep, k, NULL);
  MRESULT(st, want);
  if (st == PVL_SUCCESS) {
    int32_t *fresh = malloc((n_new + 1) * sizeof(int32_t));
    for (uint32_t j = 0; j < n_new; j++) fresh[j] = m_alloc(M);
    for (uint32_t j = n_stay; j < t->nb; j++) m_decref(M, t->blk[j]);
    for (uint32_t j = 0; j < n_new; j++) t->blk[n_stay + j] = fresh[j];
    free(fresh);
    for (uint32_t i = 0; i < k; i++) {
      t->pos[i] = t->pos[keep[i]];
      t->tag[i] = t->tag[keep[i]];
    }
    t->n = k;
    t->nb = n_final;
    m_touch(M, s->id, (int)l);
  }
  free(keep);
}

static void op_free(model *M) {
  mseq *s = m_random_live(M);
  if (!s) return;
  pvl_status st = pvl_seq_free(M->c, s->id);
  MRESULT(st, PVL_SUCCESS);
  for (uint32_t l = 0; l < M->L; l++)
    for (uint32_t j = 0; j < s->t[l].nb; j++) m_decref(M, s->t[l].blk[j]);
  m_touch(M, s->id, -1);
  m_remember_stale(M, s->id);
  s->live = false;
  M->live--;
}

static void op_write(model *M) {
  mseq *s = m_random_live(M);
  if (!s) return;
  uint32_t l = tu_below(&M->r, M->L);
  mtab *t = &s->t[l];
  if (t->n == 0) return;
  uint32_t first = tu_below(&M->r, t->n);
  uint32_t n = tu_range(&M->r, 1, t->n - first);
  float *tags = malloc(n * sizeof(float));
  for (uint32_t i = 0; i < n; i++) tags[i] = new_tag(M);
  pvl_status want =
      m_range_shared(M, s, l, first, n) ? PVL_ERR_BAD_STATE : PVL_SUCCESS;
  pvl_status st = tu_write_tags(M->c, s->id, l, first, n, tags);
  MRESULT(st, want);
  if (st == PVL_SUCCESS) memcpy(t->tag + first, tags, n * sizeof(float));
  free(tags);
}

/* Decode attention of one layer through the plan against the model's
 * tags: K = tag, V = -(tag + e). */
static void check_attention(model *M, uint32_t l) {
  const uint32_t n = M->nbatch;
  float q[64 * 2];
  float out[64 * 2];
  for (uint32_t i = 0; i < 2 * n; i++) q[i] = tu_uniform(&M->r, -1e-4f, 1e-4f);
  tu_poison(PVL_DTYPE_F32, out, 2 * n);
  pvl_status want = M->fresh[l] ? PVL_SUCCESS : PVL_ERR_BAD_STATE;
  pvl_status st = pvl_attention_decode(M->plan, l, q, out, 0.0f, NULL);
  MRESULT(st, want);
  if (st != PVL_SUCCESS) return;
  for (uint32_t b = 0; b < n; b++) {
    mseq *s = m_find(M, M->batch[b]);
    MASSERT(s, "batch member gone");
    mtab *t = &s->t[l];
    bool known = true;
    for (uint32_t j = 0; j < t->n; j++) known &= t->tag[j] != 0;
    if (!known) continue; /* unwritten slots hold garbage */
    float *k = malloc((t->n + 1) * 2 * sizeof(float));
    float *v = malloc((t->n + 1) * 2 * sizeof(float));
    for (uint32_t j = 0; j < t->n; j++) {
      k[2 * j] = k[2 * j + 1] = t->tag[j];
      v[2 * j] = -t->tag[j];
      v[2 * j + 1] = -(t->tag[j] + 1);
    }
    double ref[2];
    tu_ref_attention(q + 2 * b, k, v, t->n, 1, 1, 2, 1.0 / sqrt(2.0), ref);
    M->rows_compared++;
    for (int e = 0; e < 2; e++)
      MASSERT(fabs(out[2 * b + e] - ref[e]) <= 1e-5 + 1e-5 * fabs(ref[e]),
              "attention layer %u row %u elem %d: %g, reference %g", l, b, e,
              (double)out[2 * b + e], ref[e]);
    free(k);
    free(v);
  }
}

static void op_build(model *M) {
  pvl_seq_id ids[64];
  uint32_t n = 0;
  for (uint32_t i = 0; i < M->MS; i++)
    if (M->s[i].live && tu_below(&M->r, 2)) ids[n++] = M->s[i].id;
  tu_shuffle_u64(&M->r, ids, n);
  pvl_status want = PVL_SUCCESS;
  uint32_t roll = tu_below(&M->r, 30);
  if (roll == 0 && n > 0) {
    ids[n] = ids[0];
    n++;
    want = PVL_ERR_INVALID_ARGUMENT;
  } else if (roll == 1 && M->n_stale) {
    ids[n++] = M->stale[0];
    want = PVL_ERR_UNKNOWN_SEQUENCE;
  }
  if (want == PVL_SUCCESS) {
    /* The plan's id array is shared by all layers. */
    uint64_t tight = 0;
    for (uint32_t l = 0; l < M->L; l++)
      for (uint32_t b = 0; b < n; b++) tight += m_find(M, ids[b])->t[l].nb;
    if (tight > M->plan_cap) want = PVL_ERR_CAPACITY;
  }
  pvl_status st = pvl_plan_build(M->plan, ids, n, NULL);
  MRESULT(st, want);
  if (st != PVL_SUCCESS) return;
  memcpy(M->batch, ids, n * sizeof(pvl_seq_id));
  M->nbatch = n;
  for (uint32_t l = 0; l < M->L; l++) M->fresh[l] = true;
  tu_check_plan_rows(M->c, M->plan, ids, n);
  check_attention(M, tu_below(&M->r, M->L));
}

static void op_attend(model *M) {
  /* Also right after other operations: a stale layer must be refused. */
  check_attention(M, tu_below(&M->r, M->L));
}

static void op_plan_write(model *M) {
  if (M->nbatch == 0) return;
  const uint32_t l = tu_below(&M->r, M->L);
  pvl_status want = M->fresh[l] ? PVL_SUCCESS : PVL_ERR_BAD_STATE;
  mseq *rows[64];
  for (uint32_t b = 0; b < M->nbatch; b++) {
    rows[b] = m_find(M, M->batch[b]);
    if (!rows[b]) want = PVL_ERR_BAD_STATE;
  }
  if (want == PVL_SUCCESS)
    for (uint32_t b = 0; b < M->nbatch; b++) {
      mtab *t = &rows[b]->t[l];
      if (t->n == 0 || M->ref[t->blk[t->nb - 1]] > 1) want = PVL_ERR_BAD_STATE;
      /* The last slot must be the newest position, not an older token a
       * retain left last. */
      else if (t->pos[t->n - 1] != rows[b]->n_prompt + rows[b]->n_decoded - 1)
        want = PVL_ERR_BAD_STATE;
    }
  float k[64 * 2], v[64 * 2], tags[64];
  for (uint32_t b = 0; b < M->nbatch; b++) {
    tags[b] = new_tag(M);
    k[2 * b] = k[2 * b + 1] = tags[b];
    v[2 * b] = -tags[b];
    v[2 * b + 1] = -(tags[b] + 1);
  }
  pvl_status st = pvl_plan_kv_write(M->plan, l, k, v, NULL);
  MRESULT(st, want);
  if (st != PVL_SUCCESS) return;
  for (uint32_t b = 0; b < M->nbatch; b++) {
    mtab *t = &rows[b]->t[l];
    t->tag[t->n - 1] = tags[b];
  }
}

static void op_query(model *M) {
  uint32_t n = tu_range(&M->r, 1, 3 * M->max_prompt);
  uint64_t need = 0;
  MEXPECT(pvl_blocks_for_prompt(M->c, n, &need), PVL_SUCCESS);
  MASSERT(need == (uint64_t)M->L * tu_ceil_div(n, M->bs), "blocks_for_prompt");
  pvl_admit a;
  MEXPECT(pvl_can_add(M->c, n, &a), PVL_SUCCESS);
  pvl_admit w = need > M->NB                            ? PVL_ADMIT_NEVER
                : (need > M->nfree || M->live == M->MS) ? PVL_ADMIT_LATER
                                                        : PVL_ADMIT_OK;
  MASSERT(a == w, "can_add(%u) = %d, model %d", n, (int)a, (int)w);
}

static void op_stale(model *M) {
  if (!M->n_stale) return;
  pvl_seq_id id = M->stale[tu_below(&M->r, M->n_stale < 16 ? M->n_stale : 16)];
  pvl_seq_id out;
  uint32_t keep = 0;
  switch (tu_below(&M->r, 3)) {
  case 0: MEXPECT(pvl_seq_free(M->c, id), PVL_ERR_UNKNOWN_SEQUENCE); break;
  case 1:
    MEXPECT(pvl_seq_fork(M->c, id, &out), PVL_ERR_UNKNOWN_SEQUENCE);
    break;
  default:
    MEXPECT(pvl_seq_retain(M->c, id, 0, &keep, 1, NULL),
            PVL_ERR_UNKNOWN_SEQUENCE);
  }
}

/* ---- the run ---- */

static long op_count(long dflt) {
  const char *e = getenv("PVL_MODEL_OPS");
  long n = e && *e ? strtol(e, NULL, 10) : 100000;
  /* The main run takes the count as given; the others scale with it. */
  return n * dflt / 100000;
}

static void run_model(const char *name, uint32_t L, uint32_t bs, uint32_t NB,
                      uint32_t MS, uint32_t max_prompt, uint64_t plan_cap,
                      long ops) {
  model m;
  model *M = &m;
  memset(M, 0, sizeof(*M));
  tu_rng_init(&M->r, tu_seed(name));
  M->L = L;
  M->bs = bs;
  M->NB = NB;
  M->MS = MS;
  M->max_prompt = max_prompt;
  M->op = "setup";
  cr_assert_leq(L, 8);
  cr_assert_leq(MS, 32);
  tu_alloc_init(&M->ta);
  pvl_config cfg = tu_config(L, 1, 1, 2, bs, NB, PVL_DTYPE_F32);
  cfg.max_seqs = MS;
  cfg.allocator = &M->ta.a;
  M->c = tu_cache_new(&cfg);
  M->s = calloc(MS, sizeof(mseq));
  const uint32_t maxt = max_tokens(M);
  for (uint32_t i = 0; i < MS; i++) {
    M->s[i].t = calloc(L, sizeof(mtab));
    for (uint32_t l = 0; l < L; l++) {
      M->s[i].t[l].pos = malloc(maxt * sizeof(uint32_t));
      M->s[i].t[l].tag = malloc(maxt * sizeof(float));
      M->s[i].t[l].blk = malloc((NB + 1) * sizeof(int32_t));
    }
  }
  M->ref = calloc(NB, sizeof(uint32_t));
  M->fl = malloc(NB * sizeof(int32_t));
  for (uint32_t b = 0; b < NB; b++) M->fl[b] = (int32_t)(NB - 1 - b);
  M->nfree = NB;
  M->r2m = malloc(NB * sizeof(int32_t));
  M->m2r = malloc(NB * sizeof(int32_t));
  M->batch = calloc(MS, sizeof(pvl_seq_id));
  M->fresh = calloc(L, sizeof(bool));
  cr_assert_eq(pvl_plan_create(M->c, MS, plan_cap, &M->plan), PVL_SUCCESS);
  pvl_plan_info pinfo;
  cr_assert_eq(pvl_plan_get_info(M->plan, &pinfo), PVL_SUCCESS);
  M->plan_cap = pinfo.block_capacity;
  /* A plan that was never built refuses attention and writes. */
  for (uint32_t l = 0; l < L; l++) M->fresh[l] = false;

  /* Weights of the operations; frees get likelier as the pool fills. */
  static const uint32_t weight[N_OPS] = {14, 28, 7, 13, 8, 8, 7, 4, 4, 4, 3};
  for (M->step = 0; M->step < ops; M->step++) {
    uint32_t total = 0;
    uint32_t w[N_OPS];
    for (int i = 0; i < N_OPS; i++) {
      w[i] = weight[i];
      if (i == OP_FREE && M->nfree < NB / 8) w[i] *= 4;
      total += w[i];
    }
    uint32_t x = tu_below(&M->r, total);
    int op = 0;
    while (x >= w[op]) x -= w[op++];
    M->op = op_names[op];
    M->opi = op;
    switch (op) {
    case OP_ADD: op_add(M); break;
    case OP_APPEND: op_append(M); break;
    case OP_FORK: op_fork(M); break;
    case OP_RETAIN: op_retain(M); break;
    case OP_FREE: op_free(M); break;
    case OP_WRITE: op_write(M); break;
    case OP_BUILD: op_build(M); break;
    case OP_ATTEND: op_attend(M); break;
    case OP_PLAN_WRITE: op_plan_write(M); break;
    case OP_QUERY: op_query(M); break;
    default: op_stale(M); break;
    }
    verify(M);
  }
  cr_log_info("%s: %ld ops, seed %llu, %ld attention rows compared", name, ops,
              (unsigned long long)M->r.seed, M->rows_compared);
  for (int i = 0; i < N_OPS; i++) {
    char line[512];
    int at = snprintf(line, sizeof(line), "  %-10s", op_names[i]);
    for (int st = 0; st < 12; st++)
      if (M->count[i][st] && at < (int)sizeof(line))
        at += snprintf(line + at, sizeof(line) - (size_t)at, " %.*s x%ld",
                       (int)strcspn(pvl_status_string((pvl_status)st), ":"),
                       pvl_status_string((pvl_status)st), M->count[i][st]);
    cr_log_info("%s", line);
  }
  /* The run must have met the interesting cases. */
  if (ops >= 10000) {
    long(*n)[16] = M->count;
    cr_assert_gt(n[OP_ADD][PVL_SUCCESS], 0);
    cr_assert_gt(n[OP_ADD][PVL_ERR_OUT_OF_BLOCKS], 0);
    cr_assert_gt(n[OP_ADD][PVL_ERR_INVALID_ARGUMENT], 0);
    cr_assert_gt(n[OP_APPEND][PVL_SUCCESS], 0);
    cr_assert_gt(n[OP_APPEND][PVL_ERR_OUT_OF_BLOCKS], 0);
    cr_assert_gt(n[OP_APPEND][PVL_ERR_INVALID_ARGUMENT], 0);
    cr_assert_gt(n[OP_APPEND][PVL_ERR_UNKNOWN_SEQUENCE], 0);
    cr_assert_gt(n[OP_FORK][PVL_SUCCESS], 0);
    cr_assert_gt(n[OP_RETAIN][PVL_SUCCESS], 0);
    cr_assert_gt(n[OP_RETAIN][PVL_ERR_OUT_OF_BLOCKS], 0);
    cr_assert_gt(n[OP_WRITE][PVL_SUCCESS], 0);
    cr_assert_gt(n[OP_WRITE][PVL_ERR_BAD_STATE], 0);
    cr_assert_gt(n[OP_BUILD][PVL_SUCCESS], 0);
    cr_assert_gt(n[OP_ATTEND][PVL_ERR_BAD_STATE], 0);
    cr_assert_gt(n[OP_PLAN_WRITE][PVL_SUCCESS], 0);
    cr_assert_gt(M->rows_compared, 1000);
    if (plan_cap) cr_assert_gt(n[OP_BUILD][PVL_ERR_CAPACITY], 0);
  }

  M->op = "teardown";
  while (M->live) {
    op_free(M);
    verify(M);
  }
  cr_assert_eq(tu_free_blocks(M->c), NB);
  pvl_plan_destroy(M->plan);
  pvl_cache_destroy(M->c);
  TU_NO_LEAKS(&M->ta);
  for (uint32_t i = 0; i < MS; i++) {
    for (uint32_t l = 0; l < L; l++) {
      free(M->s[i].t[l].pos);
      free(M->s[i].t[l].tag);
      free(M->s[i].t[l].blk);
    }
    free(M->s[i].t);
  }
  free(M->s);
  free(M->ref);
  free(M->fl);
  free(M->r2m);
  free(M->m2r);
  free(M->batch);
  free(M->fresh);
}

/* The main run: 3 layers, block_size 4, a pool small enough to run out
 * often, and a plan whose capacity is sometimes too small. */
Test(model, random_ops_block_size_4, .timeout = 600) {
  long n = op_count(100000);
  run_model("model.random_ops_block_size_4", 3, 4, 72, 10, 30, 72, n);
}

/* Single-token blocks: every append crosses a boundary. */
Test(model, random_ops_block_size_1, .timeout = 600) {
  run_model("model.random_ops_block_size_1", 2, 1, 96, 8, 12, 0,
            op_count(20000));
}

/* An odd block size, more layers, roomy pool. */
Test(model, random_ops_block_size_5, .timeout = 600) {
  run_model("model.random_ops_block_size_5", 5, 5, 160, 12, 40, 0,
            op_count(20000));
}
