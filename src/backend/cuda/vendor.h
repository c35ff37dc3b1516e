#pragma once
// The CUDA runtime, included in one place: a chip with a CUDA dialect (HIP for AMD, the
// CUDA-compatible toolchains of Iluvatar CoreX, MetaX, Moore Threads) compiles the same kernels by
// mapping the runtime names the backend uses here, when a build target for it is added (none is
// yet, so none is kept: an unbuilt mapping only drifts).
#include <cuda_runtime.h>
