// Shared by the CPU (.cpp, host compiler) and CUDA (.cu, nvcc) sources.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define QF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QF_HOST_DEVICE inline
#endif
