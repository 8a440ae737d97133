// Decode attention on CPU: one query token per sequence over the first lengths[b] slots of a static
// [B, Hkv, Tmax, D] cache, GQA (the G = H / Hkv query heads of a kv head share each K/V row read),
// online softmax in fp32 over blocks of keys. Reads each valid K/V row once; never touches slots past
// the length. The work is split over (batch row, kv head) tasks, and where there are fewer of those than
// threads also over ranges of keys, whose partial softmaxes are merged at the end (key_splits): at batch 1,
// Arcee's single kv head (5 query heads, head_dim 128) ran on one of the two cores, 55-80 us a layer at
// 530 keys. The ranges are as even as multiples of 16 keys allow: in whole 128-key blocks, 545 keys split
// 384 + 161 and two threads ran 1.2-1.3x slower than one; split evenly, 0.6-0.7x of one thread's time
// (Arcee's shape, fp32 and bf16, 2-core Zen 3). Where head_dim is a whole number of SIMD registers
// (64 / 80 / 96 / 128 on AVX-512, 32-128 on AVX2) a block of keys runs register-tiled (attend_keys_tiled):
// 1.4-1.7x faster from cache at 513 keys (Arcee's shape 37 -> 22 us, StableLM's 12 heads of 64 55 -> 33 us,
// 2 threads, Zen 4); in the engine's decode step, where the cache comes from memory, Arcee's 9 calls went
// from ~660 to ~400 us a token. A 16-bit cache shared by several heads (Arcee: 5 a kv head) is widened in
// 32-key blocks that stay in L1 (kWideBlock), and the scratch is the thread's own, kept between calls
// (zero-filling fresh vectors, 128 KB a call, was most of the fixed cost): Arcee's shape at 545 keys in
// bf16, 34-36 -> 27-30 us; at 1 key, 4.4-5.4 -> 1.7 us (2 threads, Zen 4).
#include "../checks.h"
#include "../op_list.h"
#include "vec_util.h"
#include "widened_gemm.h"

#include <limits>
#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

constexpr int64_t kBlock = 128;  // keys per online-softmax block
// Keys per widened block of a 16-bit cache shared by several heads: K and V rows widened to fp32 are read
// once per head, so the block is sized to stay in L1 (32 x 128 x 4 B x 2 = 32 KB at head_dim 128) rather
// than L2 (a whole 128-key kBlock, 128 KB).
constexpr int64_t kWideBlock = 32;

// a . b over n elements, b in the cache's dtype (16-bit widened in registers).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    fVec a0, a1, b0, b1;
    IO<float>::load(a + j, m, a0, a1);
    IO<T>::load(b + j, m, b0, b1);
    acc0 = at::vec::fmadd(a0, b0, acc0);
    acc1 = at::vec::fmadd(a1, b1, acc1);  // zero-filled tails contribute 0
  }
  return hsum(acc0 + acc1);
}

// acc += p * v over n elements, v in the cache's dtype.
template <typename T>
inline void axpy(float p, const T* v, float* acc, int64_t n) {
  const fVec vp(p);
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    fVec v0, v1, a0, a1;
    IO<T>::load(v + j, m, v0, v1);
    IO<float>::load(acc + j, m, a0, a1);
    IO<float>::store(acc + j, m, at::vec::fmadd(vp, v0, a0), at::vec::fmadd(vp, v1, a1));
  }
}

// A K/V row for several query heads, as fp32: the row itself for fp32 storage, else converted once into
// buf (one head reads it in place, widened in registers by dot / axpy).
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
// Returns the longest (0 for B = 0).
int64_t check_lengths(const at::Tensor& lengths, int64_t Tmax) {
  const bool len64 = lengths.scalar_type() == at::kLong;
  int64_t longest = 0;
  for (int64_t b = 0; b < lengths.size(0); ++b) {
    const int64_t L = length_of(lengths.const_data_ptr(), len64, lengths.stride(0), b);
    TORCH_CHECK_VALUE(L >= 1 && L <= Tmax, "fastlm: lengths[", b, "] = ", L,
                      " is outside [1, Tmax] = [1, ", Tmax, "]: each sequence attends to 1 to Tmax cache slots");
    longest = std::max(longest, L);
  }
  return longest;
}

