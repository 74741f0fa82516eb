/* kernels/observe.cu, compiled as host C++ for the emulator (see cuda_emu.h). */
#include "emu_names.h"

#include "observe.cu"
