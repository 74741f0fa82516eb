/* Helpers shared by the Criterion tests (see testutil.h). The dtype
 * converters here are written independently of libpagedvl/dtype.c so the
 * tests do not trust the code they test. */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>

/* ---- caches ---- */

pvl_config tu_config(uint32_t layers, uint32_t q_heads, uint32_t kv_heads,
                     uint32_t head_dim, uint32_t block_size,
                     uint32_t num_blocks, pvl_dtype dtype) {
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CPU;
  cfg.dtype = dtype;
  cfg.num_layers = layers;
  cfg.num_q_heads = q_heads;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = head_dim;
  cfg.block_size = block_size;
  cfg.num_blocks = num_blocks;
  cfg.max_seqs = 64;
  return cfg;
}

pvl_cache *tu_cache_new(const pvl_config *cfg) {
  pvl_cache *c = NULL;
  pvl_status st = pvl_cache_create(cfg, &c);
  cr_assert_eq(st, PVL_SUCCESS, "pvl_cache_create: %s (%s)",
               pvl_status_string(st), pvl_create_last_error());
  cr_assert_not_null(c);
  return c;
}

pvl_cache *tu_cache(uint32_t layers, uint32_t q_heads, uint32_t kv_heads,
                    uint32_t head_dim, uint32_t block_size, uint32_t num_blocks,
                    pvl_dtype dtype) {
  pvl_config cfg = tu_config(layers, q_heads, kv_heads, head_dim, block_size,
                             num_blocks, dtype);
  return tu_cache_new(&cfg);
}

pvl_stats tu_stats(const pvl_cache *c) {
  pvl_stats s;
  TU_OK(c, pvl_cache_get_stats(c, &s));
  return s;
}

uint32_t tu_free_blocks(const pvl_cache *c) { return tu_stats(c).free_blocks; }

uint32_t tu_layer_tokens(const pvl_cache *c, pvl_seq_id s, uint32_t layer) {
  uint32_t nt = 0, nb = 0;
  TU_OK(c, pvl_seq_layer_size(c, s, layer, &nt, &nb));
  return nt;
}

uint32_t tu_layer_blocks(const pvl_cache *c, pvl_seq_id s, uint32_t layer) {
  uint32_t nt = 0, nb = 0;
  TU_OK(c, pvl_seq_layer_size(c, s, layer, &nt, &nb));
  return nb;
}

uint32_t tu_blocks(const pvl_cache *c, pvl_seq_id s, uint32_t layer,
                   int32_t *ids, uint32_t cap) {
  uint32_t n = 0;
  TU_OK(c, pvl_seq_blocks(c, s, layer, ids, cap, &n));
  return n;
}

pvl_seq_id tu_add(pvl_cache *c, uint32_t n_prompt) {
  pvl_seq_id s = 0;
  TU_OK(c, pvl_seq_add(c, n_prompt, NULL, 0, &s));
  return s;
}

pvl_status tu_write_tags(pvl_cache *c, pvl_seq_id s, uint32_t layer,
                         uint32_t first, uint32_t n, const float *tags) {
  pvl_config cfg;
  TU_OK(c, pvl_cache_config(c, &cfg));
  cr_assert_eq(cfg.dtype, PVL_DTYPE_F32, "tags need an f32 cache");
  const size_t row = (size_t)cfg.num_kv_heads * cfg.head_dim;
  float *k = malloc((n ? n : 1) * row * sizeof(float));
  float *v = malloc((n ? n : 1) * row * sizeof(float));
  for (uint32_t t = 0; t < n; t++)
    for (size_t e = 0; e < row; e++) {
      k[t * row + e] = tags[t];
      v[t * row + e] = -(tags[t] + (float)e);
    }
  pvl_status st = pvl_kv_write(c, s, layer, first, n, k, v, NULL);
  free(k);
  free(v);
  return st;
}

