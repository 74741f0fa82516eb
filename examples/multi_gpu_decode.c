/* multi_gpu_decode: one model's KV cache spread over several ranks, split by
 * KV heads (tensor parallel, the default) or by layers (pipeline), with
 * VL-Cache compression after each prefill and batched decoding. One thread
 * per rank (examples/multi_rank.h has the loop every rank runs). On a
 * machine with at least --ranks GPUs and a build with NCCL, rank r runs on
 * GPU r over NCCL; otherwise the program says why and runs the same job on
 * the CPU backend with the in-process communicator (a test double for real
 * NCCL runs). It prints each rank's share (layers or heads, blocks, tokens),
 * the budgets every rank agreed on, decode tokens per second, and checks
 * the budgets, kept tokens and attention outputs against one cache that
 * holds the whole model (--no-verify skips that). */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, in multi_rank.h */

#include <errno.h>
#include <inttypes.h>

#include "multi_rank.h"

typedef struct options {
  long long ranks, layers, q_heads, kv_heads, head_dim, block_size, blocks;
  long long visual, text, steps, requests, seed;
  int dtype, backend, verify;
  pvl_split split;
  double keep;
} options;

static void usage(FILE *f, const char *argv0) {
  fprintf(f,
          "usage: %s [options]\n"
          "\n"
          "Spreads one model's KV cache over --ranks ranks and decodes a "
          "batch of\nsynthetic vision-language requests, compressed with "
          "VL-Cache.\n"
          "\n"
          "  --ranks N           ranks (default 2)\n"
          "  --split heads|layers  how to split the model (default heads)\n"
          "  --backend auto|cpu|cuda  auto: CUDA + NCCL when the build has "
          "them and\n"
          "                      N GPUs are usable, else the CPU with the "
          "in-process\n"
          "                      communicator (default auto)\n"
          "  --dtype f16|bf16|f32  (default f16; f32 is CPU only)\n"
          "  --layers N          model layers (default 8; GPU 32)\n"
          "  --q-heads N         model query heads (default 16; GPU 32)\n"
          "  --kv-heads N        model KV heads (default 8; GPU 8)\n"
          "  --head-dim N        (default 64; GPU 128)\n"
          "  --block-size N      (default 16)\n"
          "  --blocks N          blocks per rank (default 1024; GPU 0 = from "
          "free memory)\n"
          "  --visual N          visual tokens per request (default 576; GPU "
          "2880)\n"
          "  --text N            text tokens per request (default 32; GPU "
          "60)\n"
          "  --steps N           decode steps (default 16; GPU 64)\n"
          "  --requests N        requests at most (default 8; 0 = as many as "
          "fit)\n"
          "  --keep R            VL-Cache keep ratio (default 0.1)\n"
          "  --seed N            (default 1)\n"
          "  --no-verify         skip the comparison with one cache over the "
          "whole model\n",
          argv0);
}

static int parse_ll(const char *flag, const char *s, long long lo, long long hi,
                    long long *out) {
  char *end = NULL;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi) {
    fprintf(stderr,
            "multi_gpu_decode: %s expects an integer in [%lld, %lld], got "
            "'%s'\n",
            flag, lo, hi, s);
    return -1;
  }
  *out = v;
  return 0;
}

