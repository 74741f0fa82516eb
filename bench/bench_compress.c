/* Host cost of compression per request: pvl_observe over every layer plus
 * pvl_compress, on the CPU backend, for each policy that observes. Prints
 * one CSV line per case and a table. Not run by ctest. */
#define _POSIX_C_SOURCE 199309L
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pagedvl.h"

typedef struct opts {
  uint32_t layers, q_heads, kv_heads, head_dim, block_size;
  uint32_t visual, text, reps;
} opts;

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static uint64_t g_rng = 88172645463325252ull;
static float frand(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (float)((g_rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

#define CHECK(c, call)                                                         \
  do {                                                                         \
    pvl_status s_ = (call);                                                    \
    if (s_ != PVL_SUCCESS) {                                                   \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__,                   \
              pvl_status_string(s_),                                           \
              (c) ? pvl_cache_last_error(c) : pvl_create_last_error());        \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

/* The defaults: a small VLM-shaped request (4 layers, 8/2 heads, head_dim
 * 64, 5 + 576 visual + 60 text tokens) that times in seconds on two cores. */
static const opts k_defaults = {4, 8, 2, 64, 16, 576, 60, 5};

static void usage(FILE *f) {
  fprintf(f,
          "usage: bench_compress [options]\n"
          "Times pvl_observe (all layers) + pvl_compress per request on the\n"
          "CPU backend (f32) for vlcache, snapkv, pyramidkv and h2o; the\n"
          "prompt is 5 text + visual + text tokens.\n"
          "  --layers N      layers (default %u)\n"
          "  --q-heads N     query heads (default %u)\n"
          "  --kv-heads N    KV heads, dividing --q-heads (default %u)\n"
          "  --head-dim N    head dimension (default %u)\n"
          "  --block-size N  tokens per block (default %u)\n"
          "  --visual N      visual tokens (default %u)\n"
          "  --text N        text tokens after the image (default %u)\n"
          "  --reps N        requests per policy; the median is reported "
          "(default %u)\n"
          "  --help          this text\n",
          k_defaults.layers, k_defaults.q_heads, k_defaults.kv_heads,
          k_defaults.head_dim, k_defaults.block_size, k_defaults.visual,
          k_defaults.text, k_defaults.reps);
}

int main(int argc, char **argv) {
  opts o = k_defaults;
  for (int i = 1; i < argc; i++) {
    uint32_t *dst = NULL;
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(argv[i], "--layers"))
      dst = &o.layers;
    else if (!strcmp(argv[i], "--q-heads"))
      dst = &o.q_heads;
    else if (!strcmp(argv[i], "--kv-heads"))
      dst = &o.kv_heads;
    else if (!strcmp(argv[i], "--head-dim"))
      dst = &o.head_dim;
    else if (!strcmp(argv[i], "--block-size"))
      dst = &o.block_size;
    else if (!strcmp(argv[i], "--visual"))
      dst = &o.visual;
    else if (!strcmp(argv[i], "--text"))
      dst = &o.text;
    else if (!strcmp(argv[i], "--reps"))
      dst = &o.reps;
    if (!dst) {
      fprintf(stderr, "bench_compress: unknown option '%s' (see --help)\n",
              argv[i]);
      return 2;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "bench_compress: %s needs a value (see --help)\n",
              argv[i]);
      return 2;
    }
    /* Whole numbers only: strtoul alone would read "-1" or "12x". */
    const char *val = argv[++i];
    char *end = NULL;
    errno = 0;
    unsigned long long x = strtoull(val, &end, 10);
    if (errno || end == val || *end || val[0] == '-' || x > UINT32_MAX ||
        (x == 0 && dst != &o.visual && dst != &o.text)) {
      fprintf(stderr, "bench_compress: %s expects a %s integer, got '%s'\n",
              argv[i - 1],
              dst == &o.visual || dst == &o.text ? "non-negative" : "positive",
              val);
      return 2;
    }
    *dst = (uint32_t)x;
  }
  const uint32_t m = 5 + o.visual + o.text;
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CPU;
  cfg.dtype = PVL_DTYPE_F32;
  cfg.num_layers = o.layers;
  cfg.num_q_heads = o.q_heads;
  cfg.num_kv_heads = o.kv_heads;
  cfg.head_dim = o.head_dim;
  cfg.block_size = o.block_size;
  cfg.num_blocks = 2 * o.layers * (m / o.block_size + 2);
  pvl_cache *c = NULL;
  CHECK(c, pvl_cache_create(&cfg, &c));

  const size_t kv = (size_t)m * o.kv_heads * o.head_dim;
  float *k = malloc(kv * sizeof(float)), *v = malloc(kv * sizeof(float));
  float *q = malloc((size_t)m * o.q_heads * o.head_dim * sizeof(float));
  for (size_t i = 0; i < kv; i++) {
    k[i] = frand();
    v[i] = frand();
  }
  for (size_t i = 0; i < (size_t)m * o.q_heads * o.head_dim; i++)
    q[i] = 2.0f * frand();
  const pvl_policy_kind kinds[] = {PVL_POLICY_VLCACHE, PVL_POLICY_SNAPKV,
                                   PVL_POLICY_PYRAMIDKV, PVL_POLICY_H2O};
  double *t_obs = malloc(o.reps * sizeof(double));
  double *t_cmp = malloc(o.reps * sizeof(double));
  printf("policy,layers,q_heads,kv_heads,head_dim,m,rows,observe_us_median,"
         "compress_us_median,total_us_median\n");
  double rows_tab[4][3];
  uint32_t rows_n[4];
  for (int ki = 0; ki < 4; ki++) {
    pvl_policy p;
    pvl_policy_init(&p, kinds[ki]);
    for (uint32_t r = 0; r < o.reps; r++) {
      pvl_span vis = {5, 5 + o.visual};
      pvl_seq_id s;
      CHECK(c, pvl_seq_add(c, m, &vis, 1, &s));
      for (uint32_t l = 0; l < o.layers; l++)
        CHECK(c, pvl_kv_write(c, s, l, 0, m, k, v, NULL));
      uint32_t first, n, fb;
      CHECK(c, pvl_policy_rows(&p, c, s, &first, &n, &fb));
      rows_n[ki] = n;
      const float *qw = q + (size_t)first * o.q_heads * o.head_dim;
      double t0 = now_us();
      for (uint32_t l = 0; l < o.layers; l++)
        CHECK(c, pvl_observe(c, s, l, qw, first, n, p.threshold, 0, NULL));
      double t1 = now_us();
      CHECK(c, pvl_compress(c, s, &p, NULL, NULL));
      double t2 = now_us();
      t_obs[r] = t1 - t0;
      t_cmp[r] = t2 - t1;
      CHECK(c, pvl_seq_free(c, s));
    }
    qsort(t_obs, o.reps, sizeof(double), cmp_d);
    qsort(t_cmp, o.reps, sizeof(double), cmp_d);
    rows_tab[ki][0] = t_obs[o.reps / 2];
    rows_tab[ki][1] = t_cmp[o.reps / 2];
    rows_tab[ki][2] = rows_tab[ki][0] + rows_tab[ki][1];
    printf("%s,%u,%u,%u,%u,%u,%u,%.1f,%.1f,%.1f\n", pvl_policy_name(kinds[ki]),
           o.layers, o.q_heads, o.kv_heads, o.head_dim, m, rows_n[ki],
           rows_tab[ki][0], rows_tab[ki][1], rows_tab[ki][2]);
  }
  printf("\n%-10s %6s %14s %14s %14s\n", "policy", "rows", "observe (ms)",
         "compress (ms)", "total (ms)");
  for (int ki = 0; ki < 4; ki++)
    printf("%-10s %6u %14.2f %14.2f %14.2f\n", pvl_policy_name(kinds[ki]),
           rows_n[ki], rows_tab[ki][0] / 1e3, rows_tab[ki][1] / 1e3,
           rows_tab[ki][2] / 1e3);
  free(t_obs);
  free(t_cmp);
  free(k);
  free(v);
  free(q);
  pvl_cache_destroy(c);
  return 0;
}