pvl_status tu_read_tags(const pvl_cache *c, pvl_seq_id s, uint32_t layer,
                        uint32_t first, uint32_t n, float *tags) {
  pvl_config cfg;
  TU_OK(c, pvl_cache_config(c, &cfg));
  cr_assert_eq(cfg.dtype, PVL_DTYPE_F32, "tags need an f32 cache");
  const size_t row = (size_t)cfg.num_kv_heads * cfg.head_dim;
  float *k = malloc((n ? n : 1) * row * sizeof(float));
  float *v = malloc((n ? n : 1) * row * sizeof(float));
  pvl_status st = pvl_kv_read(c, s, layer, first, n, k, v, NULL);
  if (st == PVL_SUCCESS) {
    for (uint32_t t = 0; t < n; t++) {
      float tag = k[t * row];
      for (size_t e = 0; e < row; e++)
        if (k[t * row + e] != tag || v[t * row + e] != -(tag + (float)e))
          tag = NAN;
      tags[t] = tag;
    }
  }
  free(k);
  free(v);
  return st;
}

/* ---- RNG ---- */

uint64_t tu_seed(const char *name) {
  const char *env = getenv("PVL_TEST_SEED");
  if (env && *env) return strtoull(env, NULL, 0);
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (const char *p = name; *p; p++) {
    h ^= (unsigned char)*p;
    h *= 1099511628211ull;
  }
  return h;
}

void tu_rng_init(tu_rng *r, uint64_t seed) {
  r->seed = seed;
  r->state = seed;
}

