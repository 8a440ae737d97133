// SIMD helpers for the CPU kernels: fp32 compute on float / bf16 / fp16 storage with at::vec.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "fastlm/math.h"
#include "../rows.h"

namespace fastlm {

using fVec = at::vec::Vectorized<float>;

namespace cpu {

// exp(x) in fp32 to within 1.01 ulp over the normal range (checked against double exp on every float
// in [-87.3, 88.7]: 22 values above 1 ulp, none above 1.02), in 15 vector instructions. ATen's
// Sleef_expf16_u10 (<= 1 ulp) bounded SwiGLU at fp32: 0.45 ns per element on one thread, against 0.29
// with this one. n = rint(x / ln2); r = x - n ln2 with ln2 split in two (Cody-Waite: n * ln2_hi is
// exact); e^r = 1 + r + r^2 P(r) with Cephes' degree-5 expf polynomial on |r| <= ln2 / 2; 2^n applied
// by vscalefps, which rounds subnormal results once and saturates to 0 / inf. The clamp keeps n finite
// for +-inf, and passes NaN through (maxps / minps return their second operand when either is NaN).
// AVX2 has no vscalefps: 2^n is applied as two exact power-of-two factors 2^(n>>1) and 2^(n - (n>>1)),
// each a normal float for the clamped n in [-150, 128], so a subnormal result is rounded once (by the
// second multiply) and n = 128 overflows to inf, as with vscalefps. There, ATen's Sleef_expf8_u10 is an
// out-of-line call per 8 lanes: bf16 SwiGLU at T = 512 ran ~7x slower than the AVX-512 build with it.
// exp_u1's constants, one set for its AVX-512 and AVX2 bodies.
struct ExpU1 {
  static constexpr float kMax = 88.8f, kMin = -104.0f;  // the clamp: n in [-150, 128]
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f;     // 10 significant bits: n * kLn2Hi is exact
  static constexpr float kLn2Lo = -2.12194440e-4f;  // ln2 - kLn2Hi
  static constexpr int kDegree = 5;                 // P's coefficients, highest degree first
  static constexpr float kPoly[kDegree + 1] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
};

inline fVec exp_u1(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(ExpU1::kMax), _mm512_max_ps(_mm512_set1_ps(ExpU1::kMin), v));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(ExpU1::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ExpU1::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ExpU1::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(ExpU1::kPoly[0]);
  for (int i = 1; i <= ExpU1::kDegree; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(ExpU1::kPoly[i]));
  const __m512 expm1_r = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  return fVec(_mm512_scalef_ps(_mm512_add_ps(expm1_r, _mm512_set1_ps(1.0f)), n));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(ExpU1::kMax), _mm256_max_ps(_mm256_set1_ps(ExpU1::kMin), v));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(ExpU1::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ExpU1::kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ExpU1::kLn2Lo), r);
  __m256 p = _mm256_set1_ps(ExpU1::kPoly[0]);
  for (int i = 1; i <= ExpU1::kDegree; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(ExpU1::kPoly[i]));
  const __m256 e_r = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);  // NaN -> INT_MIN: garbage factors, but e_r is NaN already
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return fVec(_mm256_mul_ps(_mm256_mul_ps(e_r, s1), s2));
#else
  return v.exp();
#endif
}

}  // namespace cpu

// exp / max for the SIMD value type, so the shared templates in math.h run on fVec.
template <>
struct MathOps<fVec> {
  static inline fVec exp(const fVec& x) { return cpu::exp_u1(x); }
  static inline fVec max(const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }
};

namespace cpu {

constexpr int64_t kF = fVec::size();  // floats per SIMD register (8 with AVX2)
constexpr int64_t kChunk = 2 * kF;    // elements per load/store chunk (one 16-bit register)

// Two fp32 registers -> one 16-bit register, round to nearest even. ATen emulates the bf16 rounding
// in integer ops (~7 instructions a register, the bound of every bf16 epilogue here: relu2 ran at
// ~50 GB/s against ~120 for fp32); with AVX512-BF16 it is one vcvtne2ps2bf16 for both registers. The
// instruction treats fp32 denormal inputs (|x| < 2^-126) as zero, where ATen keeps a bf16 denormal:
// the two differ by less than 2^-126 absolute, and only there.
template <typename T>
inline at::vec::Vectorized<T> pack_from_float(const fVec& a, const fVec& b) {
#if defined(FASTLM_AVX512_BF16) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return at::vec::Vectorized<T>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
  }
#endif
  return at::vec::convert_from_float<T>(a, b);
}

