// Math shared by the CPU (C++) and CUDA kernels: compiled as plain C++ without nvcc (the CPU build
// uses it, so the CPU tests exercise it) and as __host__ __device__ code under nvcc.
//
// The element-wise helpers are templates over the value type F: the CUDA kernels instantiate them
// with float; the CPU kernels with float (tails) and at::vec::Vectorized<float> (SIMD bodies). Each
// value type supplies exp/max through a MathOps<F> specialisation (float here; Vectorized<float> in
// csrc/cpu/vec_util.h).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTLM_HD __host__ __device__
#define FASTLM_INLINE __forceinline__
#else
#include <cmath>
#define FASTLM_HD
#if defined(_MSC_VER)
#define FASTLM_INLINE __forceinline
#else
#define FASTLM_INLINE inline __attribute__((always_inline))
#endif
#endif

namespace fastlm {

template <typename F>
struct MathOps;

template <>
struct MathOps<float> {
  static FASTLM_HD FASTLM_INLINE float exp(float x) {
#if defined(__CUDA_ARCH__)
    return ::expf(x);
#else
    return std::exp(x);
#endif
  }
  // NaN in a propagates (as torch.relu and ATen's vectorised maximum do): relu2(NaN) is NaN, not 0.
  static FASTLM_HD FASTLM_INLINE float max(float a, float b) { return (a > b || a != a) ? a : b; }
};

// ---- norm finalisation: statistics (fp32 sums over n elements) -> rstd ----------------------------
// RMSNorm: rstd = 1 / sqrt(mean(h^2) + eps).
FASTLM_HD FASTLM_INLINE float rms_rstd(float sum_sq, int64_t n, float eps) {
  return 1.0f / sqrtf(sum_sq / static_cast<float>(n) + eps);
}
// LayerNorm (biased variance, like torch): m2 = sum((h - mean)^2), computed in a second pass over the
// row (which lives in registers / cache), avoiding E[x^2] - E[x]^2 cancellation.
FASTLM_HD FASTLM_INLINE float layer_norm_mean(float sum, int64_t n) { return sum / static_cast<float>(n); }
FASTLM_HD FASTLM_INLINE float layer_norm_rstd(float m2, int64_t n, float eps) {
  return 1.0f / sqrtf(m2 / static_cast<float>(n) + eps);
}

// ---- norm application (fp32; the caller rounds to the storage type) ------------------------------
// Helium order: weight.float() * (h * rstd), rounded once by the caller.
template <typename F>
FASTLM_HD FASTLM_INLINE F rms_apply_weight_fp32(F h, F rstd, F w) {
  return w * (h * rstd);
}
// LayerNorm affine in fp32: (h - mean) * rstd * w + b.
template <typename F>
FASTLM_HD FASTLM_INLINE F layer_norm_apply(F h, F mean, F rstd, F w, F b) {
  return (h - mean) * rstd * w + b;
}
template <typename F>
FASTLM_HD FASTLM_INLINE F layer_norm_apply(F h, F mean, F rstd, F w) {
  return (h - mean) * rstd * w;
}

// ---- RoPE: rotate one pair (x0, x1) by the angle whose cosine/sine are (c, s) ---------------------
// HF: out = x * cos + rotate(x) * sin with rotate(x0, x1) = (-x1, x0), for both the half-split (neox)
// pairs (i, i + r/2) and the interleaved (gpt-j) pairs (2i, 2i + 1).
template <typename F>
FASTLM_HD FASTLM_INLINE void rope_rotate(F& x0, F& x1, const F& c, const F& s) {
  const F a = x0 * c - x1 * s;
  const F b = x1 * c + x0 * s;
  x0 = a;
  x1 = b;
}

// ---- activations (fp32) ----------------------------------------------------------------------------
template <typename F>
FASTLM_HD FASTLM_INLINE F silu(F x) {
  return x / (F(1.0f) + MathOps<F>::exp(F(0.0f) - x));
}
template <typename F>
FASTLM_HD FASTLM_INLINE F silu_mul(F gate, F up) {
  return silu(gate) * up;
}
template <typename F>
FASTLM_HD FASTLM_INLINE F relu2(F x) {
  const F r = MathOps<F>::max(x, F(0.0f));
  return r * r;
}

}  // namespace fastlm
