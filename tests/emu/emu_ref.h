/* What the emulator tests need from the library's internals (the CPU
 * cache's pool bytes and plan buffer, a table's block ids and positions, an
 * observation, the CPU twins of the copy kernels), behind a plain C
 * interface so the C++ test does not include internal.h. */
#ifndef PVL_EMU_REF_H
#define PVL_EMU_REF_H

#include <stddef.h>
#include <stdint.h>

#include "pagedvl.h"
#include "pvl_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

void *emu_ref_storage(pvl_cache *c, size_t *bytes);
pvl_kv_geom emu_ref_geom(const pvl_cache *c);
pvl_plan_view emu_ref_plan_view(const pvl_plan *p);
/* Block ids, positions (NULL: identity) and token count of a layer. */
void emu_ref_table(pvl_cache *c, pvl_seq_id seq, uint32_t layer,
                   const int32_t **blocks, const uint32_t **pos,
                   uint32_t *n_tokens);
/* The layer's observation (NULL pointers if there is none). */
void emu_ref_obs(pvl_cache *c, pvl_seq_id seq, uint32_t layer,
                 const double **raw, const uint32_t **seen,
                 const uint64_t **below, const uint64_t **total);
/* The CPU backend's copy kernels, on the cache's own pool. */
pvl_status emu_ref_gather(pvl_cache *c, const int64_t *src_slots,
                          const int32_t *dst_blocks, uint32_t n);
pvl_status emu_ref_copy_blocks(pvl_cache *c, const int32_t *src,
                               const int32_t *dst, uint32_t n);
uint16_t emu_ref_f32_to_f16(float f);
uint16_t emu_ref_f32_to_bf16(float f);
float emu_ref_load(pvl_dtype dt, const void *p, size_t i);

#ifdef __cplusplus
}
#endif

#endif