// Load / store kChunk elements of T as two fp32 registers; the n < kChunk variants handle tails
// (lanes past n are zero on load and untouched on store).
template <typename T>
struct IO {
  using Vec = at::vec::Vectorized<T>;
  static_assert(Vec::size() == kChunk, "16-bit vector must hold two float vectors");
  static inline void load(const T* p, fVec& a, fVec& b) {
    auto ab = at::vec::convert_to_float<T>(Vec::loadu(p));
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
  static inline void load(const T* p, int64_t n, fVec& a, fVec& b) {
    auto ab = at::vec::convert_to_float<T>(n == kChunk ? Vec::loadu(p) : Vec::loadu(p, n));
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
  static inline void store(T* p, int64_t n, const fVec& a, const fVec& b) {
    auto v = pack_from_float<T>(a, b);
    if (n == kChunk) v.store(p); else v.store(p, n);
  }
  // Store, and replace (a, b) with the values actually stored (rounded to T).
  static inline void store_round(T* p, int64_t n, fVec& a, fVec& b) {
    auto v = pack_from_float<T>(a, b);
    if (n == kChunk) v.store(p); else v.store(p, n);
    auto ab = at::vec::convert_to_float<T>(v);
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
  // Round to T and back, without storing.
  static inline void round(fVec& a, fVec& b) {
    auto ab = at::vec::convert_to_float<T>(pack_from_float<T>(a, b));
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
  static inline float to_float(T v) { return static_cast<float>(v); }
};

template <>
struct IO<float> {
  static inline void load(const float* p, fVec& a, fVec& b) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kF);
  }
  static inline void load(const float* p, int64_t n, fVec& a, fVec& b) {
    if (n == kChunk) {
      a = fVec::loadu(p);
      b = fVec::loadu(p + kF);
    } else if (n > kF) {
      a = fVec::loadu(p);
      b = fVec::loadu(p + kF, n - kF);
    } else {
      a = fVec::loadu(p, n);
      b = fVec(0.f);
    }
  }
  static inline void store(float* p, int64_t n, const fVec& a, const fVec& b) {
    if (n == kChunk) {
      a.store(p);
      b.store(p + kF);
    } else if (n > kF) {
      a.store(p);
      b.store(p + kF, n - kF);
    } else {
      a.store(p, n);
    }
  }
  static inline void store_round(float* p, int64_t n, fVec& a, fVec& b) { store(p, n, a, b); }
  static inline void round(fVec&, fVec&) {}
  static inline float to_float(float v) { return v; }
};

// Outputs of at least this many bytes (all of a call's outputs together) are written with
// non-temporal stores (store_chunk<true>, stream_copy). Ordinary stores first read every output line
// from memory (read-for-ownership), a third of an out-of-place kernel's DRAM traffic, and outputs
// this large do not stay in the cache for the op that reads them next anyway. Smaller outputs keep
// ordinary stores so that the next op finds them in L3: streamed, outputs of a few MB ran faster in
// isolation, but every later read of them would go to DRAM. Half of a 32 MiB L3 (inside VMs the CPU
// reports the whole socket's L3, so this is not read at run time).
constexpr int64_t kStreamOutBytes = 16ll << 20;

// IO<T>::store, except that with kStream a whole chunk at a 64-byte aligned address goes out with
// non-temporal stores (AVX-512 builds; partial and unaligned chunks use ordinary stores). A kernel
// that streams calls stream_fence() before its task ends, so other threads see the data.
template <bool kStream>
inline bool streams_chunk(const void* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  return kStream && n == kChunk && reinterpret_cast<uintptr_t>(p) % 64 == 0;
#else
  return false;
#endif
}
template <bool kStream, typename T>
inline void store_packed(T* p, int64_t n, const at::vec::Vectorized<T>& v) {  // 16-bit T
#if defined(CPU_CAPABILITY_AVX512)
  if (streams_chunk<kStream>(p, n)) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), static_cast<__m512i>(v));
    return;
  }
