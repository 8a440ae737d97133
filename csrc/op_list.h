// The op contract: one line per op, its name and its schema's arguments and returns (the Python
// declaration of each op, its reference and checks: fastlm/ops/<op>.py), and below the lists the C++
// signatures of the CPU implementations. Every list is expanded by csrc/ops.cpp into the
// TORCH_LIBRARY(fastlm) schemas and the unboxed call_<op> entry points, and by each device backend into
// its TORCH_LIBRARY_IMPL registrations (csrc/cpu/register_cpu.cpp, csrc/cuda/ops_cuda.cu, which defines
// its fastlm::cuda functions with the same signatures). The Python backend plugin
// (fastlm/backends/cpp.py) reads which op has which device's kernel off the dispatcher.
//
// Adding an op: one line in a list here and its CPU signature below, its kernels in a backend's source
// file, its Python declaration in fastlm/ops (CONTRIBUTING.md). X(name, schema) is called with `name` a
// bare identifier.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

// Implemented by every device backend (CPU and CUDA).
#define FASTLM_DEVICE_OPS(X)                                                                                        \
  /* add + norm. h is empty when residual is None (h would alias x; the Python wrapper returns x). */              \
  X(add_rms_norm, "(Tensor x, Tensor? residual, Tensor weight, float eps, bool weight_in_fp32=False) "             \
                  "-> (Tensor, Tensor)")                                                                            \
  X(add_layer_norm, "(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor)")    \
  /* QKV epilogue */                                                                                                \
  X(qkv_rope, "(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm_weight, Tensor? q_norm_bias, "                  \
              "Tensor? k_norm_weight, Tensor? k_norm_bias, int num_heads, int num_kv_heads, int head_dim, "         \
              "int rotary_dim, bool interleaved, bool qkv_head_major, float qk_norm_eps) "                         \
              "-> (Tensor, Tensor, Tensor)")                                                                        \
  X(qkv_rope_cache, "(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm_weight, Tensor? q_norm_bias, "            \
                    "Tensor? k_norm_weight, Tensor? k_norm_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, "          \
                    "Tensor cache_positions, int num_heads, int num_kv_heads, int head_dim, int rotary_dim, "       \
                    "bool interleaved, bool qkv_head_major, float qk_norm_eps) -> Tensor")                         \
  /* MLP epilogues, and in place on the GEMM output they consume (swiglu_ writes the gate half) */                 \
  X(swiglu, "(Tensor gate_up) -> Tensor")                                                                           \
  X(relu2, "(Tensor x) -> Tensor")                                                                                  \
  X(swiglu_, "(Tensor(a!) gate_up) -> ()")                                                                          \
  X(relu2_, "(Tensor(a!) x) -> ()")

// CPU only (on CUDA the Python plugin sends them to the reference or the Triton kernel).
#define FASTLM_CPU_OPS(X)                                                                                           \
  /* projections at decode sizes (a weight-streaming kernel for a few rows, ATen's GEMM beyond) */                  \
  X(linear, "(Tensor x, Tensor weight, Tensor? bias=None, Tensor? residual=None) -> Tensor")                        \
  /* weight-only int8 / int4 projections (fastlm/ops/quantized.py's formats; csrc/cpu/quant_linear.cpp) */     \
  X(quant_linear, "(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, Tensor? residual, int bits, "             \
                  "int group_size) -> Tensor")                                                                      \
  /* decode attention over a static cache */                                                                        \
  X(decode_attention, "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor")          \
  /* prefill attention without a mask (causal or not; fastlm/ops/attention.py sends masked calls to SDPA) */       \
  X(prefill_attention, "(Tensor q, Tensor k, Tensor v, bool is_causal, float scale) -> Tensor")                    \
  /* the sampler's counter-based uniforms (fastlm/ops/random.py) */                                                 \
  X(counter_uniform, "(Tensor seed, Tensor counter, int rows, int cols) -> Tensor")

#define FASTLM_ALL_OPS(X) FASTLM_DEVICE_OPS(X) FASTLM_CPU_OPS(X)

// The CPU implementations (csrc/cpu/*.cpp), registered by csrc/cpu/register_cpu.cpp.
namespace fastlm::cpu {

using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                double eps, bool weight_in_fp32);
std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                  const OptT& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                                        const at::Tensor& sin, const OptT& qw, const OptT& qb,
                                                        const OptT& kw, const OptT& kb, int64_t H, int64_t Hkv,
                                                        int64_t D, int64_t R, bool interleaved, bool qkv_head_major,
                                                        double eps);
at::Tensor qkv_rope_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const OptT& qw,
                          const OptT& qb, const OptT& kw, const OptT& kb, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& cache_positions, int64_t H, int64_t Hkv,
                          int64_t D, int64_t R, bool interleaved, bool qkv_head_major, double eps);

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
// softmax(q k^T * scale, causal: key j <= query i) v, q [B, H, S, D], k / v [B, Hkv, T, D / Dv]
// (csrc/cpu/prefill_attention.cpp); the result is [B, H, S, Dv] over [B, S, H, Dv] memory.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal,
                             double scale);

// fp32 uniforms [rows, cols] in (0, 1) for (seed [1], counter [1]) int64 (csrc/cpu/random.cpp).
at::Tensor counter_uniform(const at::Tensor& seed, const at::Tensor& counter, int64_t rows, int64_t cols);

}  // namespace fastlm::cpu
