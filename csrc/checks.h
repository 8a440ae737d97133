// Argument checks shared by the CPU and CUDA bindings (device-agnostic; errors name the argument).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace fastlm {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Errors raise the Python exception types fastlm.ops' Python checks raise (TypeError for a dtype,
// ValueError for a shape or device): the public ops leave the checks to these helpers when the C++
// backend runs them.
inline void check_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), "fastlm: ", name, " must be float32, bfloat16 or float16, got ",
                   t.scalar_type());
}

inline void check_like(const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name,
                       bool same_dtype = true) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fastlm: ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
  if (same_dtype) {
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fastlm: ", name, " has dtype ", t.scalar_type(), " but ",
                     ref_name, " has dtype ", ref.scalar_type());
  }
}

// A norm's epsilon: finite and >= 0 (a negative or NaN eps turns whole rows into NaN).
inline void check_eps(const char* name, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "fastlm: ", name, " must be a finite number >= 0, got ", eps);
}

// An int32 / int64 index tensor (lengths, cache_positions) on ref's device.
inline void check_index(const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "fastlm: ", name,
                   " must be int32 or int64, got ", t.scalar_type());
  check_like(name, t, ref, ref_name, /*same_dtype=*/false);
}

inline void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "fastlm: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// A projection's output shape x.shape[:-1] + [N], after checking its optional bias [N] and residual (that
// shape), both on x's device with x's dtype (linear, quant_linear).
inline std::vector<int64_t> projection_out_shape(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& residual) {
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (bias) {
    check_like("bias", *bias, x, "x");
    check_shape("bias", *bias, {N});
  }
  if (residual) {
    check_like("residual", *residual, x, "x");
    check_shape("residual", *residual, out_shape);
  }
  return out_shape;
}

// swiglu's output shape ([..., 2I] -> [..., I]), after checking gate_up.
inline std::vector<int64_t> swiglu_out_shape(const at::Tensor& gate_up) {
  check_float("gate_up", gate_up);
  TORCH_CHECK_VALUE(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
                    "fastlm: gate_up's last dim must be even ([gate | up]), got ", gate_up.sizes());
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  return shape;
}

inline void check_relu2_input(const at::Tensor& x) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastlm: relu2 needs at least one dim, got a 0-d tensor");
}

// Output dtype of add_rms_norm: Helium order (weight in fp32) rounds to x's dtype; Arcee order
// multiplies in the promoted dtype (weight may be fp32 while x is bf16/fp16).
inline at::ScalarType rms_out_dtype(const at::Tensor& x, const at::Tensor& weight, bool weight_in_fp32) {
  return weight_in_fp32 ? x.scalar_type() : at::promote_types(x.scalar_type(), weight.scalar_type());
}

inline void check_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, double eps, bool weight_any_float) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "fastlm: x must be [..., N] with N > 0, got ", x.sizes());
  const int64_t n = x.size(-1);
  if (residual.has_value()) {
    check_like("residual", *residual, x, "x");
    check_shape("residual", *residual, x.sizes());
  }
  check_like("weight", weight, x, "x", /*same_dtype=*/!weight_any_float);
  if (weight_any_float) {
    TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
                     "fastlm: weight must have x's dtype or float32, got ", weight.scalar_type());
  }
  check_shape("weight", weight, {n});
  if (bias.has_value()) {
    check_like("bias", *bias, x, "x");
    check_shape("bias", *bias, {n});
  }
  check_eps("eps", eps);
}

struct QkvDims {
  int64_t B, S, H, Hkv, D, R;
};