// One block's scores sc [tb] -> exp(sc - new max) in place, the running max mx and denominator den updated
// to it. Returns the factor exp(old max - new max) that rescales the running sums (0 on the first block).
inline float softmax_block(float* sc, int64_t tb, float& mx, float& den) {
  fVec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < tb; t += kF) {
    const int64_t m = std::min(kF, tb - t);
    vmax = at::vec::maximum(vmax, fVec::set(fVec(-std::numeric_limits<float>::infinity()), fVec::loadu(sc + t, m), m));
  }
  const float new_max = std::max(mx, hmax(vmax));
  const float corr = MathOps<float>::exp(mx - new_max);  // exp(-inf) = 0 on the first block
  fVec vsum(0.f);
  const fVec vm(new_max);
  for (int64_t t = 0; t < tb; t += kF) {
    const int64_t m = std::min(kF, tb - t);
    fVec p = exp_u1(fVec::loadu(sc + t, m) - vm);
    p = fVec::set(fVec(0.f), p, m);
    p.store(sc + t, m);
    vsum = vsum + p;
  }
  den = den * corr + hsum(vsum);
  mx = new_max;
  return corr;
}

// Keys [t_begin, t_end) of one (batch row, kv head) for its G query heads qf [G, D] (fp32): the online
// softmax's running max mx [G], denominator den [G] and unnormalised sum acc [G, D] = sum_t p_t * v_t,
// updated in place (start from mx = -inf, den = 0, acc = 0). row [D] and scores [G, kBlock] are scratch.
template <typename T>
void attend_keys(const float* qf, const T* kbase, int64_t k_stride, const T* vbase, int64_t v_stride,
                 int64_t t_begin, int64_t t_end, int64_t G, int64_t D, float scale, float* row, float* scores,
                 float* acc, float* mx, float* den) {
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBlock) {
    const int64_t tb = std::min(kBlock, t_end - t0);
    for (int64_t t = 0; t < tb; ++t) {  // scores = q . k * scale
      const T* k_row = kbase + (t0 + t) * k_stride;
      if (G == 1) {
        scores[t] = dot(qf, k_row, D) * scale;
        continue;
      }
      const float* k = row_f32(k_row, row, D);
      for (int64_t g = 0; g < G; ++g) scores[g * kBlock + t] = dot(qf + g * D, k, D) * scale;
    }
    for (int64_t g = 0; g < G; ++g) {  // online softmax: rescale the running sums to the new max
      float* sc = scores + g * kBlock;
      const float corr = softmax_block(sc, tb, mx[g], den[g]);
      if (corr != 1.f) {
        const fVec vc_(corr);
        float* ag = acc + g * D;
        for (int64_t j = 0; j < D; j += kF) {
          const int64_t m = std::min(kF, D - j);
          (fVec::loadu(ag + j, m) * vc_).store(ag + j, m);
        }
      }
    }
    for (int64_t t = 0; t < tb; ++t) {  // acc += p * v
      const T* v_row = vbase + (t0 + t) * v_stride;
      if (G == 1) {
        axpy(scores[t], v_row, acc, D);
        continue;
      }
      const float* v = row_f32(v_row, row, D);
      for (int64_t g = 0; g < G; ++g) axpy(scores[g * kBlock + t], v, acc + g * D, D);
    }
  }
}

