// The CPU implementations of the op list (csrc/op_list.h), registered by csrc/cpu/register_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastlm::cpu {

using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                double eps, bool weight_in_fp32);
std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                  const OptT& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                                        const at::Tensor& sin, const OptT& qw, const OptT& qb,
                                                        const OptT& kw, const OptT& kb, int64_t H, int64_t Hkv,
                                                        int64_t D, int64_t R, bool interleaved, bool per_head_layout,
                                                        double eps);
at::Tensor qkv_rope_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const OptT& qw,
                          const OptT& qb, const OptT& kw, const OptT& kb, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& cache_positions, int64_t H, int64_t Hkv,
                          int64_t D, int64_t R, bool interleaved, bool per_head_layout, double eps);

at::Tensor swiglu(const at::Tensor& gate_up);
at::Tensor relu2(const at::Tensor& x);
// In place: swiglu_ writes silu(gate) * up into gate_up's gate half; relu2_ overwrites x.
void swiglu_(const at::Tensor& gate_up);
void relu2_(const at::Tensor& x);

// y = x @ weight^T (+ bias) (+ residual); a streaming kernel for decode-sized x (csrc/cpu/linear.cpp).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const OptT& bias, const OptT& residual);

// y = x @ dequantize(qweight, scales)^T (+ bias) (+ residual), weight-only int8 / int4 (csrc/cpu/quant_linear.cpp).
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const OptT& bias,
                        const OptT& residual, int64_t bits, int64_t group_size);

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, double scale);

}  // namespace fastlm::cpu
