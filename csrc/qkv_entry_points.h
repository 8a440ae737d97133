// The qkv_rope and qkv_rope_cache entry points, the same on every device: check the arguments once
// (checks.h), allocate the outputs, and hand them to the device's run_qkv, which writes q and either the
// dense k and v or the caches. A device backend expands FASTLM_QKV_ENTRY_POINTS() in its namespace, after
// it has defined
//   void run_qkv(qkv, cos, sin, qw, qb, kw, kb, const QkvDims&, bool interleaved, bool qkv_head_major,
//                double eps, q_out, k_out, v_out, k_cache, v_cache, cache_positions);
// with the outputs it does not write left undefined (csrc/cpu/qkv_rope.cpp, csrc/cuda/ops_cuda.cu).
// The signatures are op_list.h's CPU declarations; the CUDA backend defines the same ones. The values of
// cache_positions are bounds-checked by the CPU run_qkv; on CUDA they live on the device and are not
// (a check would be a host sync): fastlm.ops.qkv's docstring says what happens there.
#pragma once

#include "checks.h"

#define FASTLM_QKV_ENTRY_POINTS()                                                                                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(                                                          \
      const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const OptT& qw, const OptT& qb,          \
      const OptT& kw, const OptT& kb, int64_t H, int64_t Hkv, int64_t D, int64_t R, bool interleaved,               \
      bool qkv_head_major, double eps) {                                                                            \
    const QkvDims d = check_qkv_args(qkv, cos, sin, qw, qb, kw, kb, H, Hkv, D, R, qkv_head_major, eps);             \
    auto out = qkv_dense_outputs(qkv, d); /* q [B, H, S, D], k and v [B, Hkv, S, D] */                              \
    run_qkv(qkv, cos, sin, qw, qb, kw, kb, d, interleaved, qkv_head_major, eps, std::get<0>(out),                   \
            std::get<1>(out), std::get<2>(out), at::Tensor(), at::Tensor(), at::Tensor());                          \
    return out;                                                                                                     \
  }                                                                                                                 \
                                                                                                                    \
  at::Tensor qkv_rope_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const OptT& qw,    \
                            const OptT& qb, const OptT& kw, const OptT& kb, const at::Tensor& k_cache,              \
                            const at::Tensor& v_cache, const at::Tensor& cache_positions, int64_t H, int64_t Hkv,   \
                            int64_t D, int64_t R, bool interleaved, bool qkv_head_major, double eps) {              \
    const QkvDims d = check_qkv_args(qkv, cos, sin, qw, qb, kw, kb, H, Hkv, D, R, qkv_head_major, eps);             \
    check_caches(qkv, k_cache, v_cache, cache_positions, d);                                                        \
    at::Tensor q = at::empty({d.B, H, d.S, D}, qkv.options());                                                      \
    run_qkv(qkv, cos, sin, qw, qb, kw, kb, d, interleaved, qkv_head_major, eps, q, at::Tensor(), at::Tensor(),      \
            k_cache, v_cache, cache_positions);                                                                     \
    return q;                                                                                                       \
  }