static int parse(int argc, char **argv, options *o) {
  struct {
    const char *name;
    long long *field, lo, hi;
  } ints[] = {{"--ranks", &o->ranks, 1, 64},
              {"--layers", &o->layers, 1, 4096},
              {"--q-heads", &o->q_heads, 1, 16384},
              {"--kv-heads", &o->kv_heads, 1, 1024},
              {"--head-dim", &o->head_dim, 1, 1024},
              {"--block-size", &o->block_size, 1, 1024},
              {"--blocks", &o->blocks, 0, INT32_MAX},
              {"--visual", &o->visual, 0, 1 << 24},
              {"--text", &o->text, 1, 1 << 24},
              {"--steps", &o->steps, 1, 1 << 20},
              {"--requests", &o->requests, 0, 1 << 20},
              {"--seed", &o->seed, 0, INT64_MAX}};
  const size_t n_ints = sizeof(ints) / sizeof(ints[0]);
  for (size_t k = 0; k < n_ints; k++) *ints[k].field = -1;
  o->ranks = 2;
  o->dtype = PVL_DTYPE_F16;
  o->backend = PVL_BACKEND_AUTO;
  o->split = PVL_SPLIT_HEADS;
  o->keep = 0.1;
  o->verify = 1;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout, argv[0]);
      return 1;
    }
    if (!strcmp(a, "--no-verify")) {
      o->verify = 0;
      continue;
    }
    if (i + 1 >= argc) {
      fprintf(stderr,
              "multi_gpu_decode: unknown option or missing value: "
              "'%s' (see --help)\n",
              a);
      return -1;
    }
    const char *v = argv[++i];
    size_t k = 0;
    while (k < n_ints && strcmp(a, ints[k].name)) k++;
    if (k < n_ints) {
      if (parse_ll(a, v, ints[k].lo, ints[k].hi, ints[k].field)) return -1;
    } else if (!strcmp(a, "--split")) {
      if (!strcmp(v, "heads"))
        o->split = PVL_SPLIT_HEADS;
      else if (!strcmp(v, "layers"))
        o->split = PVL_SPLIT_LAYERS;
      else {
        fprintf(stderr, "multi_gpu_decode: --split heads|layers, got '%s'\n",
                v);
        return -1;
      }
    } else if (!strcmp(a, "--backend")) {
      if (!strcmp(v, "auto"))
        o->backend = PVL_BACKEND_AUTO;
      else if (!strcmp(v, "cpu"))
        o->backend = PVL_BACKEND_CPU;
      else if (!strcmp(v, "cuda"))
        o->backend = PVL_BACKEND_CUDA;
      else {
        fprintf(stderr, "multi_gpu_decode: --backend auto|cpu|cuda, got '%s'\n",
                v);
        return -1;
      }
    } else if (!strcmp(a, "--dtype")) {
      if (!strcmp(v, "f16"))
        o->dtype = PVL_DTYPE_F16;
      else if (!strcmp(v, "bf16"))
        o->dtype = PVL_DTYPE_BF16;
      else if (!strcmp(v, "f32"))
        o->dtype = PVL_DTYPE_F32;
      else {
        fprintf(stderr, "multi_gpu_decode: --dtype f16|bf16|f32, got '%s'\n",
                v);
        return -1;
      }
    } else if (!strcmp(a, "--keep")) {
      char *end = NULL;
      o->keep = strtod(v, &end);
      if (end == v || *end || !(o->keep > 0.0 && o->keep <= 1.0)) {
        fprintf(stderr, "multi_gpu_decode: --keep expects (0, 1], got '%s'\n",
                v);
        return -1;
      }
    } else {
      fprintf(stderr, "multi_gpu_decode: unknown option '%s' (see --help)\n",
              a);
      return -1;
    }
  }
  return 0;
}

/* Picks CUDA + NCCL when every rank has a GPU, else the CPU; says why. */
static int choose_backend(options *o, mr_job *job) {
  int gpus = 0;
  for (int32_t dev = 0; dev < (int32_t)o->ranks; dev++) {
    int yes = 0;
    if (pvl_backend_available(PVL_BACKEND_CUDA, dev, &yes) == PVL_SUCCESS &&
        yes)
      gpus++;
    else
      break;
  }
  unsigned char id[PVL_COMM_ID_BYTES];
  const int have_nccl =
      gpus > 0 && o->ranks > 1 ? pvl_comm_unique_id(id) == PVL_SUCCESS : 0;
  const int gpu_ok =
      PVL_EXAMPLE_CUDA && gpus >= o->ranks && (o->ranks == 1 || have_nccl);
  if (o->backend == PVL_BACKEND_CUDA && !gpu_ok) {
    fprintf(stderr,
            "multi_gpu_decode: --backend cuda needs %lld usable GPUs%s; this "
            "machine has %d%s\n",
            o->ranks, o->ranks > 1 ? " and NCCL" : "", gpus,
            o->ranks > 1 && !have_nccl ? " and no NCCL in this build" : "");
    return -1;
  }
  if (o->backend != PVL_BACKEND_CPU && gpu_ok) {
    job->backend = PVL_BACKEND_CUDA;
    job->use_nccl = o->ranks > 1;
    if (job->use_nccl) memcpy(job->nccl_id, id, sizeof(id));
    return 0;
  }
  if (o->backend == PVL_BACKEND_AUTO)
    printf("note: %lld rank%s asked for, %d usable GPU%s%s: running the same "
           "job on the CPU backend with the in-process communicator (a test "
           "double; real runs use NCCL)\n",
           o->ranks, o->ranks == 1 ? "" : "s", gpus, gpus == 1 ? "" : "s",
           gpus >= o->ranks && !have_nccl ? " but no NCCL in this build" : "");
  job->backend = PVL_BACKEND_CPU;
  job->use_nccl = 0;
  return 0;
}

