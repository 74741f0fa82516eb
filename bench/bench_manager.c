/* bench_manager: host cost of the block manager on one core. (a) one decode
 * step's bookkeeping (pvl_seq_append + pvl_plan_build) for a large batch at a
 * long context; (b) block alloc+free throughput, of the pool itself and of the
 * public one-block admit/free path. Only metadata is timed: the geometry is
 * tiny (1 KV head, head_dim 1, f32) so the pool storage stays small and
 * untouched. Prints a human table, then one JSON line per case. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h" /* pvl__pool_alloc / pvl__pool_decref, pvl_cache */
#include "pagedvl.h"

/* Targets from the design: a step's host bookkeeping must hide behind a
 * step's kernels, and the pool must never be the bottleneck. */
#define TARGET_STEP_US 100.0
#define TARGET_PAIRS_PER_S 50e6
/* No step may stall (issue 7): the worst steps, not only the median. */
#define TARGET_P99_US 150.0
#define TARGET_MAX_US 1000.0

typedef struct options {
  uint64_t seqs, layers, context, block_size, steps, warmup;
  uint64_t plan_cap; /* block_capacity of pvl_plan_create; 0 = default */
  uint64_t pool_pairs, batch, public_pairs, reps;
} options;

static void usage(FILE *f, const char *argv0) {
  fprintf(f,
          "usage: %s [options]\n"
          "\n"
          "Host cost of libpagedvl's block manager (single thread).\n"
          "\n"
          "(a) decode step = pvl_seq_append + pvl_plan_build:\n"
          "  --seqs N          batch size (default 256)\n"
          "  --layers N        layers (default 32)\n"
          "  --context N       prompt tokens per sequence, staggered down by\n"
          "                    i %% block_size (default 4096)\n"
          "  --block-size N    tokens per block (default 16)\n"
          "  --warmup N        untimed steps first (default 200)\n"
          "  --steps N         timed steps (default 2000)\n"
          "  --plan-cap N      block_capacity given to pvl_plan_create "
          "(default 0:\n"
          "                    the library's default)\n"
          "(b) block alloc+free:\n"
          "  --pool-pairs N    pvl__pool_alloc+decref pairs per rep "
          "(default 50000000)\n"
          "  --batch N         blocks held at once in the batched case "
          "(default 4096)\n"
          "  --public-pairs N  pvl_seq_add+pvl_seq_free pairs per rep "
          "(default 2000000)\n"
          "  --reps N          repetitions of each (b) case; median kept "
          "(default 5)\n"
          "  --help\n"
          "\n"
          "Output: a table, then one JSON object per line per case.\n"
          "Targets: <= %.0f us per step (median), p99 < %.0f us, max < %.0f "
          "us,\n"
          "no full plan rewrite after the warm-up; >= %.0f M pairs/s "
          "(pool).\n",
          argv0, TARGET_STEP_US, TARGET_P99_US, TARGET_MAX_US,
          TARGET_PAIRS_PER_S / 1e6);
}

static int parse_u64(const char *flag, const char *s, uint64_t lo, uint64_t hi,
                     uint64_t *out) {
  char *end = NULL;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s || *end != '\0' || s[0] == '-' || v < lo || v > hi) {
    fprintf(stderr,
            "bench_manager: %s expects an integer in [%" PRIu64 ", %" PRIu64
            "], got '%s'\n",
            flag, lo, hi, s);
    return -1;
  }
  *out = v;
  return 0;
}