#endif
  if (n == kChunk) v.store(p); else v.store(p, n);
}
template <bool kStream, typename T>
inline void store_chunk(T* p, int64_t n, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (streams_chunk<kStream>(p, n)) {
      _mm512_stream_ps(p, a);
      _mm512_stream_ps(p + kF, b);
      return;
    }
#endif
    IO<float>::store(p, n, a, b);
  } else {
    store_packed<kStream>(p, n, pack_from_float<T>(a, b));
  }
}
// store_chunk, replacing (a, b) with the values stored (rounded to T), as IO<T>::store_round.
template <bool kStream, typename T>
inline void store_round_chunk(T* p, int64_t n, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    store_chunk<kStream>(p, n, a, b);
  } else {
    const auto v = pack_from_float<T>(a, b);
    store_packed<kStream>(p, n, v);
    auto ab = at::vec::convert_to_float<T>(v);
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
}
// f(std::true_type{}) when stream, else f(std::false_type{}): the kStream template argument of the
// store_chunk calls inside f, picked at run time once per call.
template <typename F>
inline void with_stream(bool stream, const F& f) {
  if (stream) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Zero the lanes at and past n (n < kChunk) so tails do not pollute reductions.
inline void mask_tail(int64_t n, fVec& a, fVec& b) {
  if (n == kChunk) return;
  if (n > kF) {
    b = fVec::set(fVec(0.f), b, n - kF);
  } else {
    a = fVec::set(fVec(0.f), a, n);
    b = fVec(0.f);
  }
}

inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, v);
}
inline float hmax(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return at::vec::maximum(x, y); }, v);
}

// Lane t = hsum(v[t]) for the kRows rows v[0..kRows) (kRows <= kF). AVX-512: a transpose-and-add
// tree, ~3 instructions per row instead of a dependent 8-instruction chain per row (each qk-norm
// head's statistics waited on two such chains plus a divide and a sqrt). Same additions as hsum's
// tree, in a different order: results may differ from hsum in the last bit. Inlined with kRows fixed,
// the tree has no branches (~10% of the Persimmon QKV epilogue's time when it was an out-of-line call
// on a run-time row count).
template <int kRows>
__attribute__((always_inline)) inline fVec hsum_lanes(const fVec* v) {
  static_assert(kRows >= 1 && kRows <= kF, "one lane per row");
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kRows % 4 == 0, "rows in groups of four");
  __m512 quads[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int g = 0; g < kRows / 4; ++g) {  // quads[g]: each 128-bit lane holds a partial of rows 4g .. 4g+3
    __m512 pair[2];                      // rows (4g, 4g+1) and (4g+2, 4g+3) interleaved [a, b, a, b]
    for (int p = 0; p < 2; ++p) {
      const __m512 a = v[4 * g + 2 * p], b = v[4 * g + 2 * p + 1];
      pair[p] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(pair[0]), _mm512_castps_pd(pair[1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(pair[0]), _mm512_castps_pd(pair[1]));
    quads[g] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  auto fold = [](__m512 x, __m512 y) {  // [x.L0+x.L1, x.L2+x.L3, y.L0+y.L1, y.L2+y.L3]
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return fVec(fold(fold(quads[0], quads[1]), fold(quads[2], quads[3])));
#else
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kRows == 8) {  // two levels of pairwise adds leave [rows 0-3 | rows 4-7] per 128-bit half
    const __m256 r01 = _mm256_hadd_ps(v[0], v[1]), r23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 r45 = _mm256_hadd_ps(v[4], v[5]), r67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 lo = _mm256_hadd_ps(r01, r23), hi = _mm256_hadd_ps(r45, r67);  // [r0..r3 low, r0..r3 high]
    return fVec(_mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31)));
  }
#endif
  alignas(64) float out[kF] = {};
  for (int t = 0; t < kRows; ++t) out[t] = hsum(v[t]);
  return fVec::loadu(out);
#endif
}

// Copy `bytes` from src to dst, the whole 64-byte lines of dst with non-temporal stores (no
// read-for-ownership, and the lines do not stay in the cache), the partial lines at either end with
// ordinary stores (see kStreamOutBytes). Call stream_fence before other threads read dst.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX512)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  int64_t o = head;
  for (; o + 64 <= bytes; o += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + o), _mm512_loadu_si512(s + o));
  }
  std::memcpy(d + o, s + o, bytes - o);
