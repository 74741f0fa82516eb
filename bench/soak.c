/* Soak: a long run of random VALID operations on a CPU cache (add with
 * visual spans, prefill writes, batched appends with kv writes through the
 * plan, forks, retains, frees, plan builds and decode attention, observe +
 * compress with every policy, decode caps, reads and queries). Every call
 * is one the contract says must succeed (the soak checks the pool and the
 * batch first), so any failure is a bug and stops the run.
 *
 * Every --check-every operations pvl__cache_check must pass. At the end
 * every sequence is freed: every block must be free again, and once the
 * cache is destroyed the counting allocator passed in the config must hold
 * no allocation. Prints operations per second, the allocator's high-water
 * mark (peak host heap of the cache, pool storage included) and the peak
 * RSS of the process. Not a ctest test: run it under the sanitizer build,
 *
 *   cmake -S . -B build-asan -DPVL_SANITIZE=ON -DPVL_CUDA=OFF
 *   cmake --build build-asan -j2 --target soak
 *   build-asan/soak --ops 1000000 --seed 1 --check-every 1000
 */
#define _POSIX_C_SOURCE 200809L /* posix_memalign, clock_gettime, dirent */

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "internal.h"
#include "pagedvl.h"

/* ---- counting allocator ---- */

typedef struct soak_alloc {
  pvl_allocator a;
  long live, total;
  size_t live_bytes, peak_bytes;
  long bad_frees;
} soak_alloc;

static void *sa_alloc(void *ctx, size_t size, size_t align) {
  soak_alloc *s = ctx;
  if (align < sizeof(void *)) align = sizeof(void *);
  void *p = NULL;
  if (posix_memalign(&p, align, size ? size : 1) != 0) return NULL;
  s->live++;
  s->total++;
  s->live_bytes += size;
  if (s->live_bytes > s->peak_bytes) s->peak_bytes = s->live_bytes;
  return p;
}

static void sa_free(void *ctx, void *ptr, size_t size, size_t align) {
  soak_alloc *s = ctx;
  (void)align;
  if (!ptr) return;
  if (size > s->live_bytes) s->bad_frees++;
  s->live--;
  s->live_bytes -= size;
  free(ptr);
}

/* ---- state ---- */

#define MAX_SEQS 48
#define L 4
#define QH 4
#define KH 2
#define D 8
#define BS 8
#define NB 768

typedef struct soak {
  pvl_cache *c;
  pvl_plan *plan;
  uint64_t rng;
  pvl_seq_id ids[MAX_SEQS];
  bool compressed[MAX_SEQS]; /* compress ran, or a layer lost prompt slots */
  uint32_t n;                /* live sequences: ids[0..n) */
  long step;
  long count[16];
  const char *op;
  uint16_t *k, *v, *q, *out; /* f16 staging */
  uint32_t *keep, *pos;
  int32_t *blocks;
} soak;

