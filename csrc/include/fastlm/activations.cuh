// MLP epilogues: swiglu ([rows, 2I] row-strided -> [rows, I]) and relu2 ([rows, N] -> [rows, N]),
// fp32 math from fastlm/math.h, 16-byte packs when aligned, grid-stride over packs.
#pragma once

#include "fastlm/common.cuh"

namespace fastlm {
namespace cuda {

template <typename T, int V>
__global__ void swiglu_kernel(const T* __restrict__ in, int64_t in_stride, T* __restrict__ out, int64_t rows,
                              int64_t inter) {
  const int64_t packs_per_row = inter / V, total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs_per_row, j = (i % packs_per_row) * V;
    float g[V], u[V], o[V];
    load_f32<T, V>(in + r * in_stride + j, g);
    load_f32<T, V>(in + r * in_stride + inter + j, u);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = silu_mul(g[k], u[k]);
    store_f32<T, V>(out + r * inter + j, o);
  }
}

template <typename T, int V>
__global__ void relu2_kernel(const T* __restrict__ in, int64_t in_stride, T* __restrict__ out, int64_t rows,
                             int64_t n) {
  const int64_t packs_per_row = n / V, total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs_per_row, j = (i % packs_per_row) * V;
    float x[V];
    load_f32<T, V>(in + r * in_stride + j, x);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = relu2(x[k]);
    store_f32<T, V>(out + r * n + j, x);
  }
}

inline unsigned elementwise_blocks(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = 65535LL * 8;  // grid-stride beyond this
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// out [rows, inter] contiguous; in [rows, 2 * inter] with row stride in_stride (elements).
template <typename T>
cudaError_t swiglu(const T* in, int64_t in_stride, T* out, int64_t rows, int64_t inter, cudaStream_t stream) {
  if (rows == 0 || inter == 0) return cudaSuccess;
  constexpr int V = pack_size<T>();
  constexpr int kThreads = 256;
  if (inter % V == 0 && in_stride % V == 0 && aligned16(in) && aligned16(out)) {
    swiglu_kernel<T, V><<<elementwise_blocks(rows * inter / V, kThreads), kThreads, 0, stream>>>(in, in_stride, out,
                                                                                                rows, inter);
  } else {
    swiglu_kernel<T, 1><<<elementwise_blocks(rows * inter, kThreads), kThreads, 0, stream>>>(in, in_stride, out,
                                                                                            rows, inter);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t relu2(const T* in, int64_t in_stride, T* out, int64_t rows, int64_t n, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  constexpr int V = pack_size<T>();
  constexpr int kThreads = 256;
  if (n % V == 0 && in_stride % V == 0 && aligned16(in) && aligned16(out)) {
    relu2_kernel<T, V><<<elementwise_blocks(rows * n / V, kThreads), kThreads, 0, stream>>>(in, in_stride, out, rows,
                                                                                           n);
  } else {
    relu2_kernel<T, 1><<<elementwise_blocks(rows * n, kThreads), kThreads, 0, stream>>>(in, in_stride, out, rows, n);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastlm
