/* bench_multi_gpu: decode throughput of one model's cache split over ranks,
 * by KV heads and by layers, with and without VL-Cache compression, and the
 * cost of the compress collective next to the prefill of the same prompt.
 * Each case runs the serving loop of examples/multi_rank.h (one thread per
 * rank) and prints one JSON line; a table follows.
 *
 * What is measured depends on the machine, and every line says which:
 * - "nccl": N GPUs and NCCL: N ranks, rank r on GPU r, measured.
 * - "cpu-inprocess": no GPU: N ranks on the CPU backend over the in-process
 *   communicator, measured (the ranks share this machine's cores, so the
 *   figures show the library's host work and agreement, not a GPU run).
 * - "projection": fewer GPUs than ranks: one rank's share of the model (its
 *   KV heads, or its layers) measured as a single cache on GPU 0, and the
 *   N-rank figures derived by the formula printed with them. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>

#include "../examples/multi_rank.h"

typedef struct bopts {
  uint32_t max_ranks, layers, q_heads, kv_heads, head_dim, steps;
  uint32_t batches[8], n_batches, contexts[8], n_contexts;
  double assume_collective_us;
  int json_only;
} bopts;

static int parse_list(const char *flag, const char *s, uint32_t *out,
                      uint32_t *n) {
  *n = 0;
  const char *p = s;
  while (*p && *n < 8) {
    char *end = NULL;
    errno = 0;
    unsigned long v = strtoul(p, &end, 10);
    if (errno || end == p || v == 0 || v > (1u << 24) ||
        (*end && *end != ',')) {
      fprintf(stderr,
              "bench_multi_gpu: %s expects a comma list of positive "
              "integers (at most 8), got '%s'\n",
              flag, s);
      return -1;
    }
    out[(*n)++] = (uint32_t)v;
    p = *end ? end + 1 : end;
  }
  if (*p) {
    fprintf(stderr, "bench_multi_gpu: %s takes at most 8 values\n", flag);
    return -1;
  }
  return 0;
}

static void usage(FILE *f, const bopts *d) {
  fprintf(
      f,
      "usage: bench_multi_gpu [options]\n"
      "  --ranks N          largest rank count; cases use 1, 2, 4, ... N "
      "(default %u)\n"
      "  --layers N         model layers (default %u: LLaVA-v1.6-Mistral-7B "
      "on a GPU;\n"
      "                     on the CPU the default is 4, a reduced model, "
      "labelled so)\n"
      "  --q-heads N        (default %u)\n"
      "  --kv-heads N       (default %u)\n"
      "  --head-dim N       (default %u)\n"
      "  --batch LIST       batch sizes (default GPU 1,8,64; CPU 1,4)\n"
      "  --context LIST     prompt tokens (default GPU 2048,8192,32768; "
      "CPU 1024)\n"
      "  --steps N          decode steps per case (default GPU 16, CPU 2)\n"
      "  --assume-collective-us X  projection only: the latency assumed "
      "for one\n"
      "                     agreement collective between GPUs (default "
      "%.0f)\n"
      "  --json             JSON lines only\n",
      d->max_ranks, d->layers, d->q_heads, d->kv_heads, d->head_dim,
      d->assume_collective_us);
}

typedef struct row {
  const char *mode, *split;
  uint32_t ranks, batch, context;
  double keep, tok_s, step_ms, attn_ms, kv_ms, plan_ms, append_ms, coll_ms;
  double prefill_ms, compress_ms;
  uint64_t compress_bytes;
} row;

static void print_json(const row *r, const bopts *o, const char *formula) {
  printf("{\"mode\":\"%s\",\"split\":\"%s\",\"ranks\":%u,\"keep\":%.2f,"
         "\"batch\":%u,\"context\":%u,\"layers\":%u,\"q_heads\":%u,"
         "\"kv_heads\":%u,\"head_dim\":%u,\"tokens_per_s\":%.1f,"
         "\"step_ms\":%.4f,\"attention_ms\":%.4f,\"kv_write_ms\":%.4f,"
         "\"plan_ms\":%.4f,\"append_ms\":%.4f,\"collective_ms\":%.4f,"
         "\"prefill_ms_per_request\":%.3f,\"compress_ms_per_request\":%.3f,"
         "\"compress_bytes_per_request\":%" PRIu64 "%s%s%s}\n",
         r->mode, r->split, r->ranks, r->keep, r->batch, r->context, o->layers,
         o->q_heads, o->kv_heads, o->head_dim, r->tok_s, r->step_ms, r->attn_ms,
         r->kv_ms, r->plan_ms, r->append_ms, r->coll_ms, r->prefill_ms,
         r->compress_ms, r->compress_bytes, formula ? ",\"formula\":\"" : "",
         formula ? formula : "", formula ? "\"" : "");
}

/* Runs one job; fills per-step figures from the slowest rank. */
static int run_case(mr_job *job, row *r) {
  mr_result *res = calloc(job->nranks, sizeof(*res));
  if (!res) return -1;
  int rc = mr_run(job, res);
  if (rc == 0) {
    const mr_result *w = &res[0];
    for (uint32_t k = 1; k < job->nranks; k++)
      if (res[k].t_decode > w->t_decode) w = &res[k];
    const double steps = job->steps;
    r->step_ms = 1e3 * w->t_decode / steps;
    r->attn_ms = 1e3 * w->t_attention / steps;
    r->kv_ms = 1e3 * w->t_kv_write / steps;
    r->plan_ms = 1e3 * w->t_plan / steps;
    r->append_ms = 1e3 * w->t_append / steps;
    r->tok_s = w->t_decode > 0 ? (double)w->decode_tokens / w->t_decode : 0;
    const double reqs = w->admitted ? w->admitted : 1;
    r->prefill_ms = 1e3 * (w->t_prefill + w->t_observe) / reqs;
    r->compress_ms = 1e3 * w->t_compress / reqs;
    r->compress_bytes = (uint64_t)((double)w->compress_bytes / reqs);
    if (w->admitted < r->batch) {
      fprintf(stderr, "bench_multi_gpu: only %u of %u requests fit\n",
              w->admitted, r->batch);
      rc = 1;
    }
  } else {
    for (uint32_t k = 0; k < job->nranks; k++)
      if (res[k].st != PVL_SUCCESS) fprintf(stderr, "%s\n", res[k].err);
  }
  for (uint32_t k = 0; k < job->nranks; k++) mr_result_free(&res[k]);
  free(res);
  return rc;
}

