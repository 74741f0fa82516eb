/* The CUDA backend's device check, which runs at pvl_cache_create and in
 * pvl_backend_available: a pure function of the compute capability, so it
 * is tested here without a GPU. The kernels use cp.async and bf16
 * conversions, sm_80 and newer. */
#include "testutil.h"

Test(cuda_arch, sm80_and_newer_are_supported) {
  const int ok[][2] = {{8, 0}, {8, 6}, {8, 9}, {9, 0}, {10, 0}, {12, 0}};
  for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
    char why[160] = "untouched";
    cr_assert(pvl__cuda_arch_supported(ok[i][0], ok[i][1], why, sizeof(why)),
              "%d.%d refused", ok[i][0], ok[i][1]);
    cr_assert_str_eq(why, "untouched",
                     "a reason written for a supported "
                     "device");
  }
}

Test(cuda_arch, older_devices_are_refused_with_the_reason) {
  const int old[][2] = {{7, 5}, {7, 0}, {6, 1}, {5, 2}, {3, 5}};
  for (size_t i = 0; i < sizeof(old) / sizeof(old[0]); i++) {
    char why[160] = "";
    cr_assert_not(
        pvl__cuda_arch_supported(old[i][0], old[i][1], why, sizeof(why)),
        "%d.%d accepted", old[i][0], old[i][1]);
    char found[32];
    snprintf(found, sizeof(found), "%d.%d", old[i][0], old[i][1]);
    cr_assert_not_null(strstr(why, found), "no capability found in: %s", why);
    cr_assert_not_null(strstr(why, "8.0"), "no capability needed in: %s", why);
  }
  /* No buffer: just the answer. A short one: truncated, terminated. */
  cr_assert_not(pvl__cuda_arch_supported(7, 5, NULL, 0));
  char tiny[8];
  memset(tiny, 'x', sizeof(tiny));
  cr_assert_not(pvl__cuda_arch_supported(7, 5, tiny, sizeof(tiny)));
  cr_assert_eq(tiny[sizeof(tiny) - 1], '\0');
}
