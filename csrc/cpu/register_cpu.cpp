// CPU implementations of the fastlm ops (schemas: csrc/ops.cpp).
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  using namespace fastlm::cpu;
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("add_rms_norm_out", &add_rms_norm_out);
  m.impl("add_layer_norm", &add_layer_norm);
  m.impl("add_layer_norm_out", &add_layer_norm_out);
  m.impl("qkv_rope", &qkv_rope);
  m.impl("qkv_rope_out", &qkv_rope_out);
  m.impl("qkv_rope_cache", &qkv_rope_cache);
  m.impl("qkv_rope_cache_out", &qkv_rope_cache_out);
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_out", &swiglu_out);
  m.impl("relu2", &relu2);
  m.impl("relu2_out", &relu2_out);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_attention_out", &decode_attention_out);
}
