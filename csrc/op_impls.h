// The ops every device backend implements, registered from one list by each backend's
// TORCH_LIBRARY_IMPL block (csrc/cpu/register_cpu.cpp, csrc/cuda/ops_cuda.cu): `m` is the block's
// library, `NS` the namespace holding that backend's functions (schemas: csrc/ops.cpp).
#pragma once

#define FASTLM_IMPL_COMMON_OPS(m, NS)                      \
  m.impl("add_rms_norm", &NS::add_rms_norm);               \
  m.impl("add_rms_norm_out", &NS::add_rms_norm_out);       \
  m.impl("add_layer_norm", &NS::add_layer_norm);           \
  m.impl("add_layer_norm_out", &NS::add_layer_norm_out);   \
  m.impl("qkv_rope", &NS::qkv_rope);                       \
  m.impl("qkv_rope_out", &NS::qkv_rope_out);               \
  m.impl("qkv_rope_cache", &NS::qkv_rope_cache);           \
  m.impl("qkv_rope_cache_out", &NS::qkv_rope_cache_out);   \
  m.impl("swiglu", &NS::swiglu);                           \
  m.impl("swiglu_out", &NS::swiglu_out);                   \
  m.impl("relu2", &NS::relu2);                             \
  m.impl("relu2_out", &NS::relu2_out);                     \
  m.impl("swiglu_", &NS::swiglu_);                         \
  m.impl("relu2_", &NS::relu2_)