inline QkvDims check_qkv_args(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                              const std::optional<at::Tensor>& qw, const std::optional<at::Tensor>& qb,
                              const std::optional<at::Tensor>& kw, const std::optional<at::Tensor>& kb,
                              int64_t H, int64_t Hkv, int64_t D, int64_t R, bool qkv_head_major, double eps) {
  check_float("qkv", qkv);
  TORCH_CHECK_VALUE(qkv.dim() == 3, "fastlm: qkv must be [B, S, W], got ", qkv.sizes());
  TORCH_CHECK_VALUE(H > 0 && Hkv > 0 && D > 0, "fastlm: num_heads, num_kv_heads and head_dim must be positive, got ",
                    H, ", ", Hkv, ", ", D);
  TORCH_CHECK_VALUE(H % Hkv == 0, "fastlm: num_heads (", H, ") must be a multiple of num_kv_heads (", Hkv, ")");
  TORCH_CHECK_VALUE(!qkv_head_major || H == Hkv,
                    "fastlm: the head-major [H, 3, D] layout needs num_kv_heads == num_heads");
  TORCH_CHECK_VALUE(qkv.size(2) == (H + 2 * Hkv) * D, "fastlm: qkv's last dim must be (H + 2*Hkv) * D = ",
                    (H + 2 * Hkv) * D, ", got ", qkv.size(2));
  TORCH_CHECK_VALUE(R % 2 == 0 && R >= 0 && R <= D, "fastlm: rotary_dim must be even and in [0, head_dim], got ", R);
  const int64_t B = qkv.size(0), S = qkv.size(1);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"cos", &cos}, {"sin", &sin}}) {
    check_like(name, *t, qkv, "qkv");
    TORCH_CHECK_VALUE(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == S && t->size(2) >= R,
                      "fastlm: ", name, " must be [B or 1, S, rotary_dim], got ", t->sizes());
  }
  const std::optional<at::Tensor>* norms[4] = {&qw, &qb, &kw, &kb};
  const char* names[4] = {"q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias"};
  for (int i = 0; i < 4; ++i) {
    if (!norms[i]->has_value()) continue;
    const at::Tensor& t = **norms[i];
    const int64_t heads = i < 2 ? H : Hkv;
    check_like(names[i], t, qkv, "qkv");
    TORCH_CHECK_VALUE((t.dim() == 1 && t.size(0) == D) || (t.dim() == 2 && t.size(0) == heads && t.size(1) == D),
                      "fastlm: ", names[i], " must be [D] or [heads, D], got ", t.sizes());
  }
  TORCH_CHECK_VALUE(!qb.has_value() || qw.has_value(), "fastlm: q_norm_bias needs q_norm_weight");
  TORCH_CHECK_VALUE(!kb.has_value() || kw.has_value(), "fastlm: k_norm_bias needs k_norm_weight");
  check_eps("qk_norm_eps", eps);
  return {B, S, H, Hkv, D, R};
}

inline void check_caches(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& pos, const QkvDims& d) {
  for (auto [name, c] : {std::pair<const char*, const at::Tensor*>{"k_cache", &k_cache}, {"v_cache", &v_cache}}) {
    check_like(name, *c, qkv, "qkv");
    TORCH_CHECK_VALUE(c->dim() == 4 && c->size(0) == d.B && c->size(1) == d.Hkv && c->size(3) == d.D, "fastlm: ", name,
                      " must be [B, Hkv, Tmax, D] = [", d.B, ", ", d.Hkv, ", Tmax, ", d.D, "], got ", c->sizes());
    TORCH_CHECK_VALUE(c->stride(3) == 1 || d.D == 1 || c->is_contiguous(),  // (empty: contiguous)
                      "fastlm: ", name, "'s last dim must be contiguous");
    at::assert_no_internal_overlap(*c);  // written in place: torch's own error, as the reference's index_put_
  }
  TORCH_CHECK_VALUE(k_cache.numel() == 0 || k_cache.data_ptr() != v_cache.data_ptr(),
                    "fastlm: k_cache and v_cache must be different tensors (both are written)");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "fastlm: k_cache and v_cache differ in shape");
  check_index("cache_positions", pos, qkv, "qkv");
  TORCH_CHECK_VALUE(pos.dim() == 2 && pos.size(0) == d.B && pos.size(1) == d.S,
                    "fastlm: cache_positions must be [B, S] = [", d.B, ", ", d.S, "], got ", pos.sizes());
}

// The dense outputs of qkv_rope: q [B, H, S, D], k and v [B, Hkv, S, D].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_dense_outputs(const at::Tensor& qkv, const QkvDims& d) {
  return {at::empty({d.B, d.H, d.S, d.D}, qkv.options()), at::empty({d.B, d.Hkv, d.S, d.D}, qkv.options()),
          at::empty({d.B, d.Hkv, d.S, d.D}, qkv.options())};
}

inline void check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& lengths, double scale) {
  check_float("q", q);
  TORCH_CHECK_VALUE(q.dim() == 3, "fastlm: q must be [B, H, D], got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  for (auto [name, c] : {std::pair<const char*, const at::Tensor*>{"k_cache", &k_cache}, {"v_cache", &v_cache}}) {
    check_like(name, *c, q, "q");
    TORCH_CHECK_VALUE(c->dim() == 4 && c->size(0) == B && c->size(3) == D && c->size(1) > 0 && H % c->size(1) == 0,
                      "fastlm: ", name, " must be [B, Hkv, Tmax, D] with Hkv dividing H, got ", c->sizes());
  }
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "fastlm: k_cache and v_cache differ in shape");
  check_index("lengths", lengths, q, "q");
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B, "fastlm: lengths must be [B] = [", B, "], got ",
                    lengths.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "fastlm: scale must be finite, got ", scale);
}

}  // namespace fastlm