/* 0 = run, 1 = --help printed, -1 = bad command line. */
static int parse_args(int argc, char **argv, options *o) {
  *o = (options){.seqs = 256,
                 .layers = 32,
                 .context = 4096,
                 .block_size = 16,
                 .steps = 2000,
                 .warmup = 200,
                 .plan_cap = 0,
                 .pool_pairs = 50000000,
                 .batch = 4096,
                 .public_pairs = 2000000,
                 .reps = 5};
  const struct {
    const char *name;
    uint64_t *field, lo, hi;
  } flags[] = {
      {"--seqs", &o->seqs, 1, 1u << 24},
      {"--layers", &o->layers, 1, 4096},
      {"--context", &o->context, 1, INT32_MAX / 2},
      {"--block-size", &o->block_size, 1, 1024},
      {"--steps", &o->steps, 1, INT32_MAX / 2},
      {"--warmup", &o->warmup, 0, INT32_MAX / 2},
      {"--pool-pairs", &o->pool_pairs, 1, UINT64_MAX / 2},
      {"--batch", &o->batch, 1, 1u << 24},
      {"--public-pairs", &o->public_pairs, 1, UINT64_MAX / 2},
      {"--reps", &o->reps, 1, 1000},
      {"--plan-cap", &o->plan_cap, 0, INT32_MAX},
  };
  const size_t n_flags = sizeof(flags) / sizeof(flags[0]);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout, argv[0]);
      return 1;
    }
    size_t k = 0;
    while (k < n_flags && strcmp(a, flags[k].name)) k++;
    if (k == n_flags) {
      fprintf(stderr, "bench_manager: unknown option '%s' (see --help)\n", a);
      return -1;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "bench_manager: %s needs a value (see --help)\n", a);
      return -1;
    }
    const char *v = argv[++i];
    if (parse_u64(a, v, flags[k].lo, flags[k].hi, flags[k].field) != 0)
      return -1;
  }
  return 0;
}

