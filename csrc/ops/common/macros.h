#pragma once
// FASTSEG_HOST_DEVICE marks math that CPU and CUDA kernels share.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTSEG_HOST_DEVICE __host__ __device__
#else
#define FASTSEG_HOST_DEVICE
#endif
