/* Loads libpagedvl.so the way Python's ctypes or a plugin host does: with
 * dlopen(RTLD_NOW | RTLD_LOCAL) from a process that links neither the library
 * nor jemalloc (this program is built without either; pagedvl.h gives only
 * the types). A library that needs static TLS (the distribution's jemalloc
 * uses initial-exec TLS) fails here with "cannot allocate memory in static
 * TLS block".
 *
 *   dlopen_check path/to/libpagedvl.so
 *
 * Also checks that the library brings no malloc of its own into its symbol
 * scope, that a cache works on the main thread and on a second one, and that
 * a thread which used the library may outlive dlclose(). */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "pagedvl.h"

typedef uint32_t (*version_fn)(void);
typedef pvl_status (*config_init_fn)(pvl_config *);
typedef pvl_status (*cache_create_fn)(const pvl_config *, pvl_cache **);
typedef pvl_status (*cache_destroy_fn)(pvl_cache *);
typedef pvl_status (*seq_add_fn)(pvl_cache *, uint32_t, const pvl_span *,
                                 uint32_t, pvl_seq_id *);
typedef pvl_status (*get_stats_fn)(const pvl_cache *, pvl_stats *);
typedef const char *(*last_error_fn)(void);

static struct {
  version_fn version;
  config_init_fn config_init;
  cache_create_fn cache_create;
  cache_destroy_fn cache_destroy;
  seq_add_fn seq_add;
  get_stats_fn get_stats;
  last_error_fn create_last_error;
} api;

/* dlsym returns an object pointer; ISO C has no conversion to a function
 * pointer, POSIX guarantees the representation is the same. */
static int sym(void *lib, const char *name, void *fn, size_t fn_size) {
  void *p = dlsym(lib, name);
  if (!p) {
    fprintf(stderr, "dlsym(%s): %s\n", name, dlerror());
    return 1;
  }
  memcpy(fn, &p, fn_size);
  return 0;
}
#define SYM(lib, name, field) sym(lib, #name, &api.field, sizeof api.field)

/* One small CPU cache, one sequence (its blocks and page tables come from
 * the library's host allocator), then destroyed. */
static int use_cache(void) {
  pvl_config cfg;
  if (api.config_init(&cfg) != PVL_SUCCESS) return 1;
  cfg.backend = PVL_BACKEND_CPU;
  cfg.dtype = PVL_DTYPE_F32;
  cfg.num_layers = 2;
  cfg.num_q_heads = 2;
  cfg.num_kv_heads = 1;
  cfg.head_dim = 4;
  cfg.block_size = 4;
  cfg.num_blocks = 8;
  pvl_cache *cache = NULL;
  if (api.cache_create(&cfg, &cache) != PVL_SUCCESS) {
    fprintf(stderr, "pvl_cache_create: %s\n", api.create_last_error());
    return 1;
  }
  pvl_seq_id seq;
  pvl_stats stats;
  int rc = 0;
  if (api.seq_add(cache, 5, NULL, 0, &seq) != PVL_SUCCESS ||
      api.get_stats(cache, &stats) != PVL_SUCCESS || stats.used_blocks != 4) {
    fprintf(stderr, "pvl_seq_add or pvl_cache_get_stats failed\n");
    rc = 1;
  }
  if (api.cache_destroy(cache) != PVL_SUCCESS) rc = 1;
  return rc;
}

static void *thread_use(void *arg) {
  (void)arg;
  return (void *)(size_t)use_cache();
}

/* Uses the library, then waits until the main thread has dlclose()d it, and
 * only then exits: thread-exit hooks the library left (TLS destructors of an
 * allocator) must not point into unmapped code. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_used, g_closed;

static void *thread_outlive(void *arg) {
  (void)arg;
  size_t rc = (size_t)use_cache();
  pthread_mutex_lock(&g_mu);
  g_used = 1;
  pthread_cond_broadcast(&g_cv);
  while (!g_closed) pthread_cond_wait(&g_cv, &g_mu);
  pthread_mutex_unlock(&g_mu);
  return (void *)rc;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s path/to/libpagedvl.so\n", argv[0]);
    return 2;
  }
  void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "dlopen(%s): %s\n", argv[1], dlerror());
    return 1;
  }
  if (SYM(lib, pvl_version, version) ||
      SYM(lib, pvl_config_init, config_init) ||
      SYM(lib, pvl_cache_create, cache_create) ||
      SYM(lib, pvl_cache_destroy, cache_destroy) ||
      SYM(lib, pvl_seq_add, seq_add) ||
      SYM(lib, pvl_cache_get_stats, get_stats) ||
      SYM(lib, pvl_create_last_error, create_last_error))
    return 1;
  if (api.version() != PVL_VERSION) {
    fprintf(stderr, "pvl_version() = %u, header says %u\n", api.version(),
            (unsigned)PVL_VERSION);
    return 1;
  }
  /* In the library's own scope (itself, then its dependencies), malloc must
   * still be the process's: an unprefixed allocator that came with the
   * library would be found first. */
  void *lib_malloc = dlsym(lib, "malloc");
  void *process_malloc = dlsym(RTLD_DEFAULT, "malloc");
  if (lib_malloc != process_malloc) {
    Dl_info info;
    fprintf(stderr, "malloc in the library's scope comes from %s\n",
            dladdr(lib_malloc, &info) && info.dli_fname ? info.dli_fname : "?");
    return 1;
  }
  if (use_cache()) return 1;

  pthread_t t;
  void *res = NULL;
  if (pthread_create(&t, NULL, thread_use, NULL) || pthread_join(t, &res) ||
      res) {
    fprintf(stderr, "a cache on a second thread failed\n");
    return 1;
  }

  if (pthread_create(&t, NULL, thread_outlive, NULL)) return 1;
  pthread_mutex_lock(&g_mu);
  while (!g_used) pthread_cond_wait(&g_cv, &g_mu);
  pthread_mutex_unlock(&g_mu);
  if (dlclose(lib)) {
    fprintf(stderr, "dlclose: %s\n", dlerror());
    return 1;
  }
  pthread_mutex_lock(&g_mu);
  g_closed = 1;
  pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
  if (pthread_join(t, &res) || res) {
    fprintf(stderr, "the thread that outlived dlclose failed\n");
    return 1;
  }
  printf("dlopen OK: %s (libpagedvl %u)\n", argv[1], (unsigned)PVL_VERSION);
  return 0;
}