// The register-tiled form of attend_keys for head_dim D = DV * kF (DV whole SIMD registers a row): key rows
// of KR and value rows of VR (fp32, or the cache's 16-bit type widened in registers) at row strides k_stride /
// v_stride. Per block:
//  * scores, one head at a time: kS keys' dot products with q_g as kS unreduced registers (q_g's DV
//    registers stay loaded across the keys), reduced together by one transpose-and-add (hsum_lanes): a
//    key row costs DV loads a head, against 2 DV loads and a dependent horizontal sum per key and head
//    of dot(). With kBf16Scores (bf16 keys, kScoresBf16) the bf16 q (q16, heads q16_stride apart) and the
//    keys as stored multiply by vdpbf16ps instead: products of two bf16 are exact in fp32, as the widened
//    ones are, and a key row costs DV / 2 instructions a head with no widening;
//  * acc += p v, one head at a time with its DV accumulators in registers over the whole block: DV loads
//    a key and head and no stores, against axpy's DV loads of v, DV of acc and DV stores to acc (the
//    loop was bound by those loads and stores: ~44 cycles a key and head at D = 128 on Zen 4).
// The same sums as attend_keys in another order (fp32 throughout).
template <typename R, int DV>
__attribute__((always_inline)) inline void load_row(const R* p, fVec (&r)[DV]) {
  if constexpr (std::is_same_v<R, float>) {
    for (int j = 0; j < DV; ++j) r[j] = fVec::loadu(p + j * kF);
  } else {
    for (int j = 0; j + 1 < DV; j += 2) IO<R>::load(p + j * kF, r[j], r[j + 1]);
    if constexpr (DV % 2 == 1) {
      fVec unused;
      IO<R>::load(p + (DV - 1) * kF, kF, r[DV - 1], unused);
    }
  }
}

// Whether attend_keys_tiled can take the scores of KR keys by vdpbf16ps (kBf16Scores): bf16 keys, D a whole
// number of 32-element bf16 registers, built with AVX512-BF16.
#if defined(FASTLM_AVX512_BF16)
template <typename KR, int DV>
constexpr bool kScoresBf16 = std::is_same_v<KR, at::BFloat16> && DV % 2 == 0;
#else
template <typename KR, int DV>
constexpr bool kScoresBf16 = false;
#endif

