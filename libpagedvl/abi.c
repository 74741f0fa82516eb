/* pvl_abi_layout: the size and the field offsets of every public struct, so
 * a binding that declares the structs itself (the Python package's ctypes)
 * can check its declarations against the library it loaded instead of
 * trusting that they still match the header. One table; a type or field
 * added to pagedvl.h must be added here too (tests/test_abi.c checks that
 * the listed fields cover each struct). */
#include <stdalign.h>
#include <string.h>

#include "internal.h"

typedef struct abi_field {
  const char *name;
  size_t offset;
  size_t size;
} abi_field;

typedef struct abi_type {
  const char *name;
  size_t size;
  size_t align;
  const abi_field *fields; /* declaration order; NULL for enums */
  size_t n_fields;
} abi_type;

#define F(T, f) {#f, offsetof(T, f), sizeof(((T *)0)->f)}
#define N(a) (sizeof(a) / sizeof((a)[0]))
#define STRUCT(T, a) {#T, sizeof(T), alignof(T), a, N(a)}
#define ENUM(T) {#T, sizeof(T), alignof(T), NULL, 0}

static const abi_field k_allocator[] = {
    F(pvl_allocator, alloc), F(pvl_allocator, free), F(pvl_allocator, ctx)};

static const abi_field k_config[] = {
    F(pvl_config, size),         F(pvl_config, backend),
    F(pvl_config, device),       F(pvl_config, dtype),
    F(pvl_config, num_layers),   F(pvl_config, num_q_heads),
    F(pvl_config, num_kv_heads), F(pvl_config, head_dim),
    F(pvl_config, block_size),   F(pvl_config, num_blocks),
    F(pvl_config, memory_fraction), F(pvl_config, max_seqs),
    F(pvl_config, allocator),    F(pvl_config, comm),
    F(pvl_config, split),        F(pvl_config, model_num_layers),
    F(pvl_config, layer_begin),  F(pvl_config, model_num_kv_heads),
    F(pvl_config, kv_head_begin)};

static const abi_field k_span[] = {F(pvl_span, begin), F(pvl_span, end)};

static const abi_field k_seq_info[] = {
    F(pvl_seq_info, n_prompt),       F(pvl_seq_info, n_decoded),
    F(pvl_seq_info, position),       F(pvl_seq_info, n_visual_spans),
    F(pvl_seq_info, min_tokens),     F(pvl_seq_info, max_tokens),
    F(pvl_seq_info, total_tokens),   F(pvl_seq_info, total_blocks)};

static const abi_field k_stats[] = {
    F(pvl_stats, num_blocks),    F(pvl_stats, free_blocks),
    F(pvl_stats, used_blocks),   F(pvl_stats, shared_blocks),
    F(pvl_stats, num_seqs),      F(pvl_stats, tokens),
    F(pvl_stats, block_bytes),   F(pvl_stats, pool_bytes)};

static const abi_field k_plan_info[] = {
    F(pvl_plan_info, n_seqs),            F(pvl_plan_info, max_seqs),
    F(pvl_plan_info, block_capacity),    F(pvl_plan_info, last_update_bytes),
    F(pvl_plan_info, last_update_entries), F(pvl_plan_info, full_rebuilds)};

static const abi_field k_policy[] = {
    F(pvl_policy, size),            F(pvl_policy, kind),
    F(pvl_policy, keep_ratio),      F(pvl_policy, threshold),
    F(pvl_policy, min_layer_ratio), F(pvl_policy, recent_ratio),
    F(pvl_policy, window_cap),      F(pvl_policy, fallback_window),
    F(pvl_policy, renormalize),     F(pvl_policy, sink_tokens),
    F(pvl_policy, snap_window),     F(pvl_policy, pool_kernel),
    F(pvl_policy, pyramid_beta),    F(pvl_policy, decode_cap),
    F(pvl_policy, decode_cap_slack)};

static const abi_field k_compress_report[] = {
    F(pvl_compress_report, budget),        F(pvl_compress_report, kept),
    F(pvl_compress_report, density),       F(pvl_compress_report, n_prompt),
    F(pvl_compress_report, window_first),  F(pvl_compress_report, window_rows),
    F(pvl_compress_report, window_fallback), F(pvl_compress_report, kept_total),
    F(pvl_compress_report, blocks_before), F(pvl_compress_report, blocks_after),
    F(pvl_compress_report, blocks_freed),  F(pvl_compress_report, keep_ratio),
    F(pvl_compress_report, blocks_taken)};

static const abi_type k_types[] = {
    ENUM(pvl_status),
    ENUM(pvl_backend),
    ENUM(pvl_dtype),
    ENUM(pvl_admit),
    ENUM(pvl_policy_kind),
    ENUM(pvl_split),
    {"pvl_seq_id", sizeof(pvl_seq_id), alignof(pvl_seq_id), NULL, 0},
    STRUCT(pvl_allocator, k_allocator),
    STRUCT(pvl_config, k_config),
    STRUCT(pvl_span, k_span),
    STRUCT(pvl_seq_info, k_seq_info),
    STRUCT(pvl_stats, k_stats),
    STRUCT(pvl_plan_info, k_plan_info),
    STRUCT(pvl_policy, k_policy),
    STRUCT(pvl_compress_report, k_compress_report),
};

pvl_status pvl_abi_layout(const char *type, const char *field, size_t *size,
                          size_t *offset) {
  if (!type || !size || !offset)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "type, size or offset is NULL");
  for (size_t i = 0; i < N(k_types); i++) {
    const abi_type *t = &k_types[i];
    if (strcmp(t->name, type) != 0) continue;
    if (!field) {
      *size = t->size;
      *offset = 0;
      return PVL_SUCCESS;
    }
    for (size_t j = 0; j < t->n_fields; j++) {
      if (strcmp(t->fields[j].name, field) == 0) {
        *size = t->fields[j].size;
        *offset = t->fields[j].offset;
        return PVL_SUCCESS;
      }
    }
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "%s has no field \"%s\"",
                    type, field);
  }
  return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                  "unknown type \"%s\" (public types of pagedvl.h only)", type);
}

size_t pvl__abi_num_types(void) { return N(k_types); }

pvl_status pvl__abi_type(size_t i, const char **name, size_t *size,
                         size_t *align, size_t *n_fields) {
  if (i >= N(k_types)) return PVL_ERR_INVALID_ARGUMENT;
  *name = k_types[i].name;
  *size = k_types[i].size;
  *align = k_types[i].align;
  *n_fields = k_types[i].n_fields;
  return PVL_SUCCESS;
}

pvl_status pvl__abi_field(size_t i, size_t j, const char **name,
                          size_t *offset, size_t *size) {
  if (i >= N(k_types) || j >= k_types[i].n_fields)
    return PVL_ERR_INVALID_ARGUMENT;
  *name = k_types[i].fields[j].name;
  *offset = k_types[i].fields[j].offset;
  *size = k_types[i].fields[j].size;
  return PVL_SUCCESS;
}