#else
  std::memcpy(dst, src, bytes);
#endif
}
// Convert n elements from S to D storage through fp32 registers: with D = float, load a row as fp32;
// with S = float, store an fp32 row as D.
template <typename S, typename D>
inline void convert_row(const S* src, D* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    fVec a, b;
    IO<S>::load(src + j, m, a, b);
    IO<D>::store(dst + j, m, a, b);
  }
}

// x's dtype in the decode kernels' scratch (linear, quant_linear): 16-bit x stays 16-bit on AVX-512 builds
// and is widened in registers, as the weights are, instead of an fp32 copy read beside them (same values,
// same sums). A stand-alone probe of the row loop (2-core Zen 4, 256 MiB of weights) streamed 16-bit
// weights 1.02-1.96x faster beside 16-bit x than beside fp32 x, and int8 weights 1.6-2.0x faster at
// K = 4608 (0.86-1.16x at K = 640); Arcee's 37 decode weights in turn: fp16 1.05-1.5x, int8 medians 15.5 ->
// 21.7 GB/s. On AVX2 builds the second conversion a chunk cost more than it saved (fp16 0.65-1.0x), so x
// is widened to fp32 once there. (AVX512-BF16 builds are AVX-512 builds: the bf16 tile reads bf16 x.)
#if defined(CPU_CAPABILITY_AVX512)
template <typename T>
using DecodeX = T;
#else
template <typename T>
using DecodeX = float;
#endif

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Software prefetch for a 16-bit weight stream that a decode GEMV reads in memory order (csrc/cpu/linear.cpp):
// each loop step asks for the lines kStreamPrefetchBytes past what it reads now. The hardware prefetchers
// follow the stream anyway; this gets the next lines' misses issued a few steps earlier. Measured on the
// E2E models' decode projections (2 threads, 2-core Zen 4, the distances interleaved in one process): bf16
// on the AVX512-BF16 kernel 0.90-0.96x the time of none at 128-384 bytes ahead (Arcee; StableLM and
// Helium 0.95-0.97x), no gain at 1-2 KB; T0 / T1 / NTA hints alike; fp16 0.97-0.98x, and on the AVX2
// build bf16 0.95x and fp16 0.94x. fp32 and the int8 / int4 kernels gained nothing (0.98-1.03x), so they
// do not prefetch. A prefetch past the end of the weights is harmless (it never faults).
constexpr int64_t kStreamPrefetchBytes = 256;
template <int64_t kStepBytes>
inline void prefetch_stream(const void* read_pos) {
  const char* ahead = static_cast<const char*>(read_pos) + kStreamPrefetchBytes;
  for (int64_t b = 0; b < kStepBytes; b += 64) __builtin_prefetch(ahead + b, 0, 3);
}

// A grain (rows per task) that gives each task at least ~`work` elements.
inline int64_t grain_for(int64_t elems_per_row, int64_t work = 32768) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, elems_per_row));
}

// A grain for `rows` rows of `elems_per_row` that splits them into rows * elems_per_row / work tasks
// (rounded down, at least one): every task gets at least `work` elements. grain_for rounds the other
// way (a task gets up to twice `work`), which keeps 8 rows of 4096 on one thread at work = 32768.
inline int64_t grain_for_rows(int64_t rows, int64_t elems_per_row, int64_t work) {
  const int64_t tasks = std::max<int64_t>(1, rows * elems_per_row / work);
  return (rows + tasks - 1) / tasks;
}

}  // namespace cpu
}  // namespace fastlm

#define FASTLM_DISPATCH_FLOAT(TYPE, NAME, ...)                                      \
  [&] {                                                                              \
    switch (TYPE) {                                                                  \
      case at::kFloat: {                                                             \
        using scalar_t = float;                                                      \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case at::kBFloat16: {                                                          \
        using scalar_t = at::BFloat16;                                               \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case at::kHalf: {                                                              \
        using scalar_t = at::Half;                                                   \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      default:                                                                       \
        TORCH_CHECK(false, NAME, ": expected float32, bfloat16 or float16, got ", TYPE); \
    }                                                                                \
  }()
