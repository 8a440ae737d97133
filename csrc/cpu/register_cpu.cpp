// CPU implementations of the fastlm ops (the op list: csrc/op_list.h).
#include <torch/library.h>

#include "../op_list.h"

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
#define FASTLM_IMPL_CPU(op, schema) m.impl(#op, &fastlm::cpu::op);
  FASTLM_ALL_OPS(FASTLM_IMPL_CPU)
#undef FASTLM_IMPL_CPU
}
