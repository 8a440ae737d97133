// CPU implementations of the fastlm ops (schemas: csrc/ops.cpp).
#include <torch/library.h>

#include "../op_impls.h"
#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  FASTLM_IMPL_COMMON_OPS(m, fastlm::cpu);
  m.impl("decode_attention", &fastlm::cpu::decode_attention);
  m.impl("decode_attention_out", &fastlm::cpu::decode_attention_out);
  m.impl("linear", &fastlm::cpu::linear);
}