static void defaults(options *o, int gpu) {
  const long long cpu_d[] = {8, 16, 8, 64, 16, 1024, 576, 32, 16, 8, 1};
  const long long gpu_d[] = {32, 32, 8, 128, 16, 0, 2880, 60, 64, 0, 1};
  const long long *dv = gpu ? gpu_d : cpu_d;
  long long *f[] = {&o->layers,     &o->q_heads,  &o->kv_heads, &o->head_dim,
                    &o->block_size, &o->blocks,   &o->visual,   &o->text,
                    &o->steps,      &o->requests, &o->seed};
  for (size_t k = 0; k < sizeof(f) / sizeof(f[0]); k++)
    if (*f[k] < 0) *f[k] = dv[k];
}

/* Compares the ranks with the single-cache reference: budgets and kept
 * positions exactly (the head split sums attention in another order, so an
 * exact score tie could break differently: reported, not hidden), outputs
 * within the dtype's tolerance. Returns the number of mismatches. */
static int verify(const mr_job *job, const mr_result *res,
                  const mr_result *ref) {
  const mr_shape *S = &job->shape;
  int bad = 0;
  if (ref->admitted != res[0].admitted) {
    printf("verify: the reference admitted %u requests, the ranks %u\n",
           ref->admitted, res[0].admitted);
    return 1;
  }
  const uint32_t B = ref->admitted, d = S->head_dim;
  const float eps = S->dtype == PVL_DTYPE_BF16  ? 1e-2f
                    : S->dtype == PVL_DTYPE_F16 ? 1e-3f
                                                : 1e-5f;
  double worst = 0.0;
  for (uint32_t r = 0; r < job->nranks; r++) {
    const mr_result *x = &res[r];
    /* Request 0's kept positions are stored layer after layer, kept_n[l]
     * of them per layer: skip the reference's layers before this rank's. */
    uint64_t ref_off = 0, off = 0;
    for (uint32_t l = 0; l < x->layer_begin; l++) ref_off += ref->kept_n[l];
    for (uint32_t l = 0; l < x->layers; l++) {
      const uint32_t gl = x->layer_begin + l;
      if (x->budget0[l] != ref->budget0[gl]) {
        printf("verify: rank %u layer %u: budget %u, reference %u\n", r, gl,
               x->budget0[l], ref->budget0[gl]);
        bad++;
      }
      for (uint32_t i = 0; i < B; i++)
        if (x->kept_n[(size_t)i * x->layers + l] !=
            ref->kept_n[(size_t)i * ref->layers + gl]) {
          printf("verify: rank %u request %u layer %u: %u kept, reference "
                 "%u\n",
                 r, i, gl, x->kept_n[(size_t)i * x->layers + l],
                 ref->kept_n[(size_t)i * ref->layers + gl]);
          bad++;
        }
      const uint32_t n = x->kept_n[l];
      if (memcmp(x->kept_pos0 + off, ref->kept_pos0 + ref_off,
                 (size_t)n * sizeof(uint32_t)) != 0) {
        printf("verify: rank %u layer %u: request 0 kept other positions "
               "than the reference (an exact score tie?)\n",
               r, gl);
        bad++;
      }
      off += n;
      ref_off += n;
      /* Outputs of the last step: this rank's query heads of layer gl. */
      const uint32_t hq = x->q_heads,
                     hq0 = x->kv_head_begin * (S->q_heads / S->kv_heads);
      for (uint32_t b = 0; b < B; b++)
        for (uint32_t h = 0; h < hq; h++)
          for (uint32_t e = 0; e < d; e++) {
            const float got = x->out[(((size_t)l * B + b) * hq + h) * d + e];
            const float want =
                ref->out[(((size_t)gl * B + b) * S->q_heads + hq0 + h) * d + e];
            const double err = fabs((double)got - want);
            const double tol = 1e-3 + eps * fabs(want);
            if (err / tol > worst) worst = err / tol;
            if (!(err <= tol)) {
              if (bad < 20)
                printf("verify: rank %u layer %u row %u head %u dim %u: %g, "
                       "reference %g\n",
                       r, gl, b, hq0 + h, e, (double)got, (double)want);
              bad++;
            }
          }
    }
  }
  printf("verify: budgets, kept tokens and outputs %s one cache over the whole "
         "model (worst output error %.2f of the tolerance)\n",
         bad ? "DIFFER from" : "equal", worst);
  return bad;
}

