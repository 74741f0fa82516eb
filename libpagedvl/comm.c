/* Communicators: the public pvl_comm functions, and the in-process
 * communicator of N ranks over threads (a test double for the CPU backend;
 * real runs across GPUs use comm_nccl.c). The NCCL entry points answer
 * UNSUPPORTED in a build without NCCL. */
#define _POSIX_C_SOURCE 200809L /* pthread barriers */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

/* Comm handles are not cache metadata: they use the default allocator. */
static const pvl_allocator *comm_alloc(void) {
  return pvl__default_allocator();
}

/* ---- in-process communicator ---- */

/* What one rank posted for the exchange in progress. */
typedef struct local_slot {
  const void *in;
  size_t bytes;
  uint32_t tag;
  uint64_t seq;
} local_slot;

typedef struct local_shared {
  uint32_t nranks;
  uint32_t live; /* handles not yet destroyed; the last frees this */
  pthread_mutex_t mu;
  pthread_barrier_t bar;
  local_slot *slots; /* [nranks] */
} local_shared;

typedef struct local_rank {
  local_shared *sh;
  uint64_t seq; /* exchanges this rank has made */
} local_rank;

/* Every rank posts its slot, waits for all, checks that all posted the same
 * exchange (same tag, size and sequence number: the same collective in the
 * same order), copies every rank's input, and waits again so no input is
 * freed or reused while another rank still reads it. Every rank reads the
 * same slots, so a mismatch is reported on every rank alike. */
static pvl_status local_allgather(pvl_comm *m, const void *in, void *out,
                                  size_t bytes, uint32_t tag, char *msg,
                                  size_t msg_len) {
  local_rank *lr = m->impl;
  local_shared *sh = lr->sh;
  local_slot *mine = &sh->slots[m->rank];
  mine->in = in;
  mine->bytes = bytes;
  mine->tag = tag;
  mine->seq = lr->seq++;
  pthread_barrier_wait(&sh->bar);
  pvl_status st = PVL_SUCCESS;
  for (uint32_t r = 1; r < sh->nranks; r++) {
    const local_slot *a = &sh->slots[0], *b = &sh->slots[r];
    if (a->tag != b->tag || a->bytes != b->bytes || a->seq != b->seq) {
      snprintf(msg, msg_len,
               "collective order mismatch: rank 0 called %s (step %u, "
               "exchange #%llu, %zu bytes) while rank %u called %s (step "
               "%u, exchange #%llu, %zu bytes)",
               pvl__dist_tag_name(a->tag), a->tag & 0xffu,
               (unsigned long long)a->seq, a->bytes, r,
               pvl__dist_tag_name(b->tag), b->tag & 0xffu,
               (unsigned long long)b->seq, b->bytes);
      st = PVL_ERR_BAD_STATE;
      break;
    }
  }
  if (st == PVL_SUCCESS && bytes > 0)
    for (uint32_t r = 0; r < sh->nranks; r++)
      memcpy((char *)out + (size_t)r * bytes, sh->slots[r].in, bytes);
  pthread_barrier_wait(&sh->bar);
  /* After a mismatch the ranks' counters disagree for good; realign them
   * on the largest so that a caller who recovers its order can go on. */
  if (st != PVL_SUCCESS) {
    uint64_t mx = 0;
    for (uint32_t r = 0; r < sh->nranks; r++)
      if (sh->slots[r].seq > mx) mx = sh->slots[r].seq;
    pthread_barrier_wait(&sh->bar);
    lr->seq = mx + 1;
  }
  return st;
}

static void local_destroy(pvl_comm *m) {
  local_rank *lr = m->impl;
  local_shared *sh = lr->sh;
  pthread_mutex_lock(&sh->mu);
  const uint32_t left = --sh->live;
  pthread_mutex_unlock(&sh->mu);
  if (left == 0) {
    pthread_barrier_destroy(&sh->bar);
    pthread_mutex_destroy(&sh->mu);
    pvl__free(comm_alloc(), sh->slots, sh->nranks * sizeof(local_slot));
    pvl__free(comm_alloc(), sh, sizeof(*sh));
  }
  pvl__free(comm_alloc(), lr, sizeof(*lr));
}