template <typename KR, typename VR, int DV, bool kBf16Scores>
void attend_keys_tiled(const float* qf, const at::BFloat16* q16, int64_t q16_stride, const KR* kbase, int64_t k_stride,
                       const VR* vbase, int64_t v_stride, int64_t t_begin, int64_t t_end, int64_t G, float scale,
                       float* scores, float* acc, float* mx, float* den) {
  constexpr int64_t D = DV * kF;
  constexpr int kS = static_cast<int>(kF);  // keys a transpose-and-add
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBlock) {
    const int64_t tb = std::min(kBlock, t_end - t0);
    const KR* kblk = kbase + t0 * k_stride;
    const VR* vblk = vbase + t0 * v_stride;
    for (int64_t g = 0; g < G; ++g) {  // scores = q . k * scale
      float* sc = scores + g * kBlock;
      // kS keys at a time: key_dot(row) -> the row's products with q_g as one unreduced register
      auto scores_by = [&](auto&& key_dot) __attribute__((always_inline)) {
        for (int64_t t = 0; t < tb; t += kS) {
          const int n = static_cast<int>(std::min<int64_t>(kS, tb - t));
          fVec part[kS];
          for (int s = 0; s < kS; ++s) part[s] = s < n ? key_dot(kblk + (t + s) * k_stride) : fVec(0.f);
          (hsum_lanes<kS>(part) * fVec(scale)).store(sc + t, n);
        }
      };
#if defined(FASTLM_AVX512_BF16)
      if constexpr (kBf16Scores) {
        constexpr int kW = DV / 2;  // bf16 registers a row
        __m512bh q[kW];
        for (int j = 0; j < kW; ++j) q[j] = (__m512bh)_mm512_loadu_si512(q16 + g * q16_stride + j * 32);
        scores_by([&](const at::BFloat16* kr) __attribute__((always_inline)) {
          __m512 a0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[0], (__m512bh)_mm512_loadu_si512(kr));
          __m512 a1 = _mm512_setzero_ps();
          for (int j = 1; j < kW; ++j) {
            const __m512bh k = (__m512bh)_mm512_loadu_si512(kr + j * 32);
            if (j % 2) a1 = _mm512_dpbf16_ps(a1, q[j], k);
            else a0 = _mm512_dpbf16_ps(a0, q[j], k);
          }
          return fVec(_mm512_add_ps(a0, a1));
        });
        continue;
      }
#endif
      fVec q[DV];
      for (int j = 0; j < DV; ++j) q[j] = fVec::loadu(qf + g * D + j * kF);
      scores_by([&](const KR* kr) __attribute__((always_inline)) {
        fVec r[DV];
        load_row<KR, DV>(kr, r);
        fVec a0 = q[0] * r[0], a1(0.f);
        for (int j = 1; j < DV; ++j) {
          if (j % 2) a1 = at::vec::fmadd(q[j], r[j], a1);
          else a0 = at::vec::fmadd(q[j], r[j], a0);
        }
        return a0 + a1;
      });
    }
    for (int64_t g = 0; g < G; ++g) {  // online softmax: rescale the running sums to the new max
      float* sc = scores + g * kBlock;
      const float corr = softmax_block(sc, tb, mx[g], den[g]);
      // acc_g = acc_g * corr + sum_t p_t v_t, the accumulators in registers over the block
      fVec a[DV];
      const fVec vc(corr);
      for (int j = 0; j < DV; ++j) a[j] = fVec::loadu(acc + g * D + j * kF) * vc;
      for (int64_t t = 0; t < tb; ++t) {
        fVec r[DV];
        load_row<VR, DV>(vblk + t * v_stride, r);
        const fVec p(sc[t]);
        for (int j = 0; j < DV; ++j) a[j] = at::vec::fmadd(p, r[j], a[j]);
      }
      for (int j = 0; j < DV; ++j) a[j].store(acc + g * D + j * kF);
    }
  }
}

// attend_keys through attend_keys_tiled where D is a supported whole number of registers (DV below); 16-bit
// caches with several heads a kv head are widened to fp32 once per kWideBlock keys (wide, [2, kWideBlock, D]
// scratch) rather than once per head, except bf16 keys on CPUs with AVX512-BF16 (kScoresBf16), which
// attend_keys_tiled multiplies as they are: only the values are widened. Arcee's shape (5 heads a kv head
// of 128, 545 keys, bf16; interleaved in one process, 2-core Zen 4) took 0.78x the time at 2 threads, from
// cache and from memory, 0.68-0.70x at one. One head a kv head (G = 1, StableLM and Helium) keeps the
// widening in registers: the bf16 scores ran 0.8x from cache but 1.07-1.25x from memory there.
// q16: the q rows as stored (heads q16_stride apart), read only where T is bf16.
template <typename T, int DV>
void attend_tiled_dv(const float* qf, const T* q16, int64_t q16_stride, const T* kbase, int64_t k_stride,
                     const T* vbase, int64_t v_stride, int64_t t_begin, int64_t t_end, int64_t G, float scale,
                     float* wide, float* scores, float* acc, float* mx, float* den) {
  constexpr int64_t D = DV * kF;
  const at::BFloat16* qb = reinterpret_cast<const at::BFloat16*>(q16);  // read only where T is bf16
  if (std::is_same_v<T, float> || G == 1) {  // rows read in place
    attend_keys_tiled<T, T, DV, false>(qf, qb, q16_stride, kbase, k_stride, vbase, v_stride, t_begin, t_end, G,
                                       scale, scores, acc, mx, den);
  } else {
    float* kw = wide;
    float* vw = wide + kWideBlock * D;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kWideBlock) {
      const int64_t tb = std::min(kWideBlock, t_end - t0);
      for (int64_t t = 0; t < tb; ++t) convert_row(vbase + (t0 + t) * v_stride, vw + t * D, D);
      if constexpr (kScoresBf16<T, DV>) {
        attend_keys_tiled<T, float, DV, true>(qf, qb, q16_stride, kbase + t0 * k_stride, k_stride, vw, D, 0, tb, G,
                                              scale, scores, acc, mx, den);
      } else {
        for (int64_t t = 0; t < tb; ++t) convert_row(kbase + (t0 + t) * k_stride, kw + t * D, D);
        attend_keys_tiled<float, float, DV, false>(qf, qb, q16_stride, kw, D, vw, D, 0, tb, G, scale, scores, acc,
                                                   mx, den);
      }
    }
  }
}

