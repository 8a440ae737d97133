// Row sweeps shared by the CPU norm kernels: add + RMSNorm / LayerNorm over rows of T (norms.cpp) and
// the qk-LayerNorm of the QKV epilogue over an fp32 head buffer (qkv_rope.cpp). fp32 statistics.
#pragma once

#include "vec_util.h"

namespace fastlm::cpu {

// Sweep 1: h = x (+ residual), rounded to T and stored to h when there is a residual (r non-null),
// and the fp32 value of that row also stored to row32 when given; returns sum(h) (or sum(h^2) when
// kSquares). kStream: h is stored with store_chunk<true> (see kStreamOutBytes).
template <typename T, bool kSquares, bool kStream = false>
inline float add_and_sum(const T* x, const T* r, T* h, int64_t n, float* row32 = nullptr) {
  fVec acc0(0.f), acc1(0.f);
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    fVec a, b;
    IO<T>::load(x + j, m, a, b);
    if (r != nullptr) {
      fVec c, d;
      IO<T>::load(r + j, m, c, d);
      a = a + c;
      b = b + d;
      store_round_chunk<kStream>(h + j, m, a, b);
    }
    if (row32 != nullptr) IO<float>::store(row32 + j, m, a, b);
    mask_tail(m, a, b);
    if (kSquares) {
      acc0 = at::vec::fmadd(a, a, acc0);
      acc1 = at::vec::fmadd(b, b, acc1);
    } else {
      acc0 = acc0 + a;
      acc1 = acc1 + b;
    }
  }
  return hsum(acc0 + acc1);
}

// The centred sum of squares of a row whose mean is known (a second sweep: no E[x^2] - E[x]^2
// cancellation).
template <typename S>
inline float centred_sum_squares(const S* src, float mean, int64_t n) {
  const fVec vm(mean);
  fVec acc0(0.f), acc1(0.f);
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    fVec a, b;
    IO<S>::load(src + j, m, a, b);
    a = a - vm;
    b = b - vm;
    mask_tail(m, a, b);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  return hsum(acc0 + acc1);
}

// dst = (src - mean) * rstd * w (+ bias). src and dst may be the same buffer (each chunk is read
// before it is written).
template <bool kStream = false, typename S, typename W, typename Y>
inline void layer_norm_affine(const S* src, float mean, float rstd, const W* w, const W* bias, Y* dst, int64_t n) {
  const fVec vm(mean), vr(rstd);
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    fVec a, b, wa, wb;
    IO<S>::load(src + j, m, a, b);
    IO<W>::load(w + j, m, wa, wb);
    if (bias) {
      fVec ba, bb;
      IO<W>::load(bias + j, m, ba, bb);
      a = layer_norm_apply(a, vm, vr, wa, ba);
      b = layer_norm_apply(b, vm, vr, wb, bb);
    } else {
      a = layer_norm_apply(a, vm, vr, wa);
      b = layer_norm_apply(b, vm, vr, wb);
    }
    store_chunk<kStream>(dst + j, m, a, b);
  }
}

// LayerNorm of a row of n elements whose mean is known: centred variance, then the affine.
template <bool kStream = false, typename S, typename W, typename Y>
inline void layer_norm_row(const S* src, float mean, const W* w, const W* bias, Y* dst, int64_t n, float eps) {
  layer_norm_affine<kStream>(src, mean, layer_norm_rstd(centred_sum_squares(src, mean, n), n, eps), w, bias, dst, n);
}

}  // namespace fastlm::cpu
