/* A stand-in for the part of Criterion's API that tests/test_dist.c and
 * tests/support/testutil.c use, for the ThreadSanitizer build only:
 * Criterion 2.4 itself crashes under TSan while starting its runner (its
 * process and coroutine machinery is not TSan-clean), before any test
 * runs. Every Test() runs in order, in one process, from tests/tsan/main.c;
 * the first failing assertion prints where and why, and exits 1. */
#ifndef PVL_TSAN_CRITERION_H
#define PVL_TSAN_CRITERION_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct pvl_shim_test {
  const char *name;
  void (*fn)(void);
  struct pvl_shim_test *next;
} pvl_shim_test;

/* Registered tests, most recent first (main.c runs them in source order). */
extern pvl_shim_test *pvl_shim_tests;

#define Test(suite, name, ...)                                              \
  static void suite##_##name(void);                                         \
  static pvl_shim_test suite##_##name##_entry = {#suite "::" #name,         \
                                                 suite##_##name, NULL};     \
  __attribute__((constructor)) static void suite##_##name##_register(void) { \
    suite##_##name##_entry.next = pvl_shim_tests;                           \
    pvl_shim_tests = &suite##_##name##_entry;                               \
  }                                                                         \
  static void suite##_##name(void)

/* The message arguments are optional, as in Criterion; the format, when
 * given, is a string literal. */
#define PVL_SHIM_FAIL(...)                                                  \
  do {                                                                      \
    fprintf(stderr, "%s:%d: assertion failed: ", __FILE__, __LINE__);       \
    fprintf(stderr, "" __VA_ARGS__);                                        \
    fputc('\n', stderr);                                                    \
    exit(1);                                                                \
  } while (0)

#define cr_assert(cond, ...)                                                \
  do {                                                                      \
    if (!(cond)) PVL_SHIM_FAIL(__VA_ARGS__);                                \
  } while (0)
#define cr_assert_eq(a, b, ...) cr_assert((a) == (b), __VA_ARGS__)
#define cr_assert_not_null(p, ...) cr_assert((p) != NULL, __VA_ARGS__)
#define cr_assert_arr_eq(a, b, n, ...) \
  cr_assert(memcmp((a), (b), (n)) == 0, __VA_ARGS__)

#endif /* PVL_TSAN_CRITERION_H */
