/* pvl_abi_layout: the layout table bindings check their struct declarations
 * against. It must report what the compiler laid out, list every member of
 * every public struct (a member added to pagedvl.h but not to abi.c would
 * let a binding's stale declaration pass), and fail cleanly on bad input. */
#include <stdalign.h>

#include "testutil.h"

static size_t layout_size(const char *type, const char *field) {
  size_t size = 0, off = 0;
  pvl_status st = pvl_abi_layout(type, field, &size, &off);
  cr_assert_eq(st, PVL_SUCCESS, "pvl_abi_layout(%s, %s): %s", type,
               field ? field : "NULL", pvl_create_last_error());
  return size;
}

static size_t layout_offset(const char *type, const char *field) {
  size_t size = 0, off = 0;
  pvl_status st = pvl_abi_layout(type, field, &size, &off);
  cr_assert_eq(st, PVL_SUCCESS, "pvl_abi_layout(%s, %s): %s", type, field,
               pvl_create_last_error());
  return off;
}

#define EXPECT_FIELD(T, f)                                                     \
  do {                                                                         \
    cr_assert_eq(layout_offset(#T, #f), offsetof(T, f), #T "." #f " offset"); \
    cr_assert_eq(layout_size(#T, #f), sizeof(((T *)0)->f), #T "." #f " size"); \
  } while (0)

/* The reported numbers are the compiler's (spot checks over each struct:
 * first, a middle and last member, and members after padding). */
Test(abi, reports_the_compilers_layout) {
  cr_assert_eq(layout_size("pvl_config", NULL), sizeof(pvl_config));
  cr_assert_eq(layout_offset("pvl_config", NULL), 0);
  EXPECT_FIELD(pvl_config, size);
  EXPECT_FIELD(pvl_config, num_layers);
  EXPECT_FIELD(pvl_config, memory_fraction);
  EXPECT_FIELD(pvl_config, allocator);
  cr_assert_eq(layout_size("pvl_policy", NULL), sizeof(pvl_policy));
  EXPECT_FIELD(pvl_policy, kind);
  EXPECT_FIELD(pvl_policy, pyramid_beta);
  EXPECT_FIELD(pvl_policy, decode_cap_slack);
  cr_assert_eq(layout_size("pvl_compress_report", NULL),
               sizeof(pvl_compress_report));
  EXPECT_FIELD(pvl_compress_report, density);
  EXPECT_FIELD(pvl_compress_report, kept_total);
  EXPECT_FIELD(pvl_compress_report, keep_ratio);
  cr_assert_eq(layout_size("pvl_seq_info", NULL), sizeof(pvl_seq_info));
  EXPECT_FIELD(pvl_seq_info, total_tokens);
  cr_assert_eq(layout_size("pvl_stats", NULL), sizeof(pvl_stats));
  EXPECT_FIELD(pvl_stats, tokens);
  EXPECT_FIELD(pvl_stats, pool_bytes);
  cr_assert_eq(layout_size("pvl_plan_info", NULL), sizeof(pvl_plan_info));
  EXPECT_FIELD(pvl_plan_info, block_capacity);
  cr_assert_eq(layout_size("pvl_span", NULL), sizeof(pvl_span));
  EXPECT_FIELD(pvl_span, end);
  cr_assert_eq(layout_size("pvl_allocator", NULL), sizeof(pvl_allocator));
  EXPECT_FIELD(pvl_allocator, ctx);
  cr_assert_eq(layout_size("pvl_status", NULL), sizeof(pvl_status));
  cr_assert_eq(layout_size("pvl_policy_kind", NULL), sizeof(pvl_policy_kind));
  cr_assert_eq(layout_size("pvl_seq_id", NULL), sizeof(pvl_seq_id));
}

/* Every type of the table: the public call agrees with the table, and the
 * listed members cover the struct: in declaration order, each starts at or
 * after the end of the previous one, the gaps are no larger than alignment
 * padding, and the bytes after the last member are only tail padding. A
 * member missing from the table leaves a hole larger than padding (or a
 * too-long tail) unless it fits in padding, which a member of a C struct
 * of these types cannot without being at least as aligned as the gap. */
Test(abi, table_covers_every_member) {
  size_t n_types = pvl__abi_num_types();
  cr_assert_geq(n_types, 14);
  for (size_t i = 0; i < n_types; i++) {
    const char *name;
    size_t size, align, n_fields;
    cr_assert_eq(pvl__abi_type(i, &name, &size, &align, &n_fields),
                 PVL_SUCCESS);
    cr_assert_eq(layout_size(name, NULL), size, "%s", name);
    cr_assert(align >= 1 && (align & (align - 1)) == 0, "%s align %zu", name,
              align);
    size_t end = 0;
    for (size_t j = 0; j < n_fields; j++) {
      const char *fname;
      size_t off, fsize;
      cr_assert_eq(pvl__abi_field(i, j, &fname, &off, &fsize), PVL_SUCCESS);
      cr_assert_eq(layout_offset(name, fname), off, "%s.%s", name, fname);
      cr_assert_eq(layout_size(name, fname), fsize, "%s.%s", name, fname);
      cr_assert_geq(off, end, "%s.%s overlaps the previous member", name,
                    fname);
      cr_assert_lt(off - end, align,
                   "%s: %zu bytes before .%s are more than padding: a member "
                   "is missing from libpagedvl/abi.c",
                   name, off - end, fname);
      end = off + fsize;
    }
    if (n_fields > 0)
      cr_assert_lt(size - end, align,
                   "%s: %zu bytes after the last listed member are more "
                   "than padding: a member is missing from libpagedvl/abi.c",
                   name, size - end);
  }
  const char *name;
  size_t a, b, c;
  cr_assert_eq(pvl__abi_type(n_types, &name, &a, &b, &c),
               PVL_ERR_INVALID_ARGUMENT);
}

Test(abi, bad_input_fails_and_writes_nothing) {
  size_t size = 77, off = 88;
  cr_assert_eq(pvl_abi_layout(NULL, NULL, &size, &off),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(pvl_create_last_error(), "pvl_abi_layout"));
  cr_assert_eq(pvl_abi_layout("pvl_config", NULL, NULL, &off),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_abi_layout("pvl_config", NULL, &size, NULL),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_abi_layout("pvl_cache", NULL, &size, &off),
               PVL_ERR_INVALID_ARGUMENT, "opaque types have no layout");
  cr_assert(strstr(pvl_create_last_error(), "\"pvl_cache\""), "%s",
            pvl_create_last_error());
  cr_assert_eq(pvl_abi_layout("pvl_config", "num_heads", &size, &off),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(pvl_create_last_error(), "\"num_heads\""), "%s",
            pvl_create_last_error());
  cr_assert_eq(pvl_abi_layout("pvl_status", "x", &size, &off),
               PVL_ERR_INVALID_ARGUMENT, "enums have no members");
  cr_assert_eq(size, 77);
  cr_assert_eq(off, 88);
}
