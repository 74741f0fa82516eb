/* See emu_ref.h. */
#include "emu_ref.h"

#include "internal.h"

void *emu_ref_storage(pvl_cache *c, size_t *bytes) {
  *bytes = c->block_bytes * c->cfg.num_blocks;
  return c->storage;
}

pvl_kv_geom emu_ref_geom(const pvl_cache *c) { return c->geom; }

pvl_plan_view emu_ref_plan_view(const pvl_plan *p) { return p->view; }

void emu_ref_table(pvl_cache *c, pvl_seq_id seq, uint32_t layer,
                   const int32_t **blocks, const uint32_t **pos,
                   uint32_t *n_tokens) {
  const pvl_table *t = &pvl__seq_get(c, seq)->tables[layer];
  *blocks = t->blocks;
  *pos = t->pos;
  *n_tokens = t->n_tokens;
}

void emu_ref_obs(pvl_cache *c, pvl_seq_id seq, uint32_t layer,
                 const double **raw, const uint32_t **seen,
                 const uint64_t **below, const uint64_t **total) {
  const pvl_seq *s = pvl__seq_get(c, seq);
  const pvl_obs *o = s->obs ? s->obs[layer] : NULL;
  *raw = o ? o->raw : NULL;
  *seen = o ? o->seen : NULL;
  *below = o ? o->below : NULL;
  *total = o ? o->total : NULL;
}

pvl_status emu_ref_gather(pvl_cache *c, const int64_t *src_slots,
                          const int32_t *dst_blocks, uint32_t n) {
  return pvl__cpu_backend.gather(c, src_slots, dst_blocks, n, NULL);
}

pvl_status emu_ref_copy_blocks(pvl_cache *c, const int32_t *src,
                               const int32_t *dst, uint32_t n) {
  return pvl__cpu_backend.copy_blocks(c, src, dst, n, NULL);
}

uint16_t emu_ref_f32_to_f16(float f) { return pvl__f32_to_f16(f); }
uint16_t emu_ref_f32_to_bf16(float f) { return pvl__f32_to_bf16(f); }

float emu_ref_load(pvl_dtype dt, const void *p, size_t i) {
  float f;
  pvl__load_f32(dt, (const char *)p + i * pvl_dtype_size(dt), &f, 1);
  return f;
}
