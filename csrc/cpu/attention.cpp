// Decode attention on CPU: one query token per sequence over the first lengths[b] slots of a static
// [B, Hkv, Tmax, D] cache, GQA (the G = H / Hkv query heads of a kv head share each K/V row read),
// online softmax in fp32 over blocks of keys. Reads each valid K/V row once; never touches slots past
// the length.
#include "../checks.h"
#include "../op_list.h"
#include "vec_util.h"

#include <limits>
#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

constexpr int64_t kBlock = 128;  // keys per online-softmax block

inline float dot(const float* a, const float* b, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    fVec a0, a1, b0, b1;
    IO<float>::load(a + j, m, a0, a1);
    IO<float>::load(b + j, m, b0, b1);
    acc0 = at::vec::fmadd(a0, b0, acc0);
    acc1 = at::vec::fmadd(a1, b1, acc1);  // zero-filled tails contribute 0
  }
  return hsum(acc0 + acc1);
}

// A K/V row as fp32: the row itself for fp32 storage, else converted into buf.
template <typename T>
inline const float* row_f32(const T* p, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    convert_row(p, buf, n);
    return buf;
  }
}

inline int64_t length_of(const void* lengths, bool len64, int64_t len_s, int64_t b) {
  return len64 ? static_cast<const int64_t*>(lengths)[b * len_s] : static_cast<const int32_t*>(lengths)[b * len_s];
}

// Every length in [1, Tmax] (B reads): an empty sequence has no softmax, and slots past Tmax do not exist.
void check_lengths(const at::Tensor& lengths, int64_t Tmax) {
  const bool len64 = lengths.scalar_type() == at::kLong;
  for (int64_t b = 0; b < lengths.size(0); ++b) {
    const int64_t L = length_of(lengths.const_data_ptr(), len64, lengths.stride(0), b);
    TORCH_CHECK_VALUE(L >= 1 && L <= Tmax, "fastlm: lengths[", b, "] = ", L,
                      " is outside [1, Tmax] = [1, ", Tmax, "]: each sequence attends to 1 to Tmax cache slots");
  }
}

template <typename T>
void decode_kernel(const T* q, int64_t q_sb, int64_t q_sh, const T* kc, const int64_t* ks, const T* vc,
                   const int64_t* vs, const void* lengths, bool len64, int64_t len_s, T* out, int64_t B, int64_t H,
                   int64_t Hkv, int64_t D, int64_t Tmax, float scale) {
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), row(D), scores(G * kBlock), mx(G), den(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv;
      const int64_t L = length_of(lengths, len64, len_s, b);  // in [1, Tmax]: check_lengths ran before
      for (int64_t g = 0; g < G; ++g) convert_row(q + b * q_sb + (hk * G + g) * q_sh, qf.data() + g * D, D);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      std::fill(den.begin(), den.end(), 0.f);
      const T* kbase = kc + b * ks[0] + hk * ks[1];
      const T* vbase = vc + b * vs[0] + hk * vs[1];
      for (int64_t t0 = 0; t0 < L; t0 += kBlock) {
        const int64_t tb = std::min(kBlock, L - t0);
        for (int64_t t = 0; t < tb; ++t) {  // scores = q . k * scale
          const float* k = row_f32(kbase + (t0 + t) * ks[2], row.data(), D);
          for (int64_t g = 0; g < G; ++g) scores[g * kBlock + t] = dot(qf.data() + g * D, k, D) * scale;
        }
        for (int64_t g = 0; g < G; ++g) {  // online softmax: rescale the running sums to the new max
          float* sc = scores.data() + g * kBlock;
          fVec vmax(-std::numeric_limits<float>::infinity());
          for (int64_t t = 0; t < tb; t += kF) {
            const int64_t m = std::min(kF, tb - t);
            vmax = at::vec::maximum(vmax, fVec::set(fVec(-std::numeric_limits<float>::infinity()), fVec::loadu(sc + t, m), m));
          }
          const float new_max = std::max(mx[g], hmax(vmax));
          const float corr = MathOps<float>::exp(mx[g] - new_max);  // exp(-inf) = 0 on the first block
          fVec vsum(0.f);
          const fVec vm(new_max);
          for (int64_t t = 0; t < tb; t += kF) {
            const int64_t m = std::min(kF, tb - t);
            fVec p = exp_u1(fVec::loadu(sc + t, m) - vm);
            p = fVec::set(fVec(0.f), p, m);
            p.store(sc + t, m);
            vsum = vsum + p;
          }
          den[g] = den[g] * corr + hsum(vsum);
          mx[g] = new_max;
          if (corr != 1.f) {
            const fVec vc_(corr);
            float* ag = acc.data() + g * D;
            for (int64_t j = 0; j < D; j += kF) {
              const int64_t m = std::min(kF, D - j);
              (fVec::loadu(ag + j, m) * vc_).store(ag + j, m);
            }
          }
        }
        for (int64_t t = 0; t < tb; ++t) {  // acc += p * v
          const float* v = row_f32(vbase + (t0 + t) * vs[2], row.data(), D);
          for (int64_t g = 0; g < G; ++g) {
            const fVec p(scores[g * kBlock + t]);
            float* ag = acc.data() + g * D;
            for (int64_t j = 0; j < D; j += kF) {
              const int64_t m = std::min(kF, D - j);
              at::vec::fmadd(p, fVec::loadu(v + j, m), fVec::loadu(ag + j, m)).store(ag + j, m);
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / den[g];
        float* ag = acc.data() + g * D;
        for (int64_t j = 0; j < D; ++j) ag[j] *= inv;
        convert_row(ag, out + (b * H + hk * G + g) * D, D);
      }
    }
  });
}

void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lengths,
         double scale, const at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1), Tmax = k_cache.size(2);
  check_lengths(lengths, Tmax);
  if (B == 0 || H == 0 || D == 0) return;
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor kc = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor vc = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  const int64_t ks[3] = {kc.stride(0), kc.stride(1), kc.stride(2)};
  const int64_t vs[3] = {vc.stride(0), vc.stride(1), vc.stride(2)};
  FASTLM_DISPATCH_FLOAT(q.scalar_type(), "decode_attention", [&] {
    using T = scalar_t;
    decode_kernel<T>(reinterpret_cast<const T*>(qc.const_data_ptr()), qc.stride(0), qc.stride(1),
                     reinterpret_cast<const T*>(kc.const_data_ptr()), ks,
                     reinterpret_cast<const T*>(vc.const_data_ptr()), vs, lengths.const_data_ptr(),
                     lengths.scalar_type() == at::kLong, lengths.stride(0), reinterpret_cast<T*>(out.data_ptr()), B,
                     H, Hkv, D, Tmax, static_cast<float>(scale));
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, double scale) {
  check_decode_args(q, k_cache, v_cache, lengths, scale);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  run(q, k_cache, v_cache, lengths, scale, out);
  return out;
}

}  // namespace fastlm::cpu
