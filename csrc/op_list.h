// The op contract: one line per op, its name and its schema's arguments and returns (the Python
// declaration of each op, its reference and checks: fastlm/ops/<op>.py). Every list below is
// expanded by csrc/ops.cpp into the TORCH_LIBRARY(fastlm) schemas and the unboxed call_<op> entry
// points, and by each device backend into its TORCH_LIBRARY_IMPL registrations
// (csrc/cpu/register_cpu.cpp, csrc/cuda/ops_cuda.cu).
//
// Adding an op: one line here, its functions in csrc/ops.h and a backend's source file, its Python
// declaration in fastlm/ops. X(name, schema) is called with `name` a bare identifier.
#pragma once

// Implemented by every device backend (CPU and CUDA).
#define FASTLM_DEVICE_OPS(X)                                                                                        \
  /* add + norm. h is empty when residual is None (h would alias x; the Python wrapper returns x). */              \
  X(add_rms_norm, "(Tensor x, Tensor? residual, Tensor weight, float eps, bool weight_in_fp32=False) "             \
                  "-> (Tensor, Tensor)")                                                                            \
  X(add_layer_norm, "(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor)")    \
  /* QKV epilogue */                                                                                                \
  X(qkv_rope, "(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm_weight, Tensor? q_norm_bias, "                  \
              "Tensor? k_norm_weight, Tensor? k_norm_bias, int num_heads, int num_kv_heads, int head_dim, "         \
              "int rotary_dim, bool interleaved, bool per_head_layout, float qk_norm_eps) "                         \
              "-> (Tensor, Tensor, Tensor)")                                                                        \
  X(qkv_rope_cache, "(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm_weight, Tensor? q_norm_bias, "            \
                    "Tensor? k_norm_weight, Tensor? k_norm_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, "          \
                    "Tensor cache_positions, int num_heads, int num_kv_heads, int head_dim, int rotary_dim, "       \
                    "bool interleaved, bool per_head_layout, float qk_norm_eps) -> Tensor")                         \
  /* MLP epilogues, and in place on the GEMM output they consume (swiglu_ writes the gate half) */                 \
  X(swiglu, "(Tensor gate_up) -> Tensor")                                                                           \
  X(relu2, "(Tensor x) -> Tensor")                                                                                  \
  X(swiglu_, "(Tensor(a!) gate_up) -> ()")                                                                          \
  X(relu2_, "(Tensor(a!) x) -> ()")

// CPU only (on CUDA the Python plugin sends them to the reference or the Triton kernel).
#define FASTLM_CPU_OPS(X)                                                                                           \
  /* projections at decode sizes (a weight-streaming kernel for a few rows, ATen's GEMM beyond) */                  \
  X(linear, "(Tensor x, Tensor weight, Tensor? bias=None, Tensor? residual=None) -> Tensor")                        \
  /* weight-only int8 / int4 projections (fastlm/ops/quant_linear.py's formats; csrc/cpu/quant_linear.cpp) */     \
  X(quant_linear, "(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, Tensor? residual, int bits, "             \
                  "int group_size) -> Tensor")                                                                      \
  /* decode attention over a static cache */                                                                        \
  X(decode_attention, "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor")

#define FASTLM_ALL_OPS(X) FASTLM_DEVICE_OPS(X) FASTLM_CPU_OPS(X)