static void die(const soak *S, const char *what, pvl_status st) {
  fprintf(stderr, "soak: step %ld op %s: %s -> %s (%s)\n", S->step, S->op, what,
          pvl_status_string(st), pvl_cache_last_error(S->c));
  exit(1);
}
#define OK(call)                                                               \
  do {                                                                         \
    pvl_status st_ = (call);                                                   \
    if (st_ != PVL_SUCCESS) die(S, #call, st_);                                \
  } while (0)

static uint64_t rnd(soak *S) {
  uint64_t z = (S->rng += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
static uint32_t below(soak *S, uint32_t n) {
  return n ? (uint32_t)(rnd(S) % n) : 0;
}

/* f16 bit patterns of j/16, j in [-64, 63]: finite, exact, small. */
static uint16_t f16_of(int32_t j) {
  if (j == 0) return 0;
  uint16_t sign = j < 0 ? 0x8000 : 0;
  uint32_t a = (uint32_t)(j < 0 ? -j : j), e = 0;
  while ((a >> e) > 1) e++;
  /* value = a / 16 = 1.m * 2^(e - 4) */
  uint32_t mant = ((a << 10) >> e) & 0x3ff;
  return (uint16_t)(sign | ((e - 4 + 15) << 10) | mant);
}
static void fill(soak *S, uint16_t *dst, size_t n) {
  for (size_t i = 0; i < n; i++) dst[i] = f16_of((int32_t)below(S, 128) - 64);
}

static uint32_t layer_tokens(soak *S, pvl_seq_id id, uint32_t l) {
  uint32_t t = 0, b = 0;
  OK(pvl_seq_layer_size(S->c, id, l, &t, &b));
  return t;
}
static uint32_t free_blocks(soak *S) {
  pvl_stats st;
  OK(pvl_cache_get_stats(S->c, &st));
  return st.free_blocks;
}
/* Is a block of [first, first + n) of the layer shared with a fork? */
static bool shared(soak *S, pvl_seq_id id, uint32_t l, uint32_t first,
                   uint32_t n) {
  uint32_t nb = 0;
  OK(pvl_seq_blocks(S->c, id, l, S->blocks, NB, &nb));
  for (uint32_t b = first / BS; n && b <= (first + n - 1) / BS; b++)
    if (pvl__block_refcount(S->c, S->blocks[b]) > 1) return true;
  return false;
}

/* ---- operations, each valid by construction ---- */

static void op_add(soak *S) {
  if (S->n == MAX_SEQS) return;
  uint32_t n = 1 + below(S, 64);
  pvl_admit a;
  OK(pvl_can_add(S->c, n, &a));
  if (a != PVL_ADMIT_OK) return;
  pvl_span sp[2];
  uint32_t ns = 0;
  if (n > 4 && below(S, 4) != 0) { /* an image, then maybe a second one */
    uint32_t b = below(S, n / 2), e = b + 1 + below(S, n / 2 - b);
    sp[ns++] = (pvl_span){b, e};
    if (e + 2 < n && below(S, 2)) sp[ns++] = (pvl_span){e + 1, n - 1};
  }
  pvl_seq_id id;
  OK(pvl_seq_add(S->c, n, ns ? sp : NULL, ns, &id));
  S->compressed[S->n] = false;
  S->ids[S->n++] = id;
  for (uint32_t l = 0; l < L; l++) {
    fill(S, S->k, (size_t)n * KH * D);
    fill(S, S->v, (size_t)n * KH * D);
    OK(pvl_kv_write(S->c, id, l, 0, n, S->k, S->v, NULL));
  }
}

static void op_free(soak *S) {
  if (!S->n) return;
  uint32_t i = below(S, S->n);
  OK(pvl_seq_free(S->c, S->ids[i]));
  S->ids[i] = S->ids[--S->n];
  S->compressed[i] = S->compressed[S->n];
}

static void op_fork(soak *S) {
  if (!S->n || S->n == MAX_SEQS) return;
  uint32_t i = below(S, S->n);
  pvl_seq_id id;
  OK(pvl_seq_fork(S->c, S->ids[i], &id));
  /* The fork may not be compressed (its parent's tables may not be the
   * prompt any more). */
  S->compressed[S->n] = true;
  S->ids[S->n++] = id;
}

/* A decode step: append a batch, build the plan, write the new tokens
 * through it and run attention on every layer. */
static void op_step(soak *S) {
  if (!S->n) return;
  pvl_seq_id batch[MAX_SEQS];
  uint32_t nb = 0;
  for (uint32_t i = 0; i < S->n && nb < 8; i++)
    if (below(S, 3) == 0) batch[nb++] = S->ids[i];
  if (!nb) batch[nb++] = S->ids[below(S, S->n)];
  uint64_t need = 0;
  OK(pvl_blocks_for_append(S->c, batch, nb, &need));
  if (need > free_blocks(S)) return;
  OK(pvl_seq_append(S->c, batch, nb, NULL));
  OK(pvl_plan_build(S->plan, batch, nb, NULL));
  for (uint32_t l = 0; l < L; l++) {
    fill(S, S->k, (size_t)nb * KH * D);
    fill(S, S->v, (size_t)nb * KH * D);
    OK(pvl_plan_kv_write(S->plan, l, S->k, S->v, NULL));
    fill(S, S->q, (size_t)nb * QH * D);
    OK(pvl_attention_decode(S->plan, l, S->q, S->out, 0.0f, NULL));
    for (size_t e = 0; e < (size_t)nb * QH * D; e++)
      if ((S->out[e] & 0x7c00) == 0x7c00) die(S, "attention: not finite", 0);
  }
}

static void op_retain(soak *S) {
  if (!S->n) return;
  uint32_t i = below(S, S->n), l = below(S, L);
  pvl_seq_id id = S->ids[i];
  uint32_t n = layer_tokens(S, id, l), k = 0;
  for (uint32_t j = 0; j < n; j++)
    if (below(S, 4) != 0) S->keep[k++] = j;
  if ((k + BS - 1) / BS > free_blocks(S)) return;
  OK(pvl_seq_retain(S->c, id, l, S->keep, k, NULL));
  S->compressed[i] = true;
}

static void op_write_read(soak *S) {
  if (!S->n) return;
  pvl_seq_id id = S->ids[below(S, S->n)];
  uint32_t l = below(S, L), n = layer_tokens(S, id, l);
  if (!n) return;
  uint32_t first = below(S, n), cnt = 1 + below(S, n - first);
  fill(S, S->k, (size_t)cnt * KH * D);
  fill(S, S->v, (size_t)cnt * KH * D);
  if (!shared(S, id, l, first, cnt)) {
    OK(pvl_kv_write(S->c, id, l, first, cnt, S->k, S->v, NULL));
    OK(pvl_kv_read(S->c, id, l, first, cnt, S->q, S->out, NULL));
    if (memcmp(S->q, S->k, (size_t)cnt * KH * D * 2) ||
        memcmp(S->out, S->v, (size_t)cnt * KH * D * 2))
      die(S, "kv_read differs from kv_write", 0);
  } else {
    OK(pvl_kv_read(S->c, id, l, first, cnt, S->k, S->v, NULL));
  }
}

static void op_compress(soak *S) {
  if (!S->n) return;
  uint32_t i = below(S, S->n);
  if (S->compressed[i]) return;
  pvl_seq_id id = S->ids[i];
  pvl_policy pol;
  OK(pvl_policy_init(&pol, (pvl_policy_kind)below(S, 6)));
  pol.keep_ratio = 0.1f + 0.2f * (float)below(S, 5);
  uint32_t first = 0, nr = 0, fb = 0;
  OK(pvl_policy_rows(&pol, S->c, id, &first, &nr, &fb));
  if (nr > 16) { /* the last rows of the window keep the soak fast */
    first += nr - 16;
    nr = 16;
  }
  if (nr)
    for (uint32_t l = 0; l < L; l++) {
      fill(S, S->q, (size_t)nr * QH * D);
      OK(pvl_observe(S->c, id, l, S->q, first, nr, pol.threshold, 0.0f, NULL));
    }
  pvl_status st = pvl_compress(S->c, id, &pol, NULL, NULL);
  /* Compaction gathers into fresh blocks: a full pool may refuse. */
  if (st == PVL_ERR_OUT_OF_BLOCKS) return;
  if (st != PVL_SUCCESS) die(S, "pvl_compress", st);
  S->compressed[i] = true;
}

static void op_decode_cap(soak *S) {
  if (!S->n) return;
  uint32_t i = below(S, S->n), l = below(S, L);
  pvl_seq_id id = S->ids[i];
  pvl_policy pol;
  OK(pvl_policy_init(&pol, (pvl_policy_kind)(1 + below(S, 5))));
  pol.decode_cap = 16 + below(S, 64);
  pvl_seq_info info;
  OK(pvl_seq_get_info(S->c, id, &info));
  uint32_t nr = 1 + below(S, 4);
  if (nr > info.position) nr = info.position;
  if (!layer_tokens(S, id, l)) return;
  fill(S, S->q, (size_t)nr * QH * D);
  OK(pvl_observe(S->c, id, l, S->q, info.position - nr, nr, 0.01f, 0.0f, NULL));
  uint32_t did = 0;
  pvl_status st = pvl_decode_cap(S->c, id, l, &pol, &did, NULL);
  if (st == PVL_ERR_OUT_OF_BLOCKS) return;
  if (st != PVL_SUCCESS) die(S, "pvl_decode_cap", st);
  if (did) S->compressed[i] = true;
}

static void op_query(soak *S) {
  pvl_stats st;
  OK(pvl_cache_get_stats(S->c, &st));
  if (st.used_blocks + st.free_blocks != NB) die(S, "stats: used + free", 0);
  if (!S->n) return;
  pvl_seq_id id = S->ids[below(S, S->n)];
  uint32_t l = below(S, L), n = 0;
  OK(pvl_seq_positions(S->c, id, l, S->pos, NB * BS, &n));
  for (uint32_t j = 1; j < n; j++)
    if (S->pos[j] <= S->pos[j - 1]) die(S, "positions not ascending", 0);
}

static void check(soak *S) {
  char msg[512] = "";
  pvl_status st = pvl__cache_check(S->c, msg, sizeof(msg));
  if (st != PVL_SUCCESS) {
    fprintf(stderr, "soak: step %ld: pvl__cache_check: %s\n", S->step, msg);
    exit(1);
  }
}

static double clock_s(clockid_t id) {
  struct timespec ts;
  clock_gettime(id, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
  long ops = 1000000, every = 1000;
  uint64_t seed = 1;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--ops") && i + 1 < argc) {
      ops = strtol(argv[++i], NULL, 10);
    } else if (!strcmp(argv[i], "--seed") && i + 1 < argc) {
      seed = strtoull(argv[++i], NULL, 10);
    } else if (!strcmp(argv[i], "--check-every") && i + 1 < argc) {
      every = strtol(argv[++i], NULL, 10);
    } else {
      fprintf(stderr,
              "usage: %s [--ops N] [--seed S] [--check-every N]\n"
              "unknown or incomplete argument: %s\n",
              argv[0], argv[i]);
      return 2;
    }
  }
  if (ops < 0 || every < 1) {
    fprintf(stderr, "--ops must be >= 0 and --check-every >= 1\n");
    return 2;
  }
  soak_alloc sa = {{sa_alloc, sa_free, NULL}, 0, 0, 0, 0, 0};
  sa.a.ctx = &sa;
  soak s;
  soak *S = &s;
  memset(S, 0, sizeof(*S));
  S->rng = seed;
  S->op = "setup";
  pvl_config cfg;
  OK(pvl_config_init(&cfg));
  cfg.backend = PVL_BACKEND_CPU;
  cfg.dtype = PVL_DTYPE_F16;
  cfg.num_layers = L;
  cfg.num_q_heads = QH;
  cfg.num_kv_heads = KH;
  cfg.head_dim = D;
  cfg.block_size = BS;
  cfg.num_blocks = NB;
  cfg.max_seqs = MAX_SEQS;
  cfg.allocator = &sa.a;
  pvl_status st = pvl_cache_create(&cfg, &S->c);
  if (st != PVL_SUCCESS) {
    fprintf(stderr, "create: %s\n", pvl_create_last_error());
    return 1;
  }
  OK(pvl_plan_create(S->c, 16, 0, &S->plan));
  const size_t tok = (size_t)NB * BS * QH * D;
  S->k = malloc(tok * 2);
  S->v = malloc(tok * 2);
  S->q = malloc(tok * 2);
  S->out = malloc(tok * 2);
  S->keep = malloc((size_t)NB * BS * sizeof(uint32_t));
  S->pos = malloc((size_t)NB * BS * sizeof(uint32_t));
  S->blocks = malloc(NB * sizeof(int32_t));
  if (!S->k || !S->v || !S->q || !S->out || !S->keep || !S->pos || !S->blocks) {
    fprintf(stderr, "out of memory\n");
    return 1;
  }

  static const char *names[9] = {"add",      "free",       "fork",
                                 "step",     "retain",     "write_read",
                                 "compress", "decode_cap", "query"};
  /* Weights: decode steps dominate, as in serving; frees keep up with adds
   * so the pool cycles between full and empty. */
  static const uint32_t weight[9] = {14, 12, 4, 30, 6, 12, 8, 6, 8};
  /* Wall time and this process's CPU time: on a shared machine only the
   * latter means something. */
  const double t0 = clock_s(CLOCK_MONOTONIC);
  const double c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
  for (S->step = 0; S->step < ops; S->step++) {
    uint32_t x = below(S, 100), op = 0;
    while (x >= weight[op]) x -= weight[op++];
    S->op = names[op];
    S->count[op]++;
    switch (op) {
    case 0: op_add(S); break;
    case 1: op_free(S); break;
    case 2: op_fork(S); break;
    case 3: op_step(S); break;
    case 4: op_retain(S); break;
    case 5: op_write_read(S); break;
    case 6: op_compress(S); break;
    case 7: op_decode_cap(S); break;
    default: op_query(S); break;
    }
    if ((S->step + 1) % every == 0) check(S);
  }
  const double secs = clock_s(CLOCK_MONOTONIC) - t0;
  const double cpu = clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0;
  S->op = "teardown";
  check(S);
  while (S->n) op_free(S);
  check(S);
  pvl_stats stats;
  OK(pvl_cache_get_stats(S->c, &stats));
  if (stats.free_blocks != NB || stats.tokens != 0 || stats.num_seqs != 0) {
    fprintf(stderr,
            "soak: after freeing every sequence %u of %u blocks are "
            "free, %llu tokens held\n",
            stats.free_blocks, NB, (unsigned long long)stats.tokens);
    return 1;
  }
  OK(pvl_plan_destroy(S->plan));
  OK(pvl_cache_destroy(S->c));
  if (sa.live != 0 || sa.live_bytes != 0 || sa.bad_frees) {
    fprintf(stderr,
            "soak: %ld allocations (%zu bytes) outlive the cache, "
            "%ld frees of more than was live\n",
            sa.live, sa.live_bytes, sa.bad_frees);
    return 1;
  }
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("soak: %ld operations, seed %llu, invariants every %ld: OK\n", ops,
         (unsigned long long)seed, every);
  for (int i = 0; i < 9; i++) printf("  %-10s %ld\n", names[i], S->count[i]);
  printf("wall %.2f s, %.0f operations/s; CPU %.2f s, %.0f operations/s\n",
         secs, secs > 0 ? ops / secs : 0, cpu, cpu > 0 ? ops / cpu : 0);
  printf("peak host heap of the cache %.2f MiB (%zu bytes, %ld allocations "
         "in all); peak RSS %.1f MiB\n",
         (double)sa.peak_bytes / 1048576.0, sa.peak_bytes, sa.total,
         (double)ru.ru_maxrss / 1024.0);
  printf("{\"bench\":\"soak\",\"ops\":%ld,\"seed\":%llu,\"seconds\":%.3f,"
         "\"cpu_seconds\":%.3f,\"ops_per_s\":%.0f,\"ops_per_cpu_s\":%.0f,"
         "\"peak_heap_bytes\":%zu,\"peak_rss_kib\":%ld}\n",
         ops, (unsigned long long)seed, secs, cpu, secs > 0 ? ops / secs : 0,
         cpu > 0 ? ops / cpu : 0, sa.peak_bytes, ru.ru_maxrss);
  free(S->k);
  free(S->v);
  free(S->q);
  free(S->out);
  free(S->keep);
  free(S->pos);
  free(S->blocks);
  return 0;
}