// attend_tiled_dv for the supported D; returns false (nothing done) for other D.
template <typename T>
bool attend_tiled(const float* qf, const T* q16, int64_t q16_stride, const T* kbase, int64_t k_stride,
                  const T* vbase, int64_t v_stride, int64_t t_begin, int64_t t_end, int64_t G, int64_t D, float scale,
                  float* wide, float* scores, float* acc, float* mx, float* den) {
  if (D % kF != 0) return false;
#define FASTLM_TILED_DV(dv)                                                                                   \
  case dv:                                                                                                    \
    attend_tiled_dv<T, dv>(qf, q16, q16_stride, kbase, k_stride, vbase, v_stride, t_begin, t_end, G, scale,     \
                           wide, scores, acc, mx, den);                                                       \
    return true;
  switch (D / kF) {  // head_dim 64 / 80 / 96 / 128 on AVX-512; 32 to 128 on AVX2
    FASTLM_TILED_DV(2)
    FASTLM_TILED_DV(4)
    FASTLM_TILED_DV(5)
    FASTLM_TILED_DV(6)
    FASTLM_TILED_DV(8)
    FASTLM_TILED_DV(10)
    FASTLM_TILED_DV(12)
    FASTLM_TILED_DV(16)
    default:
      return false;
  }
#undef FASTLM_TILED_DV
}

// out [D] = acc / den in out's dtype (acc is scratch).
template <typename T>
inline void normalise_into(float* acc, float den, T* out, int64_t D) {
  const float inv = 1.f / den;
  for (int64_t j = 0; j < D; ++j) acc[j] *= inv;
  convert_row(acc, out, D);
}

// Key ranges per (batch row, kv head): one, unless there are fewer of those than threads (GQA with one
// or two kv heads at batch 1: Arcee's kv head would run on one core), then enough ranges of at least
// kMinSplitKeys keys to give every thread work, merged after (split-K, as flash-decoding does on GPUs).
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kSplitKeyMultiple = 16;  // a whole number of attend_keys_tiled's key steps (kF: 8 or 16)

int64_t key_splits(int64_t tasks, int64_t max_len) {
  const int64_t threads = at::get_num_threads();
  if (tasks == 0 || tasks >= threads) return 1;
  return std::max<int64_t>(1, std::min((threads + tasks - 1) / tasks, max_len / kMinSplitKeys));
}

