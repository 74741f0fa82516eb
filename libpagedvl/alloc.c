/* The host allocator seam. Every host allocation of a cache goes through a
 * pvl_allocator; the default is one private jemalloc arena used only through
 * mallocx/sdallocx, or libc with PVL_USE_JEMALLOC=0.
 *
 * PVL_JEMALLOC_BUNDLED: jemalloc is compiled into this library with the
 * prefix pvl__je_ (cmake/BundledJemalloc.cmake), so it never replaces the
 * process's malloc and the library loads through dlopen. Otherwise (SYSTEM)
 * it is the distribution's unprefixed libjemalloc, whose malloc may or may
 * not be the process's: we never call that one either. */
#define _POSIX_C_SOURCE 200112L /* posix_memalign in the libc path */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if PVL_USE_JEMALLOC
#include <jemalloc/jemalloc.h>
#include <pthread.h>

/* Spelled out rather than through jemalloc's JEMALLOC_MANGLE: if the
 * unprefixed system header were found instead of the bundled one, pvl__je_*
 * would be undeclared and unresolved: the build fails instead of quietly
 * using the system library. */
#if PVL_JEMALLOC_BUNDLED
#define PVL_JE(fn) pvl__je_##fn
#else
#define PVL_JE(fn) fn
#endif

static unsigned g_arena;
static bool g_arena_ok;
static pthread_once_t g_arena_once = PTHREAD_ONCE_INIT;

static void arena_create(void) {
  unsigned idx = 0;
  size_t sz = sizeof(idx);
  if (PVL_JE(mallctl)("arenas.create", &idx, &sz, NULL, 0) == 0) {
    g_arena = idx;
    g_arena_ok = true;
  }
}

static int arena_flags(size_t align) {
  /* No thread cache: a cache is used by one thread at a time, but not
   * always the same one, and tcache entries would outlive the cache. */
  int flags = MALLOCX_TCACHE_NONE;
  if (g_arena_ok) flags |= MALLOCX_ARENA(g_arena);
  if (align > 16) flags |= MALLOCX_ALIGN(align);
  return flags;
}

static void *je_alloc(void *ctx, size_t size, size_t align) {
  (void)ctx;
  pthread_once(&g_arena_once, arena_create);
  return PVL_JE(mallocx)(size ? size : 1, arena_flags(align));
}

static void je_free(void *ctx, void *p, size_t size, size_t align) {
  (void)ctx;
  if (p) PVL_JE(sdallocx)(p, size ? size : 1, arena_flags(align));
}

static const pvl_allocator g_default = {je_alloc, je_free, NULL};
#else
static void *libc_alloc(void *ctx, size_t size, size_t align) {
  (void)ctx;
  if (align <= 16) return malloc(size ? size : 1);
  void *p = NULL;
  return posix_memalign(&p, align, size ? size : 1) == 0 ? p : NULL;
}

static void libc_free(void *ctx, void *p, size_t size, size_t align) {
  (void)ctx;
  (void)size;
  (void)align;
  free(p);
}

static const pvl_allocator g_default = {libc_alloc, libc_free, NULL};
#endif

const pvl_allocator *pvl__default_allocator(void) { return &g_default; }

void *pvl__alloc_aligned(const pvl_allocator *a, size_t size, size_t align) {
  return a->alloc(a->ctx, size, align);
}

void *pvl__alloc(const pvl_allocator *a, size_t size) {
  return a->alloc(a->ctx, size, 16);
}

void pvl__free(const pvl_allocator *a, void *p, size_t size) {
  if (p) a->free(a->ctx, p, size, 16);
}

void pvl__free_aligned(const pvl_allocator *a, void *p, size_t size,
                       size_t align) {
  if (p) a->free(a->ctx, p, size, align);
}

bool pvl__grow(const pvl_allocator *a, void **p, size_t elem, size_t old_n,
               size_t new_n) {
  size_t bytes;
  if (!pvl__mul_ok(elem, new_n, &bytes)) return false;
  void *q = pvl__alloc(a, bytes);
  if (!q) return false;
  if (*p && old_n) memcpy(q, *p, elem * old_n);
  pvl__free(a, *p, elem * old_n);
  *p = q;
  return true;
}
