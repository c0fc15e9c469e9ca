#pragma once
// FASTSEG_HOST_DEVICE marks math that CPU and CUDA kernels share.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTSEG_HOST_DEVICE __host__ __device__
#else
#define FASTSEG_HOST_DEVICE
#endif

// FASTSEG_CPU_CLONES compiles a hot CPU loop for AVX2 and AVX-512 too (x86-64-v3/v4, which also
// bring popcnt) and picks the version at load time: the extension itself targets baseline x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define FASTSEG_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FASTSEG_CPU_CLONES
#endif