template <typename T>
void decode_kernel(const T* q, int64_t q_sb, int64_t q_sh, const T* kc, const int64_t* ks, const T* vc,
                   const int64_t* vs, const void* lengths, bool len64, int64_t len_s, int64_t max_len, T* out,
                   int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale) {
  const int64_t G = H / Hkv, tasks = B * Hkv;
  const int64_t splits = key_splits(tasks, max_len);
  // Each (task, range) unit's partial softmax: acc [G, D], then mx [G], then den [G]. Unsplit, a unit is
  // a whole task and is normalised straight into out.
  const int64_t unit_floats = G * (D + 2);
  std::vector<float> partials(splits > 1 ? tasks * splits * unit_floats : 0);
  at::parallel_for(0, tasks * splits, 1, [&](int64_t begin, int64_t end) {
    // This thread's scratch (kept between calls, never zero-filled): q rows as fp32 [G, D], one widened
    // row [D], scores [G, kBlock], an unsplit unit's sums [unit_floats] and attend_tiled's widened
    // K/V block [2, kWideBlock, D].
    const int64_t wide_floats = std::is_same_v<T, float> || G == 1 ? 0 : 2 * kWideBlock * D;
    float* qf = thread_scratch(kAttentionSlot, G * D + D + G * kBlock + unit_floats + wide_floats);
    float* row = qf + G * D;
    float* scores = row + D;
    float* own = scores + G * kBlock;
    float* wide = own + unit_floats;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t task = unit / splits, part = unit % splits;
      const int64_t b = task / Hkv, hk = task % Hkv;
      const int64_t L = length_of(lengths, len64, len_s, b);  // in [1, Tmax]: check_lengths ran before
      // ranges as even as kSplitKeyMultiple allows (see the header: whole kBlocks split 545 keys 384 + 161)
      const int64_t chunk = round_up((L + splits - 1) / splits, kSplitKeyMultiple);
      const int64_t t_begin = std::min(L, part * chunk), t_end = std::min(L, t_begin + chunk);
      float* acc = splits > 1 ? partials.data() + unit * unit_floats : own;
      float* mx = acc + G * D;
      float* den = mx + G;
      std::fill(acc, acc + G * D, 0.f);
      std::fill(mx, mx + G, -std::numeric_limits<float>::infinity());
      std::fill(den, den + G, 0.f);
      if (t_begin == t_end) continue;  // a short sequence's empty range: den = 0, merged as nothing
      for (int64_t g = 0; g < G; ++g) convert_row(q + b * q_sb + (hk * G + g) * q_sh, qf + g * D, D);
      const T* kb = kc + b * ks[0] + hk * ks[1];
      const T* vb = vc + b * vs[0] + hk * vs[1];
      const T* q16 = q + b * q_sb + hk * G * q_sh;  // this kv head's G query heads, as stored
      if (!attend_tiled(qf, q16, q_sh, kb, ks[2], vb, vs[2], t_begin, t_end, G, D, scale, wide, scores, acc, mx,
                        den)) {
        attend_keys(qf, kb, ks[2], vb, vs[2], t_begin, t_end, G, D, scale, row, scores, acc, mx, den);
      }
      if (splits > 1) continue;
      for (int64_t g = 0; g < G; ++g) normalise_into(acc + g * D, den[g], out + (b * H + hk * G + g) * D, D);
    }
  });
  if (splits == 1) return;
  // Merge each task's ranges: sums rescaled from their own max to the overall one, then normalised.
  std::vector<float> acc(D);
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / Hkv, hk = task % Hkv;
    const float* first = partials.data() + task * splits * unit_floats;
    for (int64_t g = 0; g < G; ++g) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t part = 0; part < splits; ++part) m = std::max(m, first[part * unit_floats + G * D + g]);
      float den = 0.f;
      float* ag = acc.data();
      std::fill(ag, ag + D, 0.f);
      for (int64_t part = 0; part < splits; ++part) {
        const float* unit = first + part * unit_floats;
        const float d = unit[G * D + G + g];
        if (d == 0.f) continue;  // an empty range
        const float w = MathOps<float>::exp(unit[G * D + g] - m);
        den += d * w;
        const float* ap = unit + g * D;
        for (int64_t j = 0; j < D; ++j) ag[j] += ap[j] * w;
      }
      normalise_into(ag, den, out + (b * H + hk * G + g) * D, D);
    }
  }
}

void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& lengths,
         double scale, const at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1), Tmax = k_cache.size(2);
  const int64_t max_len = check_lengths(lengths, Tmax);
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
                     lengths.scalar_type() == at::kLong, lengths.stride(0), max_len,
                     reinterpret_cast<T*>(out.data_ptr()), B, H, Hkv, D, static_cast<float>(scale));
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
