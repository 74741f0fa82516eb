/* Built instead of backend_cuda.c when libpagedvl is configured without
 * CUDA: the CUDA backend is then absent, and asking for it is UNSUPPORTED. */
#include "internal.h"

const pvl_backend_ops *pvl__cuda_backend(void) { return NULL; }
