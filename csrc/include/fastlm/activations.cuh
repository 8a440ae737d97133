// MLP epilogues: swiglu ([rows, 2I] -> [rows, I]) and relu2 ([rows, N] -> [rows, N]), row-strided in
// and out, fp32 math from fastlm/math.h, 16-byte packs when aligned, grid-stride over packs.
// out may be in itself (relu2) or in's gate half (swiglu): the in-place forms the fused MLP calls.
// Each thread reads its pack before writing the same addresses, so the pointers are not __restrict__.
#pragma once

#include "fastlm/common.cuh"

namespace fastlm {
namespace cuda {

template <typename T, int V>
__global__ void swiglu_kernel(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t rows,
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
    store_f32<T, V>(out + r * out_stride + j, o);
  }
}

template <typename T, int V>
__global__ void relu2_kernel(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t rows,
                             int64_t n) {
  const int64_t packs_per_row = n / V, total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / packs_per_row, j = (i % packs_per_row) * V;
    float x[V];
    load_f32<T, V>(in + r * in_stride + j, x);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = relu2(x[k]);
    store_f32<T, V>(out + r * out_stride + j, x);
  }
}

inline unsigned elementwise_blocks(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = 65535LL * 8;  // grid-stride beyond this
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// in [rows, 2 * inter] and out [rows, inter], row strides in elements.
template <typename T>
cudaError_t swiglu(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t rows, int64_t inter,
                   cudaStream_t stream) {
  if (rows == 0 || inter == 0) return cudaSuccess;
  constexpr int V = pack_size<T>();
  constexpr int kThreads = 256;
  if (inter % V == 0 && in_stride % V == 0 && out_stride % V == 0 && aligned16(in) && aligned16(out)) {
    swiglu_kernel<T, V><<<elementwise_blocks(rows * inter / V, kThreads), kThreads, 0, stream>>>(
        in, in_stride, out, out_stride, rows, inter);
  } else {
    swiglu_kernel<T, 1><<<elementwise_blocks(rows * inter, kThreads), kThreads, 0, stream>>>(
        in, in_stride, out, out_stride, rows, inter);
  }
  return cudaGetLastError();
}

// in and out [rows, n], row strides in elements.
template <typename T>
cudaError_t relu2(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t rows, int64_t n,
                  cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  constexpr int V = pack_size<T>();
  constexpr int kThreads = 256;
  if (n % V == 0 && in_stride % V == 0 && out_stride % V == 0 && aligned16(in) && aligned16(out)) {
    relu2_kernel<T, V><<<elementwise_blocks(rows * n / V, kThreads), kThreads, 0, stream>>>(in, in_stride, out,
                                                                                           out_stride, rows, n);
  } else {
    relu2_kernel<T, 1><<<elementwise_blocks(rows * n, kThreads), kThreads, 0, stream>>>(in, in_stride, out,
                                                                                       out_stride, rows, n);
  }
  return cudaGetLastError();
}

// Explicit instantiations for one element type T, expanded by csrc/cuda_kernels/instantiate.cu (a kernel
// added here is instantiated by adding it to this list).
#define FASTLM_ACTIVATIONS_INSTANTIATE(T)                                                                       \
  template cudaError_t swiglu<T>(const T*, int64_t, T*, int64_t, int64_t, int64_t, cudaStream_t);               \
  template cudaError_t relu2<T>(const T*, int64_t, T*, int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace fastlm
