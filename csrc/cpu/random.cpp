// counter_uniform on CPU: the sampler's uniforms u [rows, cols] in (0, 1), a pure function of (seed, counter,
// row-major index) (the hash and its reference: fastlm/ops/random.py). The reference spells lowbias32 in
// int64 tensor ops, ~40 elementwise passes over an int64 index tensor (8 B an element each way) plus as many
// dispatches on [1]-sized tensors for the step's key: 0.66 ms for one row of a 32,000-token vocabulary on a
// 2-core Zen 4. Here the key is 2 scalar hashes and every element one pass in uint32 registers: 4 B written
// an element, ~20 integer ops that the compiler vectorises (vpmulld), then the exact int -> fp32 conversion.
// Bit for bit the reference: mod-2**32 arithmetic is what the reference computes with its masks and 16-bit
// split products, and (x >> 9) + 0.5 scaled by 2**-23 is exact in fp32.
#include "../checks.h"
#include "../op_list.h"

#include <ATen/Parallel.h>

#include <cstdint>

namespace fastlm::cpu {
namespace {

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

int64_t scalar_key(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == 1, "fastlm: ", name,
                    " must be an int64 tensor of shape (1,), got ", t.scalar_type(), " of shape ", t.sizes());
  return t.const_data_ptr<int64_t>()[0];
}

}  // namespace

at::Tensor counter_uniform(const at::Tensor& seed, const at::Tensor& counter, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "fastlm: counter_uniform's rows and cols must be >= 0, got ", rows,
                    " and ", cols);
  // the low 32 bits of each, as the reference's `& 0xFFFFFFFF` takes them (two's complement for negatives)
  const uint32_t s = static_cast<uint32_t>(scalar_key(seed, "seed"));
  const uint32_t c = static_cast<uint32_t>(scalar_key(counter, "counter"));
  const uint32_t key = lowbias32(s ^ lowbias32(c * 0x9E3779B1u));
  at::Tensor u = at::empty({rows, cols}, seed.options().dtype(at::kFloat));
  float* out = u.data_ptr<float>();
  const int64_t n = rows * cols;
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // (i + key) mod 2**32: the reference's (idx + key) & M32 for the int64 index i
      const uint32_t x = lowbias32(lowbias32(static_cast<uint32_t>(i) + key) ^ key);
      out[i] = (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);  // in (0, 1): 24 bits, exact
    }
  });
  return u;
}

}  // namespace fastlm::cpu
