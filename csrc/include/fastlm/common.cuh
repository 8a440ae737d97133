// Torch-free CUDA helpers: fp32 conversion of float / __half / __nv_bfloat16, 16-byte packs, reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fastlm/math.h"

namespace fastlm {
namespace cuda {

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Elements of T in one 16-byte load.
template <typename T>
constexpr int pack_size() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, int V>
struct alignas(V * sizeof(T) >= 16 ? 16 : alignof(T)) Pack {
  T v[V];
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Load / store V consecutive elements as fp32; one 16-byte transaction when V * sizeof(T) == 16 (the
// caller guarantees the alignment).
template <typename T, int V>
__device__ __forceinline__ void load_f32(const T* p, float (&o)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = Cvt<T>::to(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = Cvt<T>::to(p[k]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_f32(T* p, const float (&o)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    Pack<T, V> pk;
#pragma unroll
    for (int k = 0; k < V; ++k) pk.v[k] = Cvt<T>::from(o[k]);
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = Cvt<T>::from(o[k]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* smem /* >= 33 floats */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nwarps ? smem[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) smem[32] = t;
  }
  __syncthreads();
  return smem[32];
}

}  // namespace cuda
}  // namespace fastlm