int main(int argc, char **argv) {
  bopts o = {4, 32,   32, 8, 128, 16, {1, 8, 64}, 3, {2048, 8192, 32768},
             3, 30.0, 0};
  int yes = 0, gpus = 0;
  for (int32_t dev = 0; dev < 64; dev++) {
    if (pvl_backend_available(PVL_BACKEND_CUDA, dev, &yes) != PVL_SUCCESS ||
        !yes)
      break;
    gpus++;
  }
  if (!PVL_EXAMPLE_CUDA) gpus = 0;
  int batch_given = 0, ctx_given = 0, steps_given = 0, layers_given = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help")) {
      usage(stdout, &o);
      return 0;
    }
    if (!strcmp(a, "--json")) {
      o.json_only = 1;
      continue;
    }
    if (i + 1 >= argc) {
      fprintf(stderr,
              "bench_multi_gpu: unknown option or missing value '%s' "
              "(see --help)\n",
              a);
      return 2;
    }
    const char *v = argv[++i];
    uint32_t one[8], n = 0;
    if (!strcmp(a, "--batch")) {
      if (parse_list(a, v, o.batches, &o.n_batches)) return 2;
      batch_given = 1;
    } else if (!strcmp(a, "--context")) {
      if (parse_list(a, v, o.contexts, &o.n_contexts)) return 2;
      ctx_given = 1;
    } else if (!strcmp(a, "--assume-collective-us")) {
      char *end = NULL;
      o.assume_collective_us = strtod(v, &end);
      if (end == v || *end || !(o.assume_collective_us >= 0)) {
        fprintf(stderr, "bench_multi_gpu: %s expects a number >= 0\n", a);
        return 2;
      }
    } else {
      uint32_t *f = !strcmp(a, "--ranks")      ? &o.max_ranks
                    : !strcmp(a, "--layers")   ? &o.layers
                    : !strcmp(a, "--q-heads")  ? &o.q_heads
                    : !strcmp(a, "--kv-heads") ? &o.kv_heads
                    : !strcmp(a, "--head-dim") ? &o.head_dim
                    : !strcmp(a, "--steps")    ? &o.steps
                                               : NULL;
      if (!f) {
        fprintf(stderr, "bench_multi_gpu: unknown option '%s' (see --help)\n",
                a);
        return 2;
      }
      if (parse_list(a, v, one, &n) || n != 1) return 2;
      *f = one[0];
      if (f == &o.steps) steps_given = 1;
      if (f == &o.layers) layers_given = 1;
    }
  }
  if (gpus == 0) {
    /* The CPU computes attention in double precision: a reduced model. */
    if (!layers_given) o.layers = 4;
    if (!batch_given) {
      o.batches[0] = 1;
      o.batches[1] = 4;
      o.n_batches = 2;
    }
    if (!ctx_given) {
      o.contexts[0] = 1024;
      o.n_contexts = 1;
    }
    if (!steps_given) o.steps = 2;
  }
  if (o.q_heads % o.kv_heads) {
    fprintf(stderr, "bench_multi_gpu: --q-heads must be a multiple of "
                    "--kv-heads\n");
    return 2;
  }
  const pvl_backend be = gpus > 0 ? PVL_BACKEND_CUDA : PVL_BACKEND_CPU;
  unsigned char id[PVL_COMM_ID_BYTES];
  const int have_nccl = gpus > 1 && pvl_comm_unique_id(id) == PVL_SUCCESS;
  if (!o.json_only)
    printf(
        "# bench_multi_gpu: %d usable GPU%s, NCCL %s; model %u layers, %u/%u "
        "q/kv heads, head_dim %u, f16, block 16; %u decode steps per case\n",
        gpus, gpus == 1 ? "" : "s", have_nccl ? "yes" : "no", o.layers,
        o.q_heads, o.kv_heads, o.head_dim, o.steps);

  row rows[512];
  size_t n_rows = 0;
  const char *splits[] = {"heads", "layers"};
  const double keeps[] = {1.0, 0.1};
  int failed = 0;
  for (uint32_t ranks = 1; ranks <= o.max_ranks; ranks *= 2)
    for (int sp = 0; sp < 2; sp++) {
      if (ranks == 1 && sp == 1) continue; /* one rank: no split */
      const pvl_split split = ranks == 1 ? PVL_SPLIT_NONE
                              : sp == 0  ? PVL_SPLIT_HEADS
                                         : PVL_SPLIT_LAYERS;
      if (split == PVL_SPLIT_HEADS && o.kv_heads < ranks) continue;
      if (split == PVL_SPLIT_LAYERS && o.layers < ranks) continue;
      for (int kp = 0; kp < 2; kp++)
        for (uint32_t bi = 0; bi < o.n_batches; bi++)
          for (uint32_t ci = 0; ci < o.n_contexts; ci++) {
            if (n_rows == sizeof(rows) / sizeof(rows[0])) break;
            const uint32_t ctx = o.contexts[ci] < 128 ? 128 : o.contexts[ci];
            mr_job job;
            memset(&job, 0, sizeof(job));
            job.shape =
                (mr_shape){o.layers,      o.q_heads, o.kv_heads, o.head_dim, 16,
                           PVL_DTYPE_F16, ctx - 64,  60,         1};
            job.steps = o.steps;
            job.requests = o.batches[bi];
            job.compress = keeps[kp] < 1.0;
            pvl_policy_init(&job.policy, PVL_POLICY_VLCACHE);
            job.policy.keep_ratio = (float)keeps[kp];
            job.backend = be;
            /* Pool: room for the batch at full length in every layer. */
            const uint64_t blocks = (uint64_t)o.batches[bi] * o.layers *
                                        ((ctx + o.steps + 15) / 16 + 1) +
                                    64;
            job.num_blocks =
                blocks > INT32_MAX / 16 ? INT32_MAX / 16 : (uint32_t)blocks;
            row r;
            memset(&r, 0, sizeof(r));
            r.split = ranks == 1 ? "none" : splits[sp];
            r.ranks = ranks;
            r.batch = o.batches[bi];
            r.context = ctx;
            r.keep = keeps[kp];
            char formula[256] = "";
            if (be == PVL_BACKEND_CPU || (have_nccl && (int)ranks <= gpus) ||
                ranks == 1) {
              /* Measured as it is. */
              job.nranks = ranks;
              job.split = split;
              job.use_nccl = be == PVL_BACKEND_CUDA && ranks > 1;
              if (job.use_nccl) memcpy(job.nccl_id, id, sizeof(id));
              r.mode = be == PVL_BACKEND_CPU ? "cpu-inprocess" : "nccl";
              if (run_case(&job, &r)) {
                failed = 1;
                continue;
              }
            } else {
              /* One rank's share as a single cache on GPU 0, then derive. */
              job.nranks = 1;
              job.split = PVL_SPLIT_NONE;
              if (split == PVL_SPLIT_HEADS) {
                job.shape.kv_heads = o.kv_heads / ranks;
                job.shape.q_heads =
                    job.shape.kv_heads * (o.q_heads / o.kv_heads);
              } else {
                job.shape.layers = (o.layers + ranks - 1) / ranks;
              }
              r.mode = "projection";
              if (run_case(&job, &r)) {
                failed = 1;
                continue;
              }
              const double c_ms = o.assume_collective_us * 1e-3;
              const double share = r.step_ms;
              if (split == PVL_SPLIT_HEADS) {
                r.step_ms = share + c_ms;
                snprintf(formula, sizeof(formula),
                         "step = t(one rank's %u KV heads on 1 GPU) + %.0f us "
                         "assumed append collective",
                         job.shape.kv_heads, o.assume_collective_us);
              } else {
                /* No micro-batch overlap: the stages run one after another
                 * for one batch. */
                r.step_ms = ranks * share + c_ms;
                snprintf(formula, sizeof(formula),
                         "step = %u x t(one rank's %u layers on 1 GPU) + %.0f "
                         "us assumed append collective (no micro-batch "
                         "overlap)",
                         ranks, job.shape.layers, o.assume_collective_us);
              }
              r.coll_ms = c_ms;
              r.tok_s = (double)r.batch / (r.step_ms * 1e-3);
            }
            rows[n_rows] = r;
            /* Agreement cost: this case's append against the one-rank
             * append of the same case (measured modes only). */
            if (r.mode[0] != 'p' && ranks > 1)
              for (size_t k = 0; k < n_rows; k++)
                if (rows[k].ranks == 1 && rows[k].batch == r.batch &&
                    rows[k].context == r.context && rows[k].keep == r.keep) {
                  double c = r.append_ms - rows[k].append_ms;
                  rows[n_rows].coll_ms = c > 0 ? c : 0;
                }
            print_json(&rows[n_rows], &o, formula[0] ? formula : NULL);
            fflush(stdout);
            n_rows++;
          }
    }
  if (!o.json_only) {
    printf("\n%-13s %-6s %5s %5s %5s %6s %10s %9s %9s %8s %8s %8s %8s "
           "%10s %10s %10s\n",
           "mode", "split", "ranks", "keep", "batch", "ctx", "tok/s", "step ms",
           "attn ms", "kv ms", "plan ms", "app ms", "coll ms", "prefill ms",
           "compr ms", "compr B");
    for (size_t k = 0; k < n_rows; k++) {
      const row *r = &rows[k];
      printf("%-13s %-6s %5u %5.2f %5u %6u %10.1f %9.3f %9.3f %8.3f %8.3f "
             "%8.3f %8.3f %10.2f %10.2f %10" PRIu64 "\n",
             r->mode, r->split, r->ranks, r->keep, r->batch, r->context,
             r->tok_s, r->step_ms, r->attn_ms, r->kv_ms, r->plan_ms,
             r->append_ms, r->coll_ms, r->prefill_ms, r->compress_ms,
             r->compress_bytes);
    }
    printf("\nstep = append (with the agreement collective when split) + plan "
           "+ kv_write + attention over every layer the rank holds; coll ms = "
           "append time minus the one-rank append of the same case (measured: "
           "the agreement exchange plus the wait for the slowest rank, which "
           "absorbs any imbalance between ranks) or the assumed latency "
           "(projection); prefill = kv_write + observe "
           "of one request; compr = pvl_compress of one request, with its "
           "collective, and the bytes it exchanged per rank\n");
  }
  return failed;
}
