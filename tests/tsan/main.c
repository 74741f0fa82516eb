/* Runner of the Criterion stand-in (tests/tsan/criterion/criterion.h):
 * every registered test, in source order; exit 0 when all returned. */
#include <criterion/criterion.h>

pvl_shim_test *pvl_shim_tests;

int main(void) {
  /* Constructors pushed the tests in reverse: restore source order. */
  pvl_shim_test *rev = NULL;
  while (pvl_shim_tests) {
    pvl_shim_test *t = pvl_shim_tests;
    pvl_shim_tests = t->next;
    t->next = rev;
    rev = t;
  }
  int n = 0;
  for (pvl_shim_test *t = rev; t; t = t->next, n++) {
    fprintf(stderr, "[RUN ] %s\n", t->name);
    t->fn();
    fprintf(stderr, "[PASS] %s\n", t->name);
  }
  fprintf(stderr, "%d tests passed\n", n);
  return n > 0 ? 0 : 1;
}