int main(int argc, char **argv) {
  options o;
  int pr = parse(argc, argv, &o);
  if (pr) return pr > 0 ? 0 : 2;
  mr_job job;
  memset(&job, 0, sizeof(job));
  if (choose_backend(&o, &job)) return 1;
  defaults(&o, job.backend == PVL_BACKEND_CUDA);
  if (o.split == PVL_SPLIT_HEADS && o.kv_heads < o.ranks) {
    fprintf(stderr,
            "multi_gpu_decode: split by heads needs at least one KV head per "
            "rank: %lld KV heads, %lld ranks\n",
            o.kv_heads, o.ranks);
    return 2;
  }
  if (o.split == PVL_SPLIT_LAYERS && o.layers < o.ranks) {
    fprintf(stderr,
            "multi_gpu_decode: split by layers needs at least one layer per "
            "rank: %lld layers, %lld ranks\n",
            o.layers, o.ranks);
    return 2;
  }
  job.shape = (mr_shape){
      (uint32_t)o.layers,   (uint32_t)o.q_heads,    (uint32_t)o.kv_heads,
      (uint32_t)o.head_dim, (uint32_t)o.block_size, (pvl_dtype)o.dtype,
      (uint32_t)o.visual,   (uint32_t)o.text,       (uint64_t)o.seed};
  job.split = o.ranks > 1 ? o.split : PVL_SPLIT_NONE;
  job.nranks = (uint32_t)o.ranks;
  job.num_blocks = (uint32_t)o.blocks;
  job.requests = (uint32_t)o.requests;
  job.steps = (uint32_t)o.steps;
  job.compress = 1;
  pvl_policy_init(&job.policy, PVL_POLICY_VLCACHE);
  job.policy.keep_ratio = (float)o.keep;
  job.keep_outputs = o.verify;

  const char *split_name = job.split == PVL_SPLIT_LAYERS  ? "split by layers"
                           : job.split == PVL_SPLIT_HEADS ? "split by heads"
                                                          : "not split";
  printf("multi_gpu_decode: %u rank%s on %s (%s), %s; model %u "
         "layers, %u/%u q/kv heads, head_dim %u, %s; requests of 4 text + %u "
         "visual + %u text tokens, VL-Cache keep %.2f\n",
         job.nranks, job.nranks == 1 ? "" : "s",
         job.backend == PVL_BACKEND_CUDA ? "CUDA" : "the CPU",
         job.use_nccl     ? "NCCL"
         : job.nranks > 1 ? "in-process communicator"
                          : "no communicator",
         split_name, job.shape.layers, job.shape.q_heads, job.shape.kv_heads,
         job.shape.head_dim,
         o.dtype == PVL_DTYPE_F16    ? "f16"
         : o.dtype == PVL_DTYPE_BF16 ? "bf16"
                                     : "f32",
         job.shape.visual, job.shape.text, o.keep);

  mr_result *res = calloc(job.nranks, sizeof(*res));
  if (!res) return 1;
  int rc = mr_run(&job, res);
  for (uint32_t r = 0; r < job.nranks; r++)
    if (res[r].st != PVL_SUCCESS) fprintf(stderr, "%s\n", res[r].err);
  if (rc) {
    for (uint32_t r = 0; r < job.nranks; r++) mr_result_free(&res[r]);
    free(res);
    return 1;
  }

  /* Per rank. */
  printf("\n%-5s %-14s %-12s %8s %8s %8s %10s %10s\n", "rank", "layers",
         "kv heads", "requests", "peak", "final", "tokens", "tok/s");
  double slowest = 0.0;
  for (uint32_t r = 0; r < job.nranks; r++) {
    const mr_result *x = &res[r];
    char lr[32], hr[32];
    snprintf(lr, sizeof(lr), "[%u, %u)", x->layer_begin,
             x->layer_begin + x->layers);
    snprintf(hr, sizeof(hr), "[%u, %u)", x->kv_head_begin,
             x->kv_head_begin + x->kv_heads);
    printf("%-5u %-14s %-12s %8u %8u %8u %10" PRIu64 " %10.0f\n", r, lr, hr,
           x->admitted, x->peak_used, x->final_used, x->tokens_held,
           x->t_decode > 0 ? (double)x->decode_tokens / x->t_decode : 0.0);
    if (x->t_decode > slowest) slowest = x->t_decode;
  }
  printf("(peak and final: blocks in use of %u per rank; tokens: slots held "
         "over the rank's layers)\n",
         res[0].num_blocks);

  /* Budgets of request 0, model-wide, and whether every rank agreed. */
  uint32_t *budgets = calloc(job.shape.layers, sizeof(uint32_t));
  int agree = budgets != NULL;
  for (uint32_t r = 0; budgets && r < job.nranks; r++)
    for (uint32_t l = 0; l < res[r].layers; l++) {
      const uint32_t gl = res[r].layer_begin + l;
      if (job.split == PVL_SPLIT_HEADS && r > 0 &&
          budgets[gl] != res[r].budget0[l])
        agree = 0;
      budgets[gl] = res[r].budget0[l];
    }
  if (budgets) {
    printf("\nbudgets of request 0 (prompt tokens kept per layer, of %u):",
           job.shape.visual + 4 + job.shape.text);
    for (uint32_t l = 0; l < job.shape.layers; l++) printf(" %u", budgets[l]);
    printf("\n");
    if (job.split == PVL_SPLIT_HEADS)
      printf("every rank computed these budgets: %s\n",
             agree ? "identical on all ranks" : "RANKS DISAGREE");
    else if (job.split == PVL_SPLIT_LAYERS)
      printf("each rank holds its layers' share of these budgets, computed "
             "from every layer's density\n");
  }
  const uint64_t tokens = res[0].decode_tokens;
  printf("\ndecode: %" PRIu64 " tokens (%u request%s x %u steps) in %.3f s: "
         "%.0f tokens/s (the slowest rank's time)\n",
         tokens, res[0].admitted, res[0].admitted == 1 ? "" : "s", job.steps,
         slowest, slowest > 0 ? (double)tokens / slowest : 0.0);

  int bad = !agree;
  if (o.verify) {
    mr_job ref = job;
    ref.nranks = 1;
    ref.split = PVL_SPLIT_NONE;
    ref.use_nccl = 0;
    ref.requests = res[0].admitted;
    /* Room for the whole model in one pool: every rank's blocks (layers)
     * or the same count (heads: a block then holds every head). */
    if (job.split == PVL_SPLIT_LAYERS && job.num_blocks)
      ref.num_blocks = job.num_blocks * job.nranks;
    mr_result one;
    if (mr_run(&ref, &one) != 0) {
      fprintf(stderr, "reference: %s\n", one.err);
      bad = 1;
    } else {
      bad += verify(&job, res, &one);
    }
    mr_result_free(&one);
  }
  free(budgets);
  for (uint32_t r = 0; r < job.nranks; r++) mr_result_free(&res[r]);
  free(res);
  return bad ? 1 : 0;
}
