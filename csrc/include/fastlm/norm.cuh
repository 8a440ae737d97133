// add + RMSNorm / LayerNorm: one block per row. h = x (+ residual) is rounded to T (and stored when a
// residual is given), statistics are fp32 block reductions, the row is re-read by the same threads
// (their own writes, so no extra synchronisation) for the variance and output sweeps.
#pragma once

#include "fastlm/common.cuh"

namespace fastlm {
namespace cuda {

struct NormRows {
  int64_t rows, n;
  int64_t x_stride, res_stride, y_stride, h_stride;  // in elements
};

template <typename T, typename W, typename Y, bool kRms, int V>
__global__ void __launch_bounds__(1024) add_norm_kernel(const T* __restrict__ x, const T* __restrict__ res,
                                                        const W* __restrict__ w, const W* __restrict__ bias,
                                                        Y* __restrict__ y, T* h, NormRows d, float eps,
                                                        bool weight_in_fp32) {
  __shared__ float smem[33];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d.x_stride;
  const T* rr = res ? res + row * d.res_stride : nullptr;
  T* hr = res ? h + row * d.h_stride : nullptr;
  Y* yr = y + row * d.y_stride;
  const int64_t n = d.n;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;

  float acc = 0.f;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < n; j += step) {
    float a[V];
    load_f32<T, V>(xr + j, a);
    if (rr) {
      float r[V];
      load_f32<T, V>(rr + j, r);
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = Cvt<T>::to(Cvt<T>::from(a[k] + r[k]));  // h rounded to T
      store_f32<T, V>(hr + j, a);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) acc += kRms ? a[k] * a[k] : a[k];
  }
  const float total = block_sum(acc, smem);
  const T* src = rr ? hr : xr;
  float mean = 0.f, rstd;
  if (kRms) {
    rstd = rms_rstd(total, n, eps);
  } else {
    mean = layer_norm_mean(total, n);
    float m2 = 0.f;
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < n; j += step) {
      float a[V];
      load_f32<T, V>(src + j, a);
#pragma unroll
      for (int k = 0; k < V; ++k) m2 += (a[k] - mean) * (a[k] - mean);
    }
    rstd = layer_norm_rstd(block_sum(m2, smem), n, eps);
  }
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < n; j += step) {
    float a[V], wv[V];
    load_f32<T, V>(src + j, a);
    load_f32<W, V>(w + j, wv);
    if (kRms) {
      if (weight_in_fp32) {
#pragma unroll
        for (int k = 0; k < V; ++k) a[k] = rms_apply_weight_fp32(a[k], rstd, wv[k]);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) a[k] = Cvt<T>::to(Cvt<T>::from(a[k] * rstd)) * wv[k];
      }
    } else if (bias) {
      float bv[V];
      load_f32<W, V>(bias + j, bv);
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = layer_norm_apply(a[k], mean, rstd, wv[k], bv[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = layer_norm_apply(a[k], mean, rstd, wv[k]);
    }
    store_f32<Y, V>(yr + j, a);
  }
}

template <typename T, typename W, typename Y, bool kRms>
cudaError_t launch_add_norm(const T* x, const T* res, const W* w, const W* bias, Y* y, T* h, NormRows d, float eps,
                            bool weight_in_fp32, cudaStream_t stream) {
  if (d.rows == 0 || d.n == 0) return cudaSuccess;
  constexpr int V = pack_size<T>();
  // 16-byte packs when every row start is 16-byte aligned (base pointers and row strides).
  const bool vec = d.n % V == 0 && aligned16(x) && aligned16(y) && aligned16(w) &&
                   (!res || (aligned16(res) && aligned16(h) && d.res_stride % V == 0 && d.h_stride % V == 0)) &&
                   (!bias || aligned16(bias)) && d.x_stride % V == 0 && d.y_stride % V == 0 &&
                   (sizeof(W) == sizeof(T) && sizeof(Y) == sizeof(T));
  const int64_t work = vec ? d.n / V : d.n;
  int threads = 32;
  while (threads < 1024 && threads < work) threads *= 2;
  threads = threads > 1024 ? 1024 : threads;
  const dim3 grid(static_cast<unsigned>(d.rows));
  if (vec) {
    add_norm_kernel<T, W, Y, kRms, V><<<grid, threads, 0, stream>>>(x, res, w, bias, y, h, d, eps, weight_in_fp32);
  } else {
    add_norm_kernel<T, W, Y, kRms, 1><<<grid, threads, 0, stream>>>(x, res, w, bias, y, h, d, eps, weight_in_fp32);
  }
  return cudaGetLastError();
}

// y = rmsnorm(x + residual) * weight, h = x + residual (residual may be null: h is not written).
// W is T or float (an fp32 weight); Y is T, or float for the Arcee order with an fp32 weight.
template <typename T, typename W, typename Y>
cudaError_t add_rms_norm(const T* x, const T* residual, const W* weight, Y* y, T* h, NormRows d, float eps,
                         bool weight_in_fp32, cudaStream_t stream) {
  return launch_add_norm<T, W, Y, true>(x, residual, weight, static_cast<const W*>(nullptr), y, h, d, eps,
                                        weight_in_fp32, stream);
}

// y = layer_norm(x + residual, weight, bias) (bias may be null), h = x + residual.
template <typename T>
cudaError_t add_layer_norm(const T* x, const T* residual, const T* weight, const T* bias, T* y, T* h, NormRows d,
                           float eps, cudaStream_t stream) {
  return launch_add_norm<T, T, T, false>(x, residual, weight, bias, y, h, d, eps, false, stream);
}

// Explicit instantiations, expanded by csrc/cuda_kernels/instantiate.cu: one element type T throughout, and
// fp32 weights with a 16-bit T (Helium's order: output in T; Arcee's: promoted to fp32).
#define FASTLM_NORM_INSTANTIATE(T)                                                                              \
  template cudaError_t add_rms_norm<T, T, T>(const T*, const T*, const T*, T*, T*, NormRows, float, bool,       \
                                             cudaStream_t);                                                     \
  template cudaError_t add_layer_norm<T>(const T*, const T*, const T*, const T*, T*, T*, NormRows, float,       \
                                         cudaStream_t);
#define FASTLM_NORM_INSTANTIATE_FP32_WEIGHT(T)                                                                  \
  template cudaError_t add_rms_norm<T, float, T>(const T*, const T*, const float*, T*, T*, NormRows, float,     \
                                                 bool, cudaStream_t);                                           \
  template cudaError_t add_rms_norm<T, float, float>(const T*, const T*, const float*, float*, T*, NormRows,    \
                                                     float, bool, cudaStream_t);

}  // namespace cuda
}  // namespace fastlm