static const pvl_comm_ops g_local_ops = {
    .name = "in-process",
    .allgather = local_allgather,
    .destroy = local_destroy,
};

pvl_status pvl_comm_create_local(uint32_t nranks, pvl_comm **out) {
  if (!out) return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "out is NULL");
  if (nranks == 0 || nranks > 1024)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "nranks = %u, must be in [1, 1024]", nranks);
  const pvl_allocator *a = comm_alloc();
  local_shared *sh = pvl__alloc(a, sizeof(*sh));
  pvl_comm **made = pvl__alloc(a, nranks * sizeof(pvl_comm *));
  local_slot *slots = pvl__alloc(a, nranks * sizeof(local_slot));
  bool ok = sh && made && slots;
  uint32_t n_made = 0;
  for (; ok && n_made < nranks; n_made++) {
    pvl_comm *m = pvl__alloc(a, sizeof(*m));
    local_rank *lr = m ? pvl__alloc(a, sizeof(*lr)) : NULL;
    if (!lr) {
      pvl__free(a, m, sizeof(*m));
      ok = false;
      break;
    }
    lr->sh = sh;
    lr->seq = 0;
    m->ops = &g_local_ops;
    m->rank = (int32_t)n_made;
    m->size = (int32_t)nranks;
    m->device = -1;
    m->impl = lr;
    made[n_made] = m;
  }
  bool mu_ok = false;
  if (ok) {
    mu_ok = pthread_mutex_init(&sh->mu, NULL) == 0;
    ok = mu_ok && pthread_barrier_init(&sh->bar, NULL, nranks) == 0;
  }
  if (!ok) {
    if (mu_ok) pthread_mutex_destroy(&sh->mu);
    for (uint32_t i = 0; i < n_made; i++) {
      pvl__free(a, made[i]->impl, sizeof(local_rank));
      pvl__free(a, made[i], sizeof(pvl_comm));
    }
    pvl__free(a, slots, nranks * sizeof(local_slot));
    pvl__free(a, made, nranks * sizeof(pvl_comm *));
    pvl__free(a, sh, sizeof(*sh));
    return PVL_FAIL(NULL, PVL_ERR_NO_MEMORY,
                    "in-process communicator of %u ranks", nranks);
  }
  memset(slots, 0, nranks * sizeof(local_slot));
  sh->nranks = nranks;
  sh->live = nranks;
  sh->slots = slots;
  memcpy(out, made, nranks * sizeof(pvl_comm *));
  pvl__free(a, made, nranks * sizeof(pvl_comm *));
  return PVL_SUCCESS;
}

/* ---- every communicator ---- */

pvl_status pvl_comm_rank(const pvl_comm *comm, int32_t *rank) {
  if (!comm || !rank)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "comm or rank is NULL");
  *rank = comm->rank;
  return PVL_SUCCESS;
}

pvl_status pvl_comm_size(const pvl_comm *comm, int32_t *size) {
  if (!comm || !size)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "comm or size is NULL");
  *size = comm->size;
  return PVL_SUCCESS;
}

pvl_status pvl_comm_destroy(pvl_comm *comm) {
  if (!comm) return PVL_SUCCESS;
  comm->ops->destroy(comm);
  pvl__free(comm_alloc(), comm, sizeof(*comm));
  return PVL_SUCCESS;
}

/* ---- one thread driving several ranks ---- */

typedef struct run_shared {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int go; /* 0: wait; 1: run; -1: a thread failed to start, run nothing */
  pvl_status (*fn)(void *arg, uint32_t rank);
  void *arg;
} run_shared;

typedef struct run_slot {
  run_shared *sh;
  uint32_t rank;
  pvl_status st;
  bool ran;
} run_slot;

static void *run_main(void *p) {
  run_slot *rs = p;
  run_shared *sh = rs->sh;
  pthread_mutex_lock(&sh->mu);
  while (sh->go == 0) pthread_cond_wait(&sh->cv, &sh->mu);
  const int go = sh->go;
  pthread_mutex_unlock(&sh->mu);
  if (go == 1) {
    rs->st = sh->fn(sh->arg, rs->rank);
    rs->ran = true;
  }
  return NULL;
}

