/* kernels/kv_ops.cu, compiled as host C++ for the emulator (see cuda_emu.h). */
#include "emu_names.h"

#include "kv_ops.cu"