uint64_t tu_next(tu_rng *r) {
  uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint32_t tu_below(tu_rng *r, uint32_t n) {
  return (uint32_t)(((tu_next(r) >> 32) * (uint64_t)n) >> 32);
}

uint32_t tu_range(tu_rng *r, uint32_t lo, uint32_t hi) {
  return lo + tu_below(r, hi - lo + 1);
}

float tu_uniform(tu_rng *r, float lo, float hi) {
  double u = (double)(tu_next(r) >> 11) * (1.0 / 9007199254740992.0);
  return (float)(lo + (hi - lo) * u);
}

void tu_subset(tu_rng *r, uint32_t n, uint32_t k, uint32_t *out) {
  /* Selection sampling (Knuth's algorithm S): ascending by construction. */
  uint32_t chosen = 0;
  for (uint32_t i = 0; i < n && chosen < k; i++) {
    if (tu_below(r, n - i) < k - chosen) out[chosen++] = i;
  }
}

void tu_shuffle_u64(tu_rng *r, uint64_t *a, uint32_t n) {
  for (uint32_t i = n; i > 1; i--) {
    uint32_t j = tu_below(r, i);
    uint64_t t = a[i - 1];
    a[i - 1] = a[j];
    a[j] = t;
  }
}

/* ---- dtypes ---- */

/* x rounded to a binary format with `frac` fraction bits, minimum normal
 * exponent emin and largest finite value max (overflow gives inf). */
static float round_fmt(float x, int frac, int emin, double max) {
  if (x == 0.0f || !isfinite(x)) return x;
  double a = fabs((double)x);
  int e;
  frexp(a, &e); /* a = m * 2^e, m in [0.5, 1) */
  int E = e - 1;
  if (E < emin) E = emin;
  double quantum = ldexp(1.0, E - frac);
  double r = nearbyint(a / quantum) * quantum; /* ties to even */
  if (r > max) r = INFINITY;
  return (float)(x < 0 ? -r : r);
}

float tu_round(pvl_dtype dt, float x) {
  switch (dt) {
  case PVL_DTYPE_F16: return round_fmt(x, 10, -14, 65504.0);
  case PVL_DTYPE_BF16: return round_fmt(x, 7, -126, 3.3895313892515355e38);
  default: return x;
  }
}

static uint16_t f16_bits(float x) {
  uint16_t sign = signbit(x) ? 0x8000u : 0;
  if (isnan(x)) return 0x7e00u;
  double a = fabs((double)x);
  if (isinf(x)) return (uint16_t)(sign | 0x7c00u);
  if (a == 0.0) return sign;
  if (a < ldexp(1.0, -14)) return (uint16_t)(sign | (uint16_t)(a * 16777216.0));
  int e;
  frexp(a, &e);
  int E = e - 1;
  uint32_t man = (uint32_t)((a / ldexp(1.0, E) - 1.0) * 1024.0);
  return (uint16_t)(sign | (uint16_t)((E + 15) << 10) | man);
}

static float f16_value(uint16_t h) {
  double s = (h & 0x8000u) ? -1.0 : 1.0;
  int exp = (h >> 10) & 0x1f;
  int man = h & 0x3ff;
  if (exp == 0x1f) return man ? NAN : (float)(s * INFINITY);
  if (exp == 0) return (float)(s * man * ldexp(1.0, -24));
  return (float)(s * (1.0 + man / 1024.0) * ldexp(1.0, exp - 15));
}

static uint16_t bf16_bits(float x) {
  if (isnan(x)) return 0x7fc0u;
  uint32_t u;
  memcpy(&u, &x, 4);
  return (uint16_t)(u >> 16);
}

static float bf16_value(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

void tu_encode(pvl_dtype dt, const float *src, void *dst, size_t n) {
  switch (dt) {
  case PVL_DTYPE_F32: memcpy(dst, src, n * sizeof(float)); break;
  case PVL_DTYPE_F16:
    for (size_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = f16_bits(src[i]);
    break;
  case PVL_DTYPE_BF16:
    for (size_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = bf16_bits(src[i]);
    break;
  }
}

void tu_decode(pvl_dtype dt, const void *src, float *dst, size_t n) {
  switch (dt) {
  case PVL_DTYPE_F32: memcpy(dst, src, n * sizeof(float)); break;
  case PVL_DTYPE_F16:
    for (size_t i = 0; i < n; i++)
      dst[i] = f16_value(((const uint16_t *)src)[i]);
    break;
  case PVL_DTYPE_BF16:
    for (size_t i = 0; i < n; i++)
      dst[i] = bf16_value(((const uint16_t *)src)[i]);
    break;
  }
}

void tu_poison(pvl_dtype dt, void *dst, size_t n) {
  for (size_t i = 0; i < n; i++) {
    switch (dt) {
    case PVL_DTYPE_F32: ((float *)dst)[i] = NAN; break;
    case PVL_DTYPE_F16: ((uint16_t *)dst)[i] = 0x7e00u; break;
    case PVL_DTYPE_BF16: ((uint16_t *)dst)[i] = 0x7fc0u; break;
    }
  }
}

void tu_fill(tu_rng *r, pvl_dtype dt, float lo, float hi, float *vals,
             void *buf, size_t n) {
  const size_t es = pvl_dtype_size(dt);
  for (size_t i = 0; i < n; i++) {
    float x = tu_round(dt, tu_uniform(r, lo, hi));
    if (vals) vals[i] = x;
    if (buf) tu_encode(dt, &x, (char *)buf + i * es, 1);
  }
}

double tu_eps(pvl_dtype dt) {
  switch (dt) {
  case PVL_DTYPE_F16: return 2e-3;
  case PVL_DTYPE_BF16: return 1.6e-2;
  default: return 1e-5;
  }
}

/* ---- reference attention ---- */

void tu_ref_attention(const float *q, const float *k, const float *v,
                      uint32_t len, uint32_t hq, uint32_t hkv, uint32_t d,
                      double scale, double *out) {
  const uint32_t grp = hq / hkv;
  double *s = malloc((len ? len : 1) * sizeof(double));
  cr_assert_not_null(s);
  for (uint32_t h = 0; h < hq; h++) {
    const uint32_t g = h / grp;
    double *o = out + (size_t)h * d;
    for (uint32_t e = 0; e < d; e++) o[e] = 0.0;
    if (len == 0) continue;
    double mx = -INFINITY;
    for (uint32_t j = 0; j < len; j++) {
      const float *kj = k + ((size_t)j * hkv + g) * d;
      double dot = 0.0;
      for (uint32_t e = 0; e < d; e++)
        dot += (double)q[(size_t)h * d + e] * (double)kj[e];
      s[j] = dot * scale;
      if (s[j] > mx) mx = s[j];
    }
    double sum = 0.0;
    for (uint32_t j = 0; j < len; j++) {
      s[j] = exp(s[j] - mx);
      sum += s[j];
    }
    for (uint32_t j = 0; j < len; j++) {
      const float *vj = v + ((size_t)j * hkv + g) * d;
      for (uint32_t e = 0; e < d; e++) o[e] += s[j] * (double)vj[e];
    }
    for (uint32_t e = 0; e < d; e++) o[e] /= sum;
  }
  free(s);
}

/* ---- snapshots ---- */

typedef struct tu_field {
  char name[112];
  size_t off, len;
} tu_field;

struct tu_snap {
  tu_field *fields;
  size_t n_fields, cap_fields;
  unsigned char *data;
  size_t n_data, cap_data;
};

static void snap_put(tu_snap *s, const void *p, size_t len, const char *fmt,
                     ...) __attribute__((format(printf, 4, 5)));

static void snap_put(tu_snap *s, const void *p, size_t len, const char *fmt,
                     ...) {
  if (s->n_fields == s->cap_fields) {
    s->cap_fields = s->cap_fields ? 2 * s->cap_fields : 64;
    s->fields = realloc(s->fields, s->cap_fields * sizeof(tu_field));
    cr_assert_not_null(s->fields);
  }
  while (s->n_data + len > s->cap_data) {
    s->cap_data = s->cap_data ? 2 * s->cap_data : 4096;
    s->data = realloc(s->data, s->cap_data);
    cr_assert_not_null(s->data);
  }
  tu_field *f = &s->fields[s->n_fields++];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(f->name, sizeof(f->name), fmt, ap);
  va_end(ap);
  f->off = s->n_data;
  f->len = len;
  if (len) memcpy(s->data + s->n_data, p, len);
  s->n_data += len;
}

tu_snap *tu_snap_take(const pvl_cache *c, const pvl_seq_id *ids, uint32_t n,
                      bool with_data) {
  tu_snap *s = calloc(1, sizeof(*s));
  cr_assert_not_null(s);
  pvl_config cfg;
  TU_OK(c, pvl_cache_config(c, &cfg));
  pvl_stats st = tu_stats(c);
  snap_put(s, &st, sizeof(st), "stats");
  uint64_t *lt = calloc(cfg.num_layers, sizeof(uint64_t));
  TU_OK(c, pvl_cache_layer_tokens(c, lt, cfg.num_layers));
  snap_put(s, lt, cfg.num_layers * sizeof(uint64_t), "layer_tokens");
  free(lt);
  uint32_t *rc = malloc((size_t)st.num_blocks * sizeof(uint32_t) + 4);
  for (uint32_t b = 0; b < st.num_blocks; b++)
    rc[b] = pvl__block_refcount(c, (int32_t)b);
  snap_put(s, rc, (size_t)st.num_blocks * sizeof(uint32_t), "refcounts");
  free(rc);
  const size_t row =
      (size_t)cfg.num_kv_heads * cfg.head_dim * pvl_dtype_size(cfg.dtype);
  for (uint32_t i = 0; i < n; i++) {
    bool live = pvl__seq_get(c, ids[i]) != NULL;
    snap_put(s, &live, sizeof(live), "seq[%u] live", i);
    if (!live) continue;
    pvl_seq_info info;
    TU_OK(c, pvl_seq_get_info(c, ids[i], &info));
    snap_put(s, &info, sizeof(info), "seq[%u] info", i);
    pvl_span spans[64];
    uint32_t ns = 0;
    TU_OK(c, pvl_seq_visual_spans(c, ids[i], spans, 64, &ns));
    snap_put(s, spans, (ns < 64 ? ns : 64) * sizeof(pvl_span), "seq[%u] spans",
             i);
    for (uint32_t l = 0; l < cfg.num_layers; l++) {
      uint32_t nt = 0, nb = 0;
      TU_OK(c, pvl_seq_layer_size(c, ids[i], l, &nt, &nb));
      uint32_t sz[2] = {nt, nb};
      snap_put(s, sz, sizeof(sz), "seq[%u] layer %u size", i, l);
      int32_t *blk = malloc(((size_t)nb + 1) * sizeof(int32_t));
      uint32_t got = 0;
      TU_OK(c, pvl_seq_blocks(c, ids[i], l, blk, nb, &got));
      snap_put(s, blk, got * sizeof(int32_t), "seq[%u] layer %u blocks", i, l);
      free(blk);
      uint32_t *pos = malloc(((size_t)nt + 1) * sizeof(uint32_t));
      TU_OK(c, pvl_seq_positions(c, ids[i], l, pos, nt, &got));
      snap_put(s, pos, got * sizeof(uint32_t), "seq[%u] layer %u positions", i,
               l);
      free(pos);
      if (with_data && nt) {
        char *k = malloc(nt * row), *v = malloc(nt * row);
        TU_OK(c, pvl_kv_read(c, ids[i], l, 0, nt, k, v, NULL));
        snap_put(s, k, nt * row, "seq[%u] layer %u K data", i, l);
        snap_put(s, v, nt * row, "seq[%u] layer %u V data", i, l);
        free(k);
        free(v);
      }
    }
  }
  return s;
}

bool tu_snap_equal(const tu_snap *a, const tu_snap *b, char *why,
                   size_t why_len) {
  size_t n = a->n_fields < b->n_fields ? a->n_fields : b->n_fields;
  for (size_t i = 0; i < n; i++) {
    const tu_field *fa = &a->fields[i], *fb = &b->fields[i];
    if (strcmp(fa->name, fb->name) != 0 || fa->len != fb->len ||
        memcmp(a->data + fa->off, b->data + fb->off, fa->len) != 0) {
      snprintf(why, why_len, "%s differs", fa->name);
      return false;
    }
  }
  if (a->n_fields != b->n_fields) {
    snprintf(why, why_len, "%zu fields before, %zu after", a->n_fields,
             b->n_fields);
    return false;
  }
  return true;
}

void tu_snap_free(tu_snap *s) {
  if (!s) return;
  free(s->fields);
  free(s->data);
  free(s);
}

/* ---- counting / failing allocator ---- */

#define TU_MAGIC 0x7475616c6c6f6321ull
#define TU_FREED 0x7475667265656421ull

typedef struct tu_hdr {
  uint64_t magic;
  size_t size;
  size_t align;
  void *raw;
} tu_hdr;

static void *ta_alloc(void *ctx, size_t size, size_t align) {
  tu_alloc *ta = ctx;
  long attempt = ta->attempts++;
  if (ta->fail_at >= 0 &&
      (attempt == ta->fail_at || (ta->fail_after && attempt > ta->fail_at))) {
    ta->failures++;
    return NULL;
  }
  if (ta->max_size && size > ta->max_size) return NULL;
  if (align == 0 || (align & (align - 1)) != 0 || align > 4096) {
    ta->errors++;
    if (ta->errors == 1)
      snprintf(ta->err, sizeof(ta->err), "alloc with bad alignment %zu", align);
    return NULL;
  }
  size_t ra = align < 16 ? 16 : align;
  size_t hdr = sizeof(tu_hdr) > ra ? sizeof(tu_hdr) : ra;
  void *raw = NULL;
  if (posix_memalign(&raw, ra, hdr + size) != 0) return NULL;
  char *p = (char *)raw + hdr;
  tu_hdr *h = (tu_hdr *)(p - sizeof(tu_hdr));
  h->magic = TU_MAGIC;
  h->size = size;
  h->align = align;
  h->raw = raw;
  memset(p, 0xa5, size); /* garbage, so reads of unset memory show */
  ta->total++;
  ta->live++;
  ta->live_bytes += size;
  return p;
}

static void ta_free(void *ctx, void *p, size_t size, size_t align) {
  tu_alloc *ta = ctx;
  if (!p) return;
  tu_hdr *h = (tu_hdr *)((char *)p - sizeof(tu_hdr));
  if (h->magic != TU_MAGIC) {
    ta->errors++;
    if (ta->errors == 1)
      snprintf(ta->err, sizeof(ta->err), "free of %p: %s", p,
               h->magic == TU_FREED ? "double free"
                                    : "not from this allocator");
    return;
  }
  if (h->size != size || h->align != align) {
    ta->errors++;
    if (ta->errors == 1)
      snprintf(ta->err, sizeof(ta->err),
               "free of %p with size %zu align %zu, allocated as size %zu "
               "align %zu",
               p, size, align, h->size, h->align);
  }
  ta->live--;
  ta->live_bytes -= h->size;
  h->magic = TU_FREED;
  memset(p, 0x5a, h->size);
#if defined(__SANITIZE_ADDRESS__)
  free(h->raw);
#else
  const unsigned slot = ta->n_quarantine++ % 32;
  free(ta->quarantine[slot]);
  ta->quarantine[slot] = h->raw;
#endif
}

void tu_alloc_flush(tu_alloc *ta) {
  for (unsigned i = 0; i < 32; i++) {
    free(ta->quarantine[i]);
    ta->quarantine[i] = NULL;
  }
}

void tu_alloc_init(tu_alloc *ta) {
  memset(ta, 0, sizeof(*ta));
  ta->a.alloc = ta_alloc;
  ta->a.free = ta_free;
  ta->a.ctx = ta;
  ta->fail_at = -1;
}

void tu_alloc_arm(tu_alloc *ta, long n, bool after) {
  ta->attempts = 0;
  ta->failures = 0;
  ta->fail_at = n;
  ta->fail_after = after;
}

void tu_alloc_disarm(tu_alloc *ta) { ta->fail_at = -1; }

/* ---- plans ---- */

void tu_check_plan_rows(const pvl_cache *c, const pvl_plan *p,
                        const pvl_seq_id *seqs, uint32_t n) {
  pvl_config cfg;
  TU_OK(c, pvl_cache_config(c, &cfg));
  const pvl_plan_view *v = &p->view;
  cr_assert_eq(v->n_seqs, (int32_t)n, "plan view has %d rows, batch %u",
               v->n_seqs, n);
  cr_assert_eq(v->num_layers, (int32_t)cfg.num_layers);
  const int32_t *buf = v->buf;
  cr_assert_not_null(buf);
  int32_t *ids = malloc(((size_t)cfg.num_blocks + 1) * sizeof(int32_t));
  for (uint32_t l = 0; l < cfg.num_layers; l++) {
    for (uint32_t b = 0; b < n; b++) {
      int64_t len =
          (int64_t)buf[pvl_plan_base_len_index(v, (int32_t)l, (int32_t)b)] +
          buf[pvl_plan_n_appended_index(v, (int32_t)b)];
      int32_t off = buf[pvl_plan_row_offset_index(v, (int32_t)l, (int32_t)b)];
      uint32_t nt = tu_layer_tokens(c, seqs[b], l);
      cr_assert_eq(len, (int64_t)nt,
                   "plan row %u layer %u: length %lld, the table holds %u", b,
                   l, (long long)len, nt);
      uint32_t nb = tu_blocks(c, seqs[b], l, ids, cfg.num_blocks);
      cr_assert_eq(nb, tu_ceil_div(nt, cfg.block_size));
      cr_assert(off >= 0 && (int64_t)off + nb <= v->block_cap,
                "plan row %u layer %u: offset %d + %u blocks outside the "
                "capacity %lld",
                b, l, off, nb, (long long)v->block_cap);
      const int32_t *row = buf + pvl_plan_block_ids_index(v, (int32_t)l) + off;
      for (uint32_t j = 0; j < nb; j++)
        cr_assert_eq(row[j], ids[j],
                     "plan row %u layer %u block %u: %d, the table has %d", b,
                     l, j, row[j], ids[j]);
    }
  }
  free(ids);
}

bool tu_fragmented(const int32_t *ids, uint32_t n) {
  for (uint32_t j = 1; j < n; j++)
    if (ids[j] != ids[j - 1] + 1) return true;
  return false;
}