static void run_release(run_shared *sh, int go) {
  pthread_mutex_lock(&sh->mu);
  sh->go = go;
  pthread_cond_broadcast(&sh->cv);
  pthread_mutex_unlock(&sh->mu);
}

pvl_status pvl_run_ranks(uint32_t n, pvl_status (*fn)(void *arg, uint32_t rank),
                         void *arg, pvl_status *statuses) {
  if (n == 0 || n > 1024 || !fn)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "n = %u (must be in [1, 1024]) or fn is NULL", n);
  const pvl_allocator *a = comm_alloc();
  run_slot *slots = pvl__alloc(a, n * sizeof(run_slot));
  pthread_t *th = pvl__alloc(a, n * sizeof(pthread_t));
  if (!slots || !th) {
    pvl__free(a, slots, n * sizeof(run_slot));
    pvl__free(a, th, n * sizeof(pthread_t));
    return PVL_FAIL(NULL, PVL_ERR_NO_MEMORY, "%u rank slots", n);
  }
  run_shared sh = {.go = 0, .fn = fn, .arg = arg};
  pthread_mutex_init(&sh.mu, NULL);
  pthread_cond_init(&sh.cv, NULL);
  /* Every thread waits at the gate until all exist: a collective started
   * by some ranks while another rank's thread cannot start would wait
   * forever. */
  uint32_t started = 0;
  for (uint32_t r = 1; r < n; r++, started++) {
    slots[r] = (run_slot){&sh, r, PVL_SUCCESS, false};
    if (pthread_create(&th[r], NULL, run_main, &slots[r]) != 0) break;
  }
  const bool all = started == n - 1;
  run_release(&sh, all ? 1 : -1);
  pvl_status st0 = PVL_SUCCESS;
  if (all) st0 = fn(arg, 0);
  for (uint32_t r = 1; r <= started; r++) pthread_join(th[r], NULL);
  pthread_cond_destroy(&sh.cv);
  pthread_mutex_destroy(&sh.mu);
  pvl_status st = PVL_SUCCESS;
  if (!all) {
    st = PVL_FAIL(NULL, PVL_ERR_NO_MEMORY,
                  "could not start the thread of rank %u; no rank ran",
                  started + 1);
  } else {
    slots[0].st = st0;
    for (uint32_t r = 0; r < n; r++) {
      if (statuses) statuses[r] = slots[r].st;
      if (st == PVL_SUCCESS) st = slots[r].st;
    }
  }
  pvl__free(a, slots, n * sizeof(run_slot));
  pvl__free(a, th, n * sizeof(pthread_t));
  return st;
}

pvl_status pvl_split_range(uint32_t total, uint32_t nranks, uint32_t rank,
                           uint32_t *begin, uint32_t *count) {
  if (!begin || !count)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "begin or count is NULL");
  if (nranks == 0 || rank >= nranks)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "rank %u of %u ranks is out of range", rank, nranks);
  const uint64_t b = (uint64_t)total * rank / nranks;
  const uint64_t e = (uint64_t)total * (rank + 1) / nranks;
  *begin = (uint32_t)b;
  *count = (uint32_t)(e - b);
  return PVL_SUCCESS;
}

#if !PVL_WITH_NCCL
/* Built without NCCL: the NCCL communicators do not exist here. */
pvl_status pvl_comm_unique_id(void *id) {
  (void)id;
  return PVL_FAIL(NULL, PVL_ERR_UNSUPPORTED,
                  "this libpagedvl was built without NCCL");
}

pvl_status pvl_comm_create_nccl(const void *unique_id, int32_t rank,
                                int32_t nranks, int32_t device,
                                pvl_comm **out) {
  (void)unique_id, (void)rank, (void)nranks, (void)device, (void)out;
  return PVL_FAIL(NULL, PVL_ERR_UNSUPPORTED,
                  "this libpagedvl was built without NCCL");
}

pvl_status pvl_comm_adopt_nccl(void *nccl_comm, int32_t device,
                               pvl_comm **out) {
  (void)nccl_comm, (void)device, (void)out;
  return PVL_FAIL(NULL, PVL_ERR_UNSUPPORTED,
                  "this libpagedvl was built without NCCL");
}
#endif
