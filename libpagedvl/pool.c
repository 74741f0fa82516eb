/* The block pool: O(1) allocation from a free stack, a refcount per block
 * (forks share blocks), and double-free detection. Owns only metadata; the
 * block storage belongs to the backend. */
#include "internal.h"

pvl_status pvl__pool_init(pvl_pool *p, const pvl_allocator *a,
                          uint32_t num_blocks) {
  p->num_blocks = num_blocks;
  p->free_stack = pvl__alloc(a, (size_t)num_blocks * sizeof(int32_t));
  p->refcount = pvl__alloc(a, (size_t)num_blocks * sizeof(uint32_t));
  if (!p->free_stack || !p->refcount) {
    pvl__pool_fini(p, a);
    return PVL_ERR_NO_MEMORY;
  }
  /* Lowest ids on top, so a fresh pool hands out 0, 1, 2, ... */
  for (uint32_t i = 0; i < num_blocks; i++) {
    p->free_stack[i] = (int32_t)(num_blocks - 1 - i);
    p->refcount[i] = 0;
  }
  p->num_free = num_blocks;
  p->num_shared = 0;
  return PVL_SUCCESS;
}

void pvl__pool_fini(pvl_pool *p, const pvl_allocator *a) {
  pvl__free(a, p->free_stack, (size_t)p->num_blocks * sizeof(int32_t));
  pvl__free(a, p->refcount, (size_t)p->num_blocks * sizeof(uint32_t));
  p->free_stack = NULL;
  p->refcount = NULL;
  p->num_free = 0;
}

int32_t pvl__pool_alloc(pvl_pool *p) {
  int32_t b = p->free_stack[--p->num_free];
  p->refcount[b] = 1;
  return b;
}

void pvl__pool_incref(pvl_pool *p, int32_t block) {
  if (++p->refcount[block] == 2) p->num_shared++;
}

bool pvl__pool_decref(pvl_pool *p, int32_t block) {
  if (block < 0 || (uint32_t)block >= p->num_blocks ||
      p->refcount[block] == 0)
    return false;
  const uint32_t r = --p->refcount[block];
  if (r == 1) p->num_shared--;
  if (r == 0) p->free_stack[p->num_free++] = block;
  return true;
}