static uint64_t clock_ns(clockid_t id) {
  struct timespec ts;
  clock_gettime(id, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Wall time: what the numbers and the targets are about. */
static uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

/* This thread's CPU time: reported beside wall time because it does not
 * count the time the thread waited for a core, which on a busy shared
 * machine is most of the wall time. */
static uint64_t cpu_ns(void) { return clock_ns(CLOCK_THREAD_CPUTIME_ID); }

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Percentile p in [0, 1] of a sorted array (nearest rank). */
static double pct(const double *sorted, size_t n, double p) {
  size_t i = (size_t)(p * (double)(n - 1) + 0.5);
  return sorted[i < n ? i : n - 1];
}

typedef struct summary {
  double median, p90, p99, max, mean;
} summary;

static summary summarize(double *v, size_t n) {
  summary s = {0, 0, 0, 0, 0};
  if (n == 0) return s;
  for (size_t i = 0; i < n; i++) s.mean += v[i];
  s.mean /= (double)n;
  qsort(v, n, sizeof(*v), cmp_double);
  s.median = pct(v, n, 0.5);
  s.p90 = pct(v, n, 0.9);
  s.p99 = pct(v, n, 0.99);
  s.max = v[n - 1];
  return s;
}

static void fail(const pvl_cache *c, const char *what, pvl_status st) {
  fprintf(stderr, "bench_manager: %s failed: %s\n  %s\n", what,
          pvl_status_string(st),
          c ? pvl_cache_last_error(c) : pvl_create_last_error());
}

#define CHECK(c, call)                                                         \
  do {                                                                         \
    pvl_status st_ = (call);                                                   \
    if (st_ != PVL_SUCCESS) {                                                  \
      fail((c), #call, st_);                                                   \
      goto cleanup;                                                            \
    }                                                                          \
  } while (0)

/* A CPU cache whose blocks hold one f32 K and V per slot: metadata only. */
static pvl_status tiny_cache(uint32_t layers, uint32_t block_size,
                             uint32_t num_blocks, uint32_t max_seqs,
                             pvl_cache **out) {
  pvl_config cfg;
  pvl_status st = pvl_config_init(&cfg);
  if (st != PVL_SUCCESS) return st;
  cfg.backend = PVL_BACKEND_CPU;
  cfg.dtype = PVL_DTYPE_F32;
  cfg.num_layers = layers;
  cfg.num_q_heads = 1;
  cfg.num_kv_heads = 1;
  cfg.head_dim = 1;
  cfg.block_size = block_size;
  cfg.num_blocks = num_blocks;
  cfg.max_seqs = max_seqs;
  return pvl_cache_create(&cfg, out);
}

static uint32_t ceil_div(uint64_t a, uint64_t b) {
  return (uint32_t)(a / b + (a % b != 0));
}

/* ---- (a) decode step ---------------------------------------------------- */

typedef struct step_result {
  summary step, append, build, bytes, step_cpu;
  double entries_mean;
  uint64_t bytes_max, first_build_bytes;
  uint64_t full_rebuilds; /* builds that rewrote the plan whole, timed */
  uint64_t plan_cap, num_blocks;
  uint32_t ctx_min, ctx_max;
} step_result;

static int bench_step(const options *o, step_result *r) {
  int ok = 0;
  pvl_cache *cache = NULL;
  pvl_plan *plan = NULL;
  pvl_seq_id *ids = NULL;
  double *t_step = NULL, *t_app = NULL, *t_build = NULL, *bytes = NULL;
  double *t_cpu = NULL;
  uint32_t n_ids = 0;
  const uint32_t S = (uint32_t)o->seqs, L = (uint32_t)o->layers;
  const uint32_t bs = (uint32_t)o->block_size;
  const uint64_t total_steps = o->warmup + o->steps;
  if (o->context < bs || o->context + total_steps >= INT32_MAX) {
    fprintf(stderr, "bench_manager: --context must be >= --block-size and "
                    "context + steps < 2^31\n");
    return -1;
  }
  /* Sequence i starts at context - i % bs tokens: each step about 1/bs of
   * the batch crosses a block boundary, as in a server whose requests
   * arrived at different times (not all at once every bs steps). */
  const uint32_t max_blocks_row = ceil_div(o->context + total_steps, bs);
  const uint64_t need = (uint64_t)S * L * max_blocks_row;
  if (need > INT32_MAX) {
    fprintf(stderr, "bench_manager: %" PRIu64 " blocks exceed int32 ids\n",
            need);
    return -1;
  }
  r->num_blocks = need + 64;
  /* The library's default plan capacity holds any batch that does not
   * share blocks; --plan-cap tries others (a tight one repacks more). */
  const uint64_t cap = o->plan_cap;

  CHECK(NULL, tiny_cache(L, bs, (uint32_t)r->num_blocks, S, &cache));
  ids = malloc((size_t)S * sizeof(*ids));
  t_step = malloc((size_t)o->steps * sizeof(double));
  t_app = malloc((size_t)o->steps * sizeof(double));
  t_build = malloc((size_t)o->steps * sizeof(double));
  bytes = malloc((size_t)o->steps * sizeof(double));
  t_cpu = malloc((size_t)o->steps * sizeof(double));
  if (!ids || !t_step || !t_app || !t_build || !bytes || !t_cpu) {
    fprintf(stderr, "bench_manager: out of memory\n");
    goto cleanup;
  }
  for (uint32_t i = 0; i < S; i++) {
    pvl_span img = {0, (uint32_t)o->context / 2}; /* metadata only */
    CHECK(cache,
          pvl_seq_add(cache, (uint32_t)o->context - i % bs, &img, 1, &ids[i]));
    n_ids++;
  }
  CHECK(cache, pvl_plan_create(cache, S, cap, &plan));
  pvl_plan_info info;
  CHECK(cache, pvl_plan_get_info(plan, &info));
  r->plan_cap = info.block_capacity;
  CHECK(cache, pvl_plan_build(plan, ids, S, NULL)); /* the one full upload */
  CHECK(cache, pvl_plan_get_info(plan, &info));
  r->first_build_bytes = info.last_update_bytes;
  uint64_t rebuilds0 = info.full_rebuilds;
  r->ctx_min = (uint32_t)(o->context - (S > bs ? bs - 1 : S - 1) + o->warmup);
  r->ctx_max = (uint32_t)(o->context + o->warmup + o->steps);

  uint64_t entries_sum = 0;
  for (uint64_t s = 0; s < total_steps; s++) {
    const uint64_t c0 = cpu_ns();
    const uint64_t t0 = now_ns();
    CHECK(cache, pvl_seq_append(cache, ids, S, NULL));
    const uint64_t t1 = now_ns();
    CHECK(cache, pvl_plan_build(plan, ids, S, NULL));
    const uint64_t t2 = now_ns();
    const uint64_t c1 = cpu_ns();
    if (s < o->warmup) {
      /* Full rewrites are counted from the end of the warm-up. */
      CHECK(cache, pvl_plan_get_info(plan, &info));
      rebuilds0 = info.full_rebuilds;
      continue;
    }
    const size_t k = (size_t)(s - o->warmup);
    t_app[k] = (double)(t1 - t0) / 1e3;
    t_build[k] = (double)(t2 - t1) / 1e3;
    t_step[k] = (double)(t2 - t0) / 1e3;
    t_cpu[k] = (double)(c1 - c0) / 1e3;
    CHECK(cache, pvl_plan_get_info(plan, &info));
    bytes[k] = (double)info.last_update_bytes;
    entries_sum += info.last_update_entries;
  }
  r->full_rebuilds = info.full_rebuilds - rebuilds0;
  r->bytes = summarize(bytes, o->steps);
  r->step_cpu = summarize(t_cpu, o->steps);
  r->entries_mean = (double)entries_sum / (double)o->steps;
  r->step = summarize(t_step, o->steps);
  r->append = summarize(t_app, o->steps);
  r->build = summarize(t_build, o->steps);

  /* The books must still balance after all that. */
  char msg[256] = "";
  if (pvl__cache_check(cache, msg, sizeof(msg)) != PVL_SUCCESS) {
    fprintf(stderr, "bench_manager: cache invariants broken: %s\n", msg);
    goto cleanup;
  }
  ok = 1;

cleanup:
  for (uint32_t i = 0; i < n_ids; i++) pvl_seq_free(cache, ids[i]);
  pvl_plan_destroy(plan);
  pvl_cache_destroy(cache);
  free(ids);
  free(t_step);
  free(t_app);
  free(t_build);
  free(bytes);
  free(t_cpu);
  return ok ? 0 : -1;
}

/* ---- (b) alloc + free --------------------------------------------------- */

/* Defeats dead-code elimination of the loops below. */
static volatile int64_t g_sink;

/* Pairs per second, median over reps, of three patterns:
 *   lifo:    alloc one block, free it (the hottest path: the block is reused)
 *   batched: alloc `batch` blocks, then free them oldest first, which
 *            scrambles the free stack as a server's mix of frees does
 *   public:  pvl_seq_add of a 1-token prompt + pvl_seq_free in a 1-layer
 *            cache (validation, sequence metadata, one block) */
typedef struct pairs_result {
  double lifo, batched, public_path;             /* wall time */
  double lifo_cpu, batched_cpu, public_path_cpu; /* thread CPU time */
} pairs_result;

static int bench_pairs(const options *o, pairs_result *r) {
  int ok = 0;
  pvl_cache *cache = NULL;
  int32_t *held = NULL;
  double *rate = malloc((size_t)o->reps * sizeof(double));
  double *rate_cpu = malloc((size_t)o->reps * sizeof(double));
  const uint32_t nb = o->batch > 1024 ? (uint32_t)o->batch : 1024;
  held = malloc((size_t)nb * sizeof(int32_t));
  if (!rate || !rate_cpu || !held) {
    fprintf(stderr, "bench_manager: out of memory\n");
    goto cleanup;
  }
  CHECK(NULL, tiny_cache(1, 16, nb, 16, &cache));
  pvl_pool *pool = &cache->pool;

  /* lifo */
  for (uint64_t rep = 0; rep < o->reps; rep++) {
    int64_t acc = 0;
    const uint64_t c0 = cpu_ns(), t0 = now_ns();
    for (uint64_t i = 0; i < o->pool_pairs; i++) {
      int32_t b = pvl__pool_alloc(pool);
      acc += b;
      pvl__pool_decref(pool, b);
    }
    const uint64_t t1 = now_ns(), c1 = cpu_ns();
    g_sink += acc;
    rate[rep] = (double)o->pool_pairs / ((double)(t1 - t0) * 1e-9);
    rate_cpu[rep] = (double)o->pool_pairs / ((double)(c1 - c0) * 1e-9);
  }
  r->lifo = summarize(rate, o->reps).median;
  r->lifo_cpu = summarize(rate_cpu, o->reps).median;

  /* batched */
  const uint32_t batch = (uint32_t)o->batch;
  const uint64_t rounds = (o->pool_pairs + batch - 1) / batch;
  for (uint64_t rep = 0; rep < o->reps; rep++) {
    int64_t acc = 0;
    const uint64_t c0 = cpu_ns(), t0 = now_ns();
    for (uint64_t k = 0; k < rounds; k++) {
      for (uint32_t i = 0; i < batch; i++) held[i] = pvl__pool_alloc(pool);
      for (uint32_t i = 0; i < batch; i++) {
        acc += held[i];
        pvl__pool_decref(pool, held[i]);
      }
    }
    const uint64_t t1 = now_ns(), c1 = cpu_ns();
    g_sink += acc;
    rate[rep] = (double)(rounds * batch) / ((double)(t1 - t0) * 1e-9);
    rate_cpu[rep] = (double)(rounds * batch) / ((double)(c1 - c0) * 1e-9);
  }
  r->batched = summarize(rate, o->reps).median;
  r->batched_cpu = summarize(rate_cpu, o->reps).median;
  if (pool->num_free != pool->num_blocks) {
    fprintf(stderr, "bench_manager: the pool leaked blocks\n");
    goto cleanup;
  }

  /* public */
  for (uint64_t rep = 0; rep < o->reps; rep++) {
    const uint64_t c0 = cpu_ns(), t0 = now_ns();
    for (uint64_t i = 0; i < o->public_pairs; i++) {
      pvl_seq_id id;
      CHECK(cache, pvl_seq_add(cache, 1, NULL, 0, &id));
      CHECK(cache, pvl_seq_free(cache, id));
    }
    const uint64_t t1 = now_ns(), c1 = cpu_ns();
    rate[rep] = (double)o->public_pairs / ((double)(t1 - t0) * 1e-9);
    rate_cpu[rep] = (double)o->public_pairs / ((double)(c1 - c0) * 1e-9);
  }
  r->public_path = summarize(rate, o->reps).median;
  r->public_path_cpu = summarize(rate_cpu, o->reps).median;
  ok = 1;

cleanup:
  pvl_cache_destroy(cache);
  free(held);
  free(rate);
  free(rate_cpu);
  return ok ? 0 : -1;
}

/* ---- report -------------------------------------------------------------- */

static const char *verdict(int met) { return met ? "met" : "MISSED"; }

int main(int argc, char **argv) {
  options o;
  int parsed = parse_args(argc, argv, &o);
  if (parsed != 0) return parsed > 0 ? EXIT_SUCCESS : EXIT_FAILURE;

  step_result a;
  pairs_result b;
  memset(&a, 0, sizeof(a));
  memset(&b, 0, sizeof(b));
  if (bench_step(&o, &a) != 0) return EXIT_FAILURE;
  if (bench_pairs(&o, &b) != 0) return EXIT_FAILURE;

  const int step_ok = a.step.median <= TARGET_STEP_US;
  const int p99_ok = a.step.p99 < TARGET_P99_US;
  const int max_ok = a.step.max < TARGET_MAX_US;
  const int lifo_ok = b.lifo >= TARGET_PAIRS_PER_S;
  const int batched_ok = b.batched >= TARGET_PAIRS_PER_S;
  const uint64_t batched_pairs =
      (o.pool_pairs + o.batch - 1) / o.batch * o.batch;

  printf("libpagedvl %u.%u.%u  bench_manager  (one thread, CPU backend, "
         "metadata only)\n"
         "wall = CLOCK_MONOTONIC (the targets); cpu = this thread's CPU "
         "time\n\n",
         PVL_VERSION_MAJOR, PVL_VERSION_MINOR, PVL_VERSION_PATCH);
  printf(
      "(a) decode step = pvl_seq_append + pvl_plan_build\n"
      "    %" PRIu64 " seqs x %" PRIu64 " layers, block %" PRIu64
      ", %" PRIu64 " timed steps after %" PRIu64 " warm-up\n"
      "    context: prompts of --context %" PRIu64 " minus i %% %" PRIu64
      " tokens (staggered, so\n"
      "    sequences cross block boundaries on different steps); "
      "%u..%u tokens over\n"
      "    the timed steps (prompt + warm-up + timed steps)\n",
      o.seqs, o.layers, o.block_size, o.steps, o.warmup, o.context,
      o.block_size, a.ctx_min, a.ctx_max);
  printf("    pool %" PRIu64 " blocks, plan capacity %" PRIu64
         " block-id entries (pvl_plan_info.block_capacity)\n",
         a.num_blocks, a.plan_cap);
  printf("    %-26s %9s %9s %9s %9s %9s\n", "us per step", "median", "p90",
         "p99", "max", "mean");
  const struct {
    const char *name;
    const summary *s;
  } rows[] = {{"append + plan_build, wall", &a.step},
              {"  pvl_seq_append, wall", &a.append},
              {"  pvl_plan_build, wall", &a.build},
              {"append + plan_build, cpu", &a.step_cpu}};
  for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
    printf("    %-26s %9.2f %9.2f %9.2f %9.2f %9.2f\n", rows[i].name,
           rows[i].s->median, rows[i].s->p90, rows[i].s->p99, rows[i].s->max,
           rows[i].s->mean);
  printf("    plan bytes per step: median %.0f, p90 %.0f, p99 %.0f, mean %.0f, "
         "max %.0f\n    (first full build: %" PRIu64 " bytes)\n",
         a.bytes.median, a.bytes.p90, a.bytes.p99, a.bytes.mean, a.bytes.max,
         a.first_build_bytes);
  printf("    full plan rewrites after warm-up (pvl_plan_info.full_rebuilds): "
         "%" PRIu64 "\n",
         a.full_rebuilds);
  printf("    target <= %.0f us per step (median, wall): %s\n", TARGET_STEP_US,
         verdict(step_ok));
  printf("    target p99 < %.0f us (wall): %s (%.1f us; cpu %.1f us)\n",
         TARGET_P99_US, verdict(p99_ok), a.step.p99, a.step_cpu.p99);
  printf("    target max < %.0f us (wall): %s (%.1f us; cpu %.1f us)\n",
         TARGET_MAX_US, verdict(max_ok), a.step.max, a.step_cpu.max);
  printf("    target 0 full rewrites after warm-up: %s\n\n",
         verdict(a.full_rebuilds == 0));
  printf("(b) block alloc+free, pairs per second (median of %" PRIu64
         " reps)\n",
         o.reps);
  printf("    %-36s %11s %11s %9s\n", "", "wall", "cpu", "ns/pair");
  printf("    %-36s %9.1f M %9.1f M %9.2f  %s\n", "pool, lifo (alloc, free)",
         b.lifo / 1e6, b.lifo_cpu / 1e6, 1e9 / b.lifo, verdict(lifo_ok));
  printf("    %-36s %9.1f M %9.1f M %9.2f  %s\n",
         "pool, batched (alloc N, free N)", b.batched / 1e6,
         b.batched_cpu / 1e6, 1e9 / b.batched, verdict(batched_ok));
  printf("    %-36s %9.2f M %9.2f M %9.1f\n",
         "public, pvl_seq_add(1 token) + free", b.public_path / 1e6,
         b.public_path_cpu / 1e6, 1e9 / b.public_path);
  printf("    target >= %.0f M pairs/s on the pool (wall)\n\n",
         TARGET_PAIRS_PER_S / 1e6);

  printf("{\"bench\":\"manager\",\"case\":\"decode_step\",\"seqs\":%" PRIu64
         ",\"layers\":%" PRIu64 ",\"block_size\":%" PRIu64
         ",\"context_min\":%u,\"context_max\":%u,\"steps\":%" PRIu64
         ",\"warmup\":%" PRIu64 ",\"median_us\":%.3f,\"p90_us\":%.3f,"
         "\"p99_us\":%.3f,\"max_us\":%.3f,\"mean_us\":%.3f,"
         "\"append_median_us\":%.3f,\"build_median_us\":%.3f,"
         "\"cpu_median_us\":%.3f,\"cpu_p90_us\":%.3f,"
         "\"cpu_p99_us\":%.3f,\"cpu_max_us\":%.3f,"
         "\"plan_bytes_median\":%.0f,\"plan_bytes_mean\":%.1f,"
         "\"plan_bytes_p99\":%.0f,"
         "\"plan_bytes_max\":%.0f,\"plan_entries_mean\":%.1f,"
         "\"first_build_bytes\":%" PRIu64
         ",\"full_rewrites_after_warmup\":%" PRIu64
         ",\"target_us\":%.0f,\"met\":%s,\"target_p99_us\":%.0f,"
         "\"p99_met\":%s,\"target_max_us\":%.0f,\"max_met\":%s}\n",
         o.seqs, o.layers, o.block_size, a.ctx_min, a.ctx_max, o.steps,
         o.warmup, a.step.median, a.step.p90, a.step.p99, a.step.max,
         a.step.mean, a.append.median, a.build.median, a.step_cpu.median,
         a.step_cpu.p90, a.step_cpu.p99, a.step_cpu.max, a.bytes.median,
         a.bytes.mean, a.bytes.p99, a.bytes.max, a.entries_mean,
         a.first_build_bytes, a.full_rebuilds, TARGET_STEP_US,
         step_ok ? "true" : "false", TARGET_P99_US, p99_ok ? "true" : "false",
         TARGET_MAX_US, max_ok ? "true" : "false");
  printf("{\"bench\":\"manager\",\"case\":\"pool_alloc_free_lifo\","
         "\"pairs\":%" PRIu64 ",\"reps\":%" PRIu64 ",\"pairs_per_s\":%.0f,"
         "\"cpu_pairs_per_s\":%.0f,\"target_pairs_per_s\":%.0f,\"met\":%s}\n",
         o.pool_pairs, o.reps, b.lifo, b.lifo_cpu, TARGET_PAIRS_PER_S,
         lifo_ok ? "true" : "false");
  printf("{\"bench\":\"manager\",\"case\":\"pool_alloc_free_batched\","
         "\"batch\":%" PRIu64 ",\"pairs\":%" PRIu64 ",\"reps\":%" PRIu64
         ",\"pairs_per_s\":%.0f,\"cpu_pairs_per_s\":%.0f,"
         "\"target_pairs_per_s\":%.0f,\"met\":%s}\n",
         o.batch, batched_pairs, o.reps, b.batched, b.batched_cpu,
         TARGET_PAIRS_PER_S, batched_ok ? "true" : "false");
  printf("{\"bench\":\"manager\",\"case\":\"public_seq_add_free\","
         "\"pairs\":%" PRIu64 ",\"reps\":%" PRIu64 ",\"pairs_per_s\":%.0f,"
         "\"cpu_pairs_per_s\":%.0f}\n",
         o.public_pairs, o.reps, b.public_path, b.public_path_cpu);
  return EXIT_SUCCESS;
}
