/* Kernels with known defects (emu_selftest.cpp): each returns the number
 * of errors the emulator reported for its launch. */
#ifndef PVL_EMU_SELFTEST_H
#define PVL_EMU_SELFTEST_H

struct alignas(16) int4_like {
  int v[4];
};

namespace pvl_emu_selftest {
long waw(bool barrier);
long warp_sync(bool syncwarp);
long uninit();
long exited_lane();
long divergent();
long cp_async(bool wait, bool *values_ok);
bool values();
} // namespace pvl_emu_selftest

#endif
