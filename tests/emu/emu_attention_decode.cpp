/* kernels/attention_decode.cu, compiled as host C++ for the emulator (see cuda_emu.h). */
#include "emu_names.h"

#include "attention_decode.cu"
