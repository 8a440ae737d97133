// Weight-only quantized linear on CPU: y = x @ dequantize(qweight, scales)^T (+ bias) (+ residual), with the
// formats of fastlm/ops/quantized.py (int8 [N, K] or int4 packed two a byte [N, K / 2], fp32 scales
// [N, K / G], symmetric) and its computation order: fp32 weights q * scale, fp32 accumulation, one
// rounding to x's dtype. No activation is quantized, so the result matches the dequantize-then-reference
// composition to fp32 rounding (the sums run in another order).
//
// Decode (M <= kMaxGemvRows rows of x): the cost is reading the quantized weight once, 1 byte a weight for
// int8 and 0.5 for int4 (+ 4 / G for the scales), against 2 for bf16 and 4 for fp32: these are the
// minimum bytes, and the kernel moves exactly them plus x (L1/L2-resident). As in csrc/cpu/linear.cpp, x
// is copied once to a scratch [M, K] (fp32; 16-bit x as is on AVX-512, DecodeX; rows zero-padded to
// a multiple of 32), each thread takes a contiguous range of W's rows in blocks of kBlockRows and reads
// each row once, in memory order, for up to kMaxXRows rows of x at a time (more rows re-read the block
// from L1/L2, never from memory). Each block of 32 weights is widened in registers to fp32 (Widener):
//  * int8: sign extension and an int -> float conversion;
//  * int4: its 16 bytes zero-extended to 16 int32 lanes, whose low nibbles are weights 0..15 of the block
//    and whose high nibbles are weights 16..31 (the packing puts them there so that each half lines up
//    with 16 consecutive elements of x). AVX-512: one vpermps a register on a 16-entry table of the
//    group's (n - 8) * scale (the index uses only the low 4 bits, so the low nibble needs no mask and
//    the scaling is free). AVX2: OR-ing a nibble n into the bits of 2^23 gives the float 2^23 + n, and
//    subtracting 2^23 + 8 gives n - 8 exactly, without a conversion instruction; in groups of 32 (the
//    default) AVX2 decode instead widens two groups a step by vpshufb table lookups (gemv_int4_pairs).
// Grouped formats sum a group's q * x and multiply the sum by the group's scale (row_dot_scale_after),
// except AVX-512 int4, whose table lookup scales for free, and groups that are not a multiple of 32, which
// scale the widened weights (the reference's fp32 q * scale) before the FMAs; per-channel formats (one
// group) accumulate q * x and multiply the sum by the scale once. Four accumulator chains per row of x
// hide the FMA latency (groups of 32 take two groups a step for that). Measured from cache on one Zen 4
// core (fastlm.bench.quant for the DRAM numbers): int8 per channel ~24 G weights/s, int4 G=32 ~18 G/s
// against 30 G/s for the bf16 dot product kernel of csrc/cpu/linear.cpp: int8 is bound by memory at 2
// threads, int4 by these instructions (one FMA per weight and row of x in fp32; no activation
// quantization, for parity).
// With bf16 x on CPUs with AVX512-BF16, int4 in groups of 32 (the default) widens to bf16 instead and
// multiplies with vdpbf16ps (gemv_int4_bf16: half the instructions a weight, exact the same way): from
// cache on one core 22-32 G weights/s, and streaming the E2E Arcee layer shapes from DRAM at 2 threads
// 16-21 GB/s against 12.7-12.9 GB/s (the op called on the 36 distinct weights of 9 such layers in turn,
// interleaved with the fp32-widening build, 2-core Zen 4). Decode reads memory and computes in turn more
// than it overlaps them, so fewer instructions a byte show in the DRAM rate too.
// int8 with bf16 x on those CPUs likewise (gemv_int8_bf16, any group size): the weights widened to fp32 and
// packed to bf16, x multiplied as it is: Arcee's up / down shapes 1.3-1.4x from cache and 1.1-1.3x from DRAM
// at 2 threads against widening x as well, the engine's decode 1.05x (Arcee) and 1.12x (StableLM), interleaved
// in one process, 2-core Zen 4. Both reduce eight rows' partial sums at a time (gemv_rows_lanes): int4 at
// K = 640 1.5x from cache, 1.2x from DRAM; so does the AVX2 int4 kernel (gemv_int4_pairs, hsum_lanes' 8-row
// transpose in vec_util.h): 1.2-1.25x from cache, 1.03-1.12x from DRAM at K = 640 (AVX2 build, 2-core Zen 4).
//
// Prefill (M > kMaxGemvRows): a GEMM, where the weight is reused M times and its bytes no longer matter.
//  * bf16 x on CPUs with AVX512-BF16 (K and G even): a GEMM on the bare q in bf16 with vdpbf16ps, each
//    group's sum times its scale in registers (prefill_bf16). The integers q are exact in bf16 and the
//    products of two bf16 exact in fp32, so this rounds like the fp32 path below, at twice its multiply
//    rate: on the E2E Arcee shapes at M = 512 (2-core Zen 4, fastlm.bench.quant) int8 runs at 1.01-1.07x
//    and int4 G=32 at 0.91-0.96x of the bf16 linear's oneDNN GEMM (the fp32 path below: ~0.4x); end to
//    end, 512-token prefill 1.6-2.0x faster (fastlm bench prefill --quantize int8,int4).
//  * otherwise the weight is widened to fp32 (q * scale) panel by panel and multiplied by ATen's fp32
//    GEMM, the path that 16-bit weights take on CPUs without native 16-bit dot products
//    (csrc/cpu/widened_gemm.h); bias and residual are added in fp32 and the result rounded once. The
//    widening writes and re-reads 4 bytes a weight per x slice (from cache), small beside the GEMM's
//    2 * M flops a weight. fp32 or fp16 x are not exact in bf16, so they take this path on every CPU; on
//    AVX2 CPUs the fp32 GEMM is the fast one anyway.
#include "../checks.h"
#include "../op_list.h"
#include "cpu_features.h"
#include "vec_util.h"
#include "widened_gemm.h"

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2) || defined(FASTLM_AVX512_BF16)
#include <immintrin.h>
#endif

namespace fastlm::cpu {
namespace {

constexpr int64_t kMaxGemvRows = 16;  // rows of x up to which the streaming kernel runs (see the header)
constexpr int64_t kBlockRows = 8;     // W rows per block (read in order; re-read from cache per x tile)
constexpr int kMaxXRows = 4;          // rows of x per register tile
constexpr int64_t kQBlock = 32;       // weights per widening step (and the int4 packing block)

// The bit pattern of the fp32 value of a small integer q (the widening tables' entries; exact for |q| < 2^24,
// and its high 16 bits are q's bf16 for |q| < 256).
inline uint32_t f32_bits_of_int(int q) {
  const float f = static_cast<float>(q);
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

// The SIMD width of this build: kL floats a register, kVecs registers a block of 32 weights. The default
// (no SIMD) build runs the same code on plain floats.
#if defined(CPU_CAPABILITY_AVX512)
using VF = __m512;
constexpr int kL = 16;
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vset1(float s) { return _mm512_set1_ps(s); }
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(VF v) { return _mm512_reduce_add_ps(v); }
inline void widen8(const int8_t* p, VF w[2]) {
  w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  w[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
}
#elif defined(CPU_CAPABILITY_AVX2)
using VF = __m256;
constexpr int kL = 8;
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vset1(float s) { return _mm256_set1_ps(s); }
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(VF v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline void widen8(const int8_t* p, VF w[4]) {
  for (int j = 0; j < 4; ++j) {
    w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j))));
  }
}
inline void widen4(const uint8_t* p, VF w[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i v0 = _mm256_cvtepu8_epi32(bytes), v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  const __m256i two23 = _mm256_set1_epi32(0x4B000000), low = _mm256_set1_epi32(0xF);
  const __m256 offset = _mm256_set1_ps(8388616.f);
  auto to_float = [&](__m256i n) { return _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(n, two23)), offset); };
  w[0] = to_float(_mm256_and_si256(v0, low));  // weights 0..7
  w[1] = to_float(_mm256_and_si256(v1, low));  // 8..15
  w[2] = to_float(_mm256_srli_epi32(v0, 4));   // 16..23
  w[3] = to_float(_mm256_srli_epi32(v1, 4));   // 24..31
}
#else
using VF = float;
constexpr int kL = 1;
inline VF vzero() { return 0.f; }
inline VF vset1(float s) { return s; }
inline VF vload(const float* p) { return *p; }
inline VF vmul(VF a, VF b) { return a * b; }
inline VF vadd(VF a, VF b) { return a + b; }
inline VF vfma(VF a, VF b, VF c) { return a * b + c; }
inline float vsum(VF v) { return v; }
inline void widen8(const int8_t* p, VF w[32]) {
  for (int j = 0; j < 32; ++j) w[j] = static_cast<float>(p[j]);
}
inline void widen4(const uint8_t* p, VF w[32]) {
  for (int j = 0; j < 16; ++j) {
    w[j] = static_cast<float>((p[j] & 0xF) - 8);
    w[j + 16] = static_cast<float>((p[j] >> 4) - 8);
  }
}
#endif
// A register of x from the decode scratch (DecodeX, csrc/cpu/vec_util.h: 16-bit on AVX-512 builds), as fp32.
#if defined(CPU_CAPABILITY_AVX512)
inline VF vload_x(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline VF vload_x(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif
inline VF vload_x(const float* p) { return vload(p); }

constexpr int kVecs = kQBlock / kL;
// Blocks of 32 weights per step of the decode loop: enough independent accumulator chains per row of x
// (kUnroll * kVecs) to hide the FMA latency. With two chains (one block a step on AVX-512) the int8 loop
// was bound by the FMA latency, at 24 G weights/s from L2 on one Zen 4 core.
constexpr int kUnroll = kVecs >= 4 ? 1 : 4 / kVecs;

// Widens a block of 32 weights at a time to fp32, multiplied by the current group's scale when kScaled
// (exactly the reference's fp32 products q * scale), else the bare q.
template <int kBits, bool kScaled>
struct Widener {
  VF scale = vset1(1.f);
#if defined(CPU_CAPABILITY_AVX512)
  // int4 on AVX-512: the 16 values (n - 8) * scale of a nibble n as a table, which vpermps indexes with
  // the low 4 bits of each lane (the high bits are ignored, so the low nibble needs no mask): one
  // instruction a register for the whole widening and scaling.
  VF table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
#endif
  inline void set_scale(float s) {
    if constexpr (!kScaled) return;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBits == 4) {
      table = _mm512_mul_ps(_mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), vset1(s));
      return;
    }
#endif
    scale = vset1(s);
  }
  // Weights k .. k + 31 of the row at w (k a multiple of 32 within its group).
  inline void operator()(const uint8_t* w, int64_t k, VF out[kVecs]) const {
    if constexpr (kBits == 8) {
      widen8(reinterpret_cast<const int8_t*>(w) + k, out);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2)));
      out[0] = _mm512_permutexvar_ps(v, table);
      out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      return;
#else
      widen4(w + k / 2, out);
#endif
    }
    if constexpr (kScaled) {
      for (int j = 0; j < kVecs; ++j) out[j] = vmul(out[j], scale);
    }
  }
};

// Weight o of a block of t (<= 32, even) weights at `p`: byte o holds weights o and o + t / 2
// (fastlm/ops/quantized.py's layout: a whole block of 32, t = 32, or a group's partial last one); int8
// weights are one a byte.
template <int kBits>
inline int tail_q(const uint8_t* p, int64_t t, int64_t o) {
  if constexpr (kBits == 8) {
    return static_cast<int8_t>(p[o]);
  } else {
    const int64_t h = t / 2;
    return (o < h ? (p[o] & 0xF) : (p[o - h] >> 4)) - 8;
  }
}

// The quantized weight: row n's bytes at data + n * row_stride, its scales at scales + n * groups.
struct QWeight {
  const uint8_t* data;
  int64_t row_stride;
  const float* scales;
  int64_t groups, group_size;
};

// Grouped formats whose widening does not fold the scale in (all but AVX-512 int4), groups a multiple of
// 32: a group's products x * q summed in one chain a row of x, then times the group's scale into the row's
// accumulator: one FMA a group instead of one multiply a register of widened weights (AVX2 int4: 19 vector
// instructions per 32 weights instead of 22). The order fastlm/ops/quantized.py allows.
template <int kBits, int MR, typename XT>
inline void row_dot_scale_after(const uint8_t* w, const float* s, int64_t G, int64_t groups, const XT* xf,
                                int64_t xk, float* out) {
  constexpr int kAcc = MR == 1 ? 2 : 1;  // chains across groups; more rows of x are independent chains already
  VF acc[MR][kAcc];
  for (int i = 0; i < MR; ++i) {
    for (int c = 0; c < kAcc; ++c) acc[i][c] = vzero();
  }
  const Widener<kBits, false> widen;
  auto group = [&](int64_t g, int c) __attribute__((always_inline)) {
    VF t[MR];
    const int64_t k0 = g * G;
    for (int64_t k = k0; k < k0 + G; k += kQBlock) {
      VF wv[kVecs];
      widen(w, k, wv);
      for (int i = 0; i < MR; ++i) {
        for (int j = 0; j < kVecs; ++j) {
          const VF xv = vload_x(xf + i * xk + k + j * kL);
          t[i] = k == k0 && j == 0 ? vmul(wv[0], xv) : vfma(wv[j], xv, t[i]);
        }
      }
    }
    const VF sv = vset1(s[g]);
    for (int i = 0; i < MR; ++i) acc[i][c] = vfma(t[i], sv, acc[i][c]);
  };
  int64_t g = 0;
  for (; g + kAcc <= groups; g += kAcc) {  // the chain index a constant, so that acc stays in registers
    group(g, 0);
    if constexpr (kAcc == 2) group(g + 1, 1);
  }
  for (; g < groups; ++g) group(g, 0);
  for (int i = 0; i < MR; ++i) {
    VF sum = acc[i][0];
    if constexpr (kAcc == 2) sum = vadd(sum, acc[i][1]);
    out[i] = vsum(sum);
  }
}

// out[i] = W[row] . x[i] for MR rows of x (fp32 scratch rows xk apart, zero-padded to a multiple of 32).
template <int kBits, bool kGrouped, int MR, typename XT>
inline void row_dot(const uint8_t* w, const float* s, int64_t G, int64_t groups, const XT* xf, int64_t xk,
                    float* out) {
  if constexpr (kGrouped && !(kL == 16 && kBits == 4)) {
    if (G % kQBlock == 0) return row_dot_scale_after<kBits, MR, XT>(w, s, G, groups, xf, xk, out);
  }
  // Accumulator chains per row of x: kUnroll * kVecs, fewer with more rows of x (their chains are
  // independent too) where 16 AVX2 registers would not hold them.
  constexpr int kChains = kUnroll * kVecs;
  constexpr int kAcc = MR <= 2 || kL == 16 ? kChains : 2;
  VF acc[MR][kAcc];
  for (int i = 0; i < MR; ++i) {
    for (int a = 0; a < kAcc; ++a) acc[i][a] = vzero();
  }
  float tail[MR] = {};
  Widener<kBits, kGrouped> widen, widen2;
  const int64_t full = G / kQBlock * kQBlock;
  auto step = [&](const Widener<kBits, kGrouped>& wd, int64_t k, int u) __attribute__((always_inline)) {
    VF wv[kVecs];
    wd(w, k, wv);
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < kVecs; ++j) {
        VF& a = acc[i][(u * kVecs + j) % kAcc];
        a = vfma(wv[j], vload_x(xf + i * xk + k + j * kL), a);
      }
    }
  };
  int64_t g = 0;
  if (kUnroll == 2 && G == kQBlock) {
    // Groups of 32 with two blocks a step: two groups a step, each with its own scale (one group a step
    // would leave half the accumulator chains idle: the loop was FMA-latency bound, 25% slower than G = 64)
    for (; g + 2 <= groups; g += 2) {
      widen.set_scale(s[g]);
      widen2.set_scale(s[g + 1]);
      step(widen, g * kQBlock, 0);
      step(widen2, (g + 1) * kQBlock, 1);
    }
  }
  for (; g < groups; ++g) {
    const int64_t k0 = g * G, k1 = k0 + full;
    widen.set_scale(s[g]);
    int64_t k = k0;
    for (; k + kUnroll * kQBlock <= k1; k += kUnroll * kQBlock) {
      for (int u = 0; u < kUnroll; ++u) step(widen, k + u * kQBlock, u);
    }
    for (; k < k1; k += kQBlock) step(widen, k, 0);
    if (full < G) {  // a group size that is not a multiple of 32: its last weights one at a time
      const int64_t t = G - full;
      const uint8_t* p = kBits == 8 ? w + k1 : w + k1 / 2;
      const float sg = kGrouped ? s[g] : 1.f;
      for (int64_t o = 0; o < t; ++o) {
        const float q = static_cast<float>(tail_q<kBits>(p, t, o));
        const float wq = kGrouped ? q * sg : q;
        for (int i = 0; i < MR; ++i) tail[i] += wq * static_cast<float>(xf[i * xk + k1 + o]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    VF sum = acc[i][0];
    for (int a = 1; a < kAcc; ++a) sum = vadd(sum, acc[i][a]);
    const float v = vsum(sum) + tail[i];
    out[i] = kGrouped ? v : v * s[0];
  }
}

template <typename XT>
using RowDot = void (*)(const uint8_t*, const float*, int64_t, int64_t, const XT*, int64_t, float*);

template <int kBits, bool kGrouped, typename XT>
std::array<RowDot<XT>, kMaxXRows> row_dots() {
  static_assert(kMaxXRows == 4, "one instantiation per row count below");
  return {&row_dot<kBits, kGrouped, 1, XT>, &row_dot<kBits, kGrouped, 2, XT>, &row_dot<kBits, kGrouped, 3, XT>,
          &row_dot<kBits, kGrouped, 4, XT>};
}

template <typename XT>
std::array<RowDot<XT>, kMaxXRows> pick_row_dots(int bits, bool grouped) {
  if (bits == 8) return grouped ? row_dots<8, true, XT>() : row_dots<8, false, XT>();
  return grouped ? row_dots<4, true, XT>() : row_dots<4, false, XT>();
}

// The decode loop: each thread takes a contiguous range of W's rows in blocks of kBlockRows, and for each
// row and tile of up to kMaxXRows rows of x calls dot(n, m0, mr, out) (out[i] = W[n] . x[m0 + i]); bias
// and residual are added in fp32 and the result rounded once (store_output).
template <typename T>
inline void store_output(float sum, const T* bias, const T* res, int64_t rs, T* y, int64_t ys, int64_t row,
                         int64_t n) {
  float v = sum + (bias ? IO<T>::to_float(bias[n]) : 0.f);
  if (res) v += IO<T>::to_float(res[row * rs + n]);
  y[row * ys + n] = static_cast<T>(v);
}

// Blocks of kBlockRows weight rows a task: >= 64 KB of W each.
inline int64_t gemv_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kBlockRows * row_bytes));
}

template <typename T, typename Dot>
void gemv_rows(int64_t row_bytes, const T* bias, const T* res, int64_t rs, T* y, int64_t ys, int64_t M, int64_t N,
               const Dot& dot) {
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, gemv_grain(row_bytes), [&](int64_t begin, int64_t end) {
    float out[kMaxXRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlockRows, n1 = std::min(N, n0 + kBlockRows);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxXRows) {
        const int64_t mr = std::min<int64_t>(kMaxXRows, M - m0);
        for (int64_t n = n0; n < n1; ++n) {
          dot(n, m0, mr, out);
          for (int64_t i = 0; i < mr; ++i) store_output(out[i], bias, res, rs, y, ys, m0 + i, n);
        }
      }
    }
  });
}

// gemv_rows for dots that leave each row's products unreduced: dot(n, m0, mr, part, r) sets part[i][r] to a
// register whose lanes sum to W[n] . x[m0 + i]. A block's kBlockRows registers a row of x are summed by one
// transpose-and-add (hsum_lanes) rather than a horizontal sum each: at K = 640 (Arcee's up projection, int4 in
// groups of 32, 2 threads from cache) the horizontal sums and the per-row epilogue were ~30% of the time.
// (Where hsum_lanes has no transpose for kBlockRows, it sums each register: the same as gemv_rows.)
template <typename T, typename Dot>
void gemv_rows_lanes(int64_t row_bytes, const T* bias, const T* res, int64_t rs, T* y, int64_t ys, int64_t M,
                     int64_t N, const Dot& dot) {
  static_assert(kBlockRows % 4 == 0 && kBlockRows <= 16, "hsum_lanes: rows in groups of four, one a lane");
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, gemv_grain(row_bytes), [&](int64_t begin, int64_t end) {
    fVec part[kMaxXRows][kBlockRows];
    alignas(64) float sums[16];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlockRows, n1 = std::min(N, n0 + kBlockRows);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxXRows) {
        const int64_t mr = std::min<int64_t>(kMaxXRows, M - m0);
        for (int64_t n = n0; n < n1; ++n) dot(n, m0, mr, part, static_cast<int>(n - n0));
        for (int64_t i = 0; i < mr; ++i) {
          for (int64_t r = n1 - n0; r < kBlockRows; ++r) part[i][r] = fVec(0.f);
          hsum_lanes<kBlockRows>(part[i]).store(sums);
          for (int64_t n = n0; n < n1; ++n) store_output(sums[n - n0], bias, res, rs, y, ys, m0 + i, n);
        }
      }
    }
  });
}

#if defined(FASTLM_AVX512_BF16)
// int8 with bf16 x, on CPUs with AVX512-BF16, any group size: the weights are widened to fp32 (exact) and
// packed to bf16 (exact for |q| <= 256: 8 significant bits), and x is multiplied as it is, by vdpbf16ps.
// A group's sum x . q times its scale into the row's sum; per channel (one group) the sum times the scale
// once, the orders fastlm/ops/quantized.py allows. Per 64 weights: 4 sign-extending loads, 4 int -> float
// conversions, 2 packs and 2 vdpbf16ps a row of x, against 8 + 12 vector instructions widening x as well;
// the measurements are in the header.
template <int MR>
inline void row_dot_int8_bf16(const int8_t* w, const float* s, int64_t G, int64_t groups, const at::BFloat16* xb,
                              int64_t xk, fVec (*part)[kBlockRows], int r) {
  auto widen16 = [](const int8_t* p) __attribute__((always_inline)) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * G;
    const at::BFloat16* xg = xb + g * G;
    __m512 t0[MR], t1[MR], t2[MR], t3[MR];  // four chains a row of x (the dot product's latency)
    for (int i = 0; i < MR; ++i) t0[i] = t1[i] = t2[i] = t3[i] = _mm512_setzero_ps();
    // 64 weights from k into the chains ta, tb
    auto step = [&](int64_t k, __m512 (&ta)[MR], __m512 (&tb)[MR]) __attribute__((always_inline)) {
      const __m512bh w0 = _mm512_cvtne2ps_pbh(widen16(wg + k + 16), widen16(wg + k));
      const __m512bh w1 = _mm512_cvtne2ps_pbh(widen16(wg + k + 48), widen16(wg + k + 32));
      for (int i = 0; i < MR; ++i) {
        const at::BFloat16* xi = xg + i * xk + k;
        ta[i] = _mm512_dpbf16_ps(ta[i], w0, (__m512bh)_mm512_loadu_si512(xi));
        tb[i] = _mm512_dpbf16_ps(tb[i], w1, (__m512bh)_mm512_loadu_si512(xi + 32));
      }
    };
    int64_t k = 0;
    for (; k + 128 <= G; k += 128) {
      step(k, t0, t1);
      step(k + 64, t2, t3);
    }
    if (k + 64 <= G) {
      step(k, t0, t1);
      k += 64;
    }
    for (; k < G; k += 32) {  // the group's last 32 or fewer, masked (x past them may be the next group's)
      const int64_t n = std::min<int64_t>(32, G - k);
      const __mmask32 m = n == 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
      const __m256i b = _mm256_maskz_loadu_epi8(m, wg + k);
      const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      const __m512bh w0 = _mm512_cvtne2ps_pbh(f1, f0);
      for (int i = 0; i < MR; ++i) {
        t0[i] = _mm512_dpbf16_ps(t0[i], w0, (__m512bh)_mm512_maskz_loadu_epi16(m, xg + i * xk + k));
      }
    }
    const __m512 sv = _mm512_set1_ps(s[g]);
    for (int i = 0; i < MR; ++i) {
      acc[i] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(t0[i], t1[i]), _mm512_add_ps(t2[i], t3[i])), sv, acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) part[i][r] = fVec(acc[i]);
}

// xb: gemv's scratch [M, xk] of x (bf16 as DecodeX keeps it on AVX-512), rows zero-padded.
void gemv_int8_bf16(const at::BFloat16* xb, int64_t xk, const QWeight& qw, const at::BFloat16* bias,
                    const at::BFloat16* res, int64_t rs, at::BFloat16* y, int64_t ys, int64_t M, int64_t N, int64_t K) {
  const int64_t G = qw.group_size, groups = qw.groups;
  gemv_rows_lanes<at::BFloat16>(K, bias, res, rs, y, ys, M, N,
                                [&](int64_t n, int64_t m0, int64_t mr, fVec (*part)[kBlockRows], int r) {
    const int8_t* w = reinterpret_cast<const int8_t*>(qw.data + n * qw.row_stride);
    const float* s = qw.scales + n * groups;
    const at::BFloat16* xm = xb + m0 * xk;
    static_assert(kMaxXRows == 4, "one instantiation per row count below");
    switch (mr) {
      case 1: row_dot_int8_bf16<1>(w, s, G, groups, xm, xk, part, r); break;
      case 2: row_dot_int8_bf16<2>(w, s, G, groups, xm, xk, part, r); break;
      case 3: row_dot_int8_bf16<3>(w, s, G, groups, xm, xk, part, r); break;
      default: row_dot_int8_bf16<4>(w, s, G, groups, xm, xk, part, r); break;
    }
  });
}

// int4 in groups of 32 with bf16 x, on CPUs with AVX512-BF16: the weights are widened to bf16 instead of
// fp32 and multiplied with vdpbf16ps, 32 products an instruction. Exact like the fp32 path: a nibble's
// n - 8 and a bf16 x are exact in bf16 and their product in fp32; vdpbf16ps accumulates in fp32 (bf16
// subnormals read as 0, as in linear's bf16 tile). A group's sum x . q is multiplied by its scale after,
// the order the module docstring of fastlm/ops/quantized.py allows.
// Per pair of groups (64 weights, 32 bytes): the bytes zero-extended to 32 words (words 0-15 group g,
// 16-31 group g + 1), one vpermw on a 32-entry table of bf16 (i & 15) - 8 gives the low nibbles (weights
// 0-15 of each group; the table ignores bit 4, the high nibble's lowest bit), a shift and a second
// vpermw the high ones (weights 16-31). x is rearranged once per call to that order (xp), so fp32 lanes
// 0-7 of each vdpbf16ps sum group g and lanes 8-15 group g + 1; one FMA with [s_g x 8, s_g+1 x 8] adds
// them. 6 vector instructions per 64 weights and row of x, against 12 widening to fp32.
constexpr int64_t kPairWords = 64;  // x's bf16 per pair of groups of 32 in xp

// Row i's x (K elements, K % 32 == 0) in xp's order: per pair of groups [x(g, 0..15), x(g+1, 0..15),
// x(g, 16..31), x(g+1, 16..31)]; an odd last group's g + 1 halves are zeros.
void pair_order_x(const at::BFloat16* x, int64_t K, at::BFloat16* xp) {
  const int64_t groups = K / kQBlock;
  for (int64_t g = 0; g < groups; ++g) {
    at::BFloat16* d = xp + g / 2 * kPairWords + (g % 2) * 16;
    std::copy(x + g * kQBlock, x + g * kQBlock + 16, d);
    std::copy(x + g * kQBlock + 16, x + g * kQBlock + 32, d + 32);
  }
  if (groups % 2) {
    at::BFloat16* d = xp + groups / 2 * kPairWords + 16;
    std::fill(d, d + 16, at::BFloat16(0.f));
    std::fill(d + 32, d + 48, at::BFloat16(0.f));
  }
}

inline __m512i int4_bf16_table() {
  alignas(64) static const std::array<uint16_t, 32> table = [] {
    std::array<uint16_t, 32> t{};
    for (int i = 0; i < 32; ++i) t[i] = static_cast<uint16_t>(f32_bits_of_int((i & 15) - 8) >> 16);  // exact in bf16
    return t;
  }();
  return _mm512_load_si512(table.data());
}

template <int MR>
inline void row_dot_int4_bf16(const uint8_t* w, const float* s, int64_t groups, const at::BFloat16* xp, int64_t xpk,
                              const __m512i table, fVec (*part)[kBlockRows], int r) {
  __m512 acc[MR][2];  // two chains per row of x (the FMA's latency)
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  auto step = [&](__m512i v, __m512 sv, int64_t pair, int u) __attribute__((always_inline)) {
    const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(v, table);
    const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
    for (int i = 0; i < MR; ++i) {
      const at::BFloat16* xi = xp + i * xpk + pair * kPairWords;
      __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(xi));
      t = _mm512_dpbf16_ps(t, hi, (__m512bh)_mm512_loadu_si512(xi + 32));
      acc[i][u] = _mm512_fmadd_ps(t, sv, acc[i][u]);
    }
  };
  auto pair = [&](int64_t g, int u) __attribute__((always_inline)) {  // groups g, g + 1
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16)));
    // [s_g x 8, s_g+1 x 8] by a blend of two broadcasts (any FP pipe) rather than an insert (a shuffle, the
    // pipes the widening's three shuffles already share): 1.01-1.05x from cache (int4 G=32 at the E2E shapes,
    // interleaved, 2 threads, Zen 4), the same results
    step(v, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[g]), _mm512_set1_ps(s[g + 1])), g / 2, u);
  };
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4) {  // the chain index a constant, so that acc stays in registers
    pair(g, 0);
    pair(g + 2, 1);
  }
  if (g + 2 <= groups) {
    pair(g, 0);
    g += 2;
  }
  if (g < groups) {  // an odd last group, in the low halves (its x pair-partner is zeros, its scale lanes 0)
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16));
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(bytes));
    step(v, _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(s[g])), g / 2, 1);
  }
  for (int i = 0; i < MR; ++i) part[i][r] = fVec(_mm512_add_ps(acc[i][0], acc[i][1]));
}

void gemv_int4_bf16(const at::BFloat16* x, int64_t xs, const QWeight& qw, const at::BFloat16* bias,
                    const at::BFloat16* res, int64_t rs, at::BFloat16* y, int64_t ys, int64_t M, int64_t N, int64_t K) {
  const int64_t groups = K / kQBlock, xpk = (groups + 1) / 2 * kPairWords;
  std::vector<at::BFloat16> xp(M * xpk);
  for (int64_t i = 0; i < M; ++i) pair_order_x(x + i * xs, K, xp.data() + i * xpk);
  const __m512i table = int4_bf16_table();
  gemv_rows_lanes<at::BFloat16>(K / 2, bias, res, rs, y, ys, M, N,
                                [&](int64_t n, int64_t m0, int64_t mr, fVec (*part)[kBlockRows], int r) {
    const uint8_t* w = qw.data + n * qw.row_stride;
    const float* s = qw.scales + n * qw.groups;
    const at::BFloat16* xm = xp.data() + m0 * xpk;
    static_assert(kMaxXRows == 4, "one instantiation per row count below");
    switch (mr) {
      case 1: row_dot_int4_bf16<1>(w, s, groups, xm, xpk, table, part, r); break;
      case 2: row_dot_int4_bf16<2>(w, s, groups, xm, xpk, table, part, r); break;
      case 3: row_dot_int4_bf16<3>(w, s, groups, xm, xpk, table, part, r); break;
      default: row_dot_int4_bf16<4>(w, s, groups, xm, xpk, table, part, r); break;
    }
  });
}

// Prefill with bf16 x on CPUs with AVX512-BF16 (prefill_bf16): a GEMM on the bare q in bf16 (the integers
// of both formats, |q| <= 127, are exact in bf16), multiplied with vdpbf16ps (pairs of bf16, products exact
// in fp32, fp32 sums): each group's products summed in registers and times its scale once, the order the
// format allows (per channel: one group, the scale after the whole row). No rounding beyond fp32's, like the
// fp32-widening path, at twice its multiply rate (32 products a cycle and core on Zen 4, against 16 fp32
// FMAs). Each thread packs a panel of kPanelN weight rows at a time into pairs of bf16 along K (one 32-bit
// word per pair, kPanelN consecutive words per pair index: one load per 16 output channels, kPanelN * K * 2
// bytes, L2-resident) with its scales, then runs every kTileM-row block of x over it: 12 accumulators, 12
// group sums, 2 weight and 2 scale registers and one broadcast pair of x, 29 of the 32 zmm.
constexpr int64_t kPanelN = 32;  // output channels per packed panel: two zmm of fp32 lanes
constexpr int kTileM = 6;        // rows of x per register tile

inline uint32_t bf16_bits_of_int(int q) { return f32_bits_of_int(q) >> 16; }  // exact for |q| < 256

// Rows [n0, n0 + nr) of q into bp [K / 2][kPanelN] (word (kp, j): q[n0 + j][2 kp] in its low half, q[n0 + j]
// [2 kp + 1] in its high half) and their scales into sp [groups][kPanelN]; rows past nr zeros. q_row: [K]
// scratch.
template <int kBits>
void pack_panel_bf16(const QWeight& qw, int64_t n0, int64_t nr, int64_t K, uint32_t* bp, float* sp, int8_t* q_row) {
  const int64_t G = qw.group_size, pairs = K / 2;
  for (int64_t j = 0; j < kPanelN; ++j) {
    if (j >= nr) {
      for (int64_t kp = 0; kp < pairs; ++kp) bp[kp * kPanelN + j] = 0;
      for (int64_t g = 0; g < qw.groups; ++g) sp[g * kPanelN + j] = 0.f;
      continue;
    }
    const uint8_t* w = qw.data + (n0 + j) * qw.row_stride;
    for (int64_t g = 0; g < qw.groups; ++g) {
      sp[g * kPanelN + j] = qw.scales[(n0 + j) * qw.groups + g];
      const int64_t k0 = g * G;
      if constexpr (kBits == 8) {
        std::memcpy(q_row + k0, w + k0, G);
      } else {
        for (int64_t k = k0; k < k0 + G; k += kQBlock) {  // whole blocks of 32, then a partial one
          const int64_t t = std::min(kQBlock, k0 + G - k);
          for (int64_t o = 0; o < t; ++o) q_row[k + o] = static_cast<int8_t>(tail_q<4>(w + k / 2, t, o));
        }
      }
    }
    for (int64_t kp = 0; kp < pairs; ++kp) {
      bp[kp * kPanelN + j] = bf16_bits_of_int(q_row[2 * kp]) | (bf16_bits_of_int(q_row[2 * kp + 1]) << 16);
    }
  }
}

// c [MR][kPanelN] = sum over groups of scale * (x's rows [MR, K] (row stride xs) . the packed panel's q).
template <int MR>
void tile_bf16(const at::BFloat16* x, int64_t xs, int64_t groups, int64_t G, const uint32_t* bp, const float* sp,
               float* c) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const int64_t group_pairs = G / 2;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 sum[MR][2];
    for (int i = 0; i < MR; ++i) sum[i][0] = sum[i][1] = _mm512_setzero_ps();
    const uint32_t* b = bp + g * group_pairs * kPanelN;
    const at::BFloat16* xg = x + g * G;
    for (int64_t kp = 0; kp < group_pairs; ++kp) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * kPanelN);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * kPanelN + 16);
      for (int i = 0; i < MR; ++i) {
        uint32_t pair;
        std::memcpy(&pair, xg + i * xs + 2 * kp, 4);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        sum[i][0] = _mm512_dpbf16_ps(sum[i][0], a, b0);
        sum[i][1] = _mm512_dpbf16_ps(sum[i][1], a, b1);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(sp + g * kPanelN), s1 = _mm512_loadu_ps(sp + g * kPanelN + 16);
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = _mm512_fmadd_ps(sum[i][0], s0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(sum[i][1], s1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(c + i * kPanelN, acc[i][0]);
    _mm512_storeu_ps(c + i * kPanelN + 16, acc[i][1]);
  }
}

// y [M, N] = round_bf16(x [M, K] @ dequantize(qw)^T + bias + res); K and the group size even, M, N, K > 0.
void prefill_bf16(const at::BFloat16* x, int64_t xs, const QWeight& qw, int bits, const float* bias,
                  const at::BFloat16* res, int64_t rs, at::BFloat16* y, int64_t ys, int64_t M, int64_t N, int64_t K) {
  const int64_t panels = ceil_div(N, kPanelN), pairs = K / 2;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    // bp [pairs][kPanelN] words, sp [groups][kPanelN], c [kTileM][kPanelN], q_row [K] bytes
    float* scratch = thread_scratch(kPanelSlot, (pairs + qw.groups + kTileM) * kPanelN + ceil_div(K, 4));
    uint32_t* bp = reinterpret_cast<uint32_t*>(scratch);
    float* sp = scratch + pairs * kPanelN;
    float* c = sp + qw.groups * kPanelN;
    int8_t* q_row = reinterpret_cast<int8_t*>(c + kTileM * kPanelN);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanelN, nr = std::min(kPanelN, N - n0);
      if (bits == 8) {
        pack_panel_bf16<8>(qw, n0, nr, K, bp, sp, q_row);
      } else {
        pack_panel_bf16<4>(qw, n0, nr, K, bp, sp, q_row);
      }
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int64_t mr = std::min<int64_t>(kTileM, M - m0);
        const at::BFloat16* xm = x + m0 * xs;
        static_assert(kTileM == 6, "one instantiation per row count below");
        switch (mr) {
          case 1: tile_bf16<1>(xm, xs, qw.groups, qw.group_size, bp, sp, c); break;
          case 2: tile_bf16<2>(xm, xs, qw.groups, qw.group_size, bp, sp, c); break;
          case 3: tile_bf16<3>(xm, xs, qw.groups, qw.group_size, bp, sp, c); break;
          case 4: tile_bf16<4>(xm, xs, qw.groups, qw.group_size, bp, sp, c); break;
          case 5: tile_bf16<5>(xm, xs, qw.groups, qw.group_size, bp, sp, c); break;
          default: tile_bf16<6>(xm, xs, qw.groups, qw.group_size, bp, sp, c); break;
        }
        widened_epilogue<at::BFloat16>(c, kPanelN, bias ? bias + n0 : nullptr, res ? res + m0 * rs + n0 : nullptr,
                                       rs, y + m0 * ys + n0, ys, mr, nr);
      }
    }
  });
}
#endif

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// int4 in groups of 32 on AVX2 builds: two groups (32 bytes) a step, widened by table lookups instead of
// zero-extensions. A nibble n's value n - 8 (|n - 8| <= 8) is exact in the top 16 bits of its fp32, so
// vpshufb looks up those two bytes on 16-entry tables (one table a byte), an unpack interleaves them into
// 16-bit words, and each 32-bit lane takes its fp32 from a word by a shift (even words) or a mask (odd
// words): 19 vector instructions per 64 weights, against 30 for two groups of widen4 (zero-extensions,
// masks, the 2^23 or-and-subtract). Lanes 0-3 of every register hold group g, lanes 4-7 group g + 1
// (vpshufb and the unpacks work within 128-bit halves), so x is rearranged once per call to that order
// (xp) and each row's partial sums are multiplied by [s_g x 4, s_g+1 x 4]: the scale after the group's
// sum, the order fastlm/ops/quantized.py allows, exact to fp32 rounding like the other paths.
// A stand-alone probe of the row loop (one Zen 3 core, from cache, interleaved): 9.8 -> 14.4 G weights/s
// at K = 4608, 7.6 -> 11 at K = 640; the op on one [128, 4608] weight, one thread: 5.4 -> 11.7-12.3 G/s
// (the widen4 loop had been bound by its instructions, at the same rate from cache and from DRAM).
constexpr int64_t kPairFloats = 64;  // x's fp32 per pair of groups in xp

// Register r (0..7) of a pair's widened weights holds, in lanes 0-3 and 4-7, the weights h * 16 +
// kPairLane[r % 4][0..3] of groups g and g + 1, h = r / 4 (the low, then the high nibbles): the even or odd
// bytes of the low or high 8 of each 128-bit half.
constexpr int kPairLane[4][4] = {{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}};

// Row i's x (K elements, fp32 scratch zero-padded to whole groups) in xp's order; an odd last group's
// partner lanes are zeros.
void pair_order_x_f32(const float* x, int64_t groups, float* xp) {
  for (int64_t g = 0; g < groups; g += 2) {
    float* d = xp + g / 2 * kPairFloats;
    for (int r = 0; r < 8; ++r) {
      for (int l = 0; l < 4; ++l) {
        const int64_t o = r / 4 * 16 + kPairLane[r % 4][l];
        d[r * 8 + l] = x[g * kQBlock + o];
        d[r * 8 + 4 + l] = g + 1 < groups ? x[(g + 1) * kQBlock + o] : 0.f;
      }
    }
  }
}

// Byte b (2: bits 16-23, 3: bits 24-31) of the fp32 (i & 15) - 8, in both 128-bit halves.
inline __m256i int4_f32_byte_table(int b) {
  alignas(32) uint8_t t[32];
  for (int i = 0; i < 32; ++i) t[i] = static_cast<uint8_t>(f32_bits_of_int((i & 15) - 8) >> (8 * b));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
}

template <int MR>
inline void row_dot_int4_pairs(const uint8_t* w, const float* s, int64_t groups, const float* xp, int64_t xpk,
                               fVec (*part)[kBlockRows], int r) {
  constexpr int kParts = MR <= 2 ? 2 : 1;  // partial sums a row of x (the FMA latency; registers beyond 2 rows)
  const __m256i t_hi = int4_f32_byte_table(3), t_lo = int4_f32_byte_table(2);
  const __m256i nibble = _mm256_set1_epi8(0x0F), high_word = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256i scale_lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  VF acc[MR][kParts];
  for (int i = 0; i < MR; ++i) {
    for (int p = 0; p < kParts; ++p) acc[i][p] = vzero();
  }
  // v: the pair's 32 bytes (group g in the low half, g + 1 in the high one); sv: [s_g x 4, s_g+1 x 4]
  auto step = [&](__m256i v, VF sv, int64_t pair) __attribute__((always_inline)) {
    VF t[MR][kParts];
    const __m256i idx[2] = {_mm256_and_si256(v, nibble), _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble)};
    for (int h = 0; h < 2; ++h) {
      const __m256i hi = _mm256_shuffle_epi8(t_hi, idx[h]), lo = _mm256_shuffle_epi8(t_lo, idx[h]);
      const __m256i words[2] = {_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)};
      VF f[4];
      for (int j = 0; j < 2; ++j) {
        f[2 * j] = _mm256_castsi256_ps(_mm256_slli_epi32(words[j], 16));
        f[2 * j + 1] = _mm256_castsi256_ps(_mm256_and_si256(words[j], high_word));
      }
      for (int i = 0; i < MR; ++i) {
        const float* xi = xp + i * xpk + pair * kPairFloats + h * 32;
        for (int j = 0; j < 4; ++j) {
          const VF xv = _mm256_loadu_ps(xi + j * 8);
          VF& tp = t[i][j % kParts];
          tp = h == 0 && j < kParts ? vmul(f[j], xv) : vfma(f[j], xv, tp);
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      for (int p = 0; p < kParts; ++p) acc[i][p] = vfma(t[i][p], sv, acc[i][p]);
    }
  };
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16));
    const __m128 s2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s + g)));  // s_g, s_g+1
    step(v, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), scale_lanes), g / 2);
  }
  if (g < groups) {  // an odd last group in the low halves: its partner's x and scale lanes are zeros
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16));
    step(_mm256_zextsi128_si256(bytes), _mm256_setr_m128(_mm_set1_ps(s[g]), _mm_setzero_ps()), g / 2);
  }
  for (int i = 0; i < MR; ++i) {
    VF sum = acc[i][0];
    for (int p = 1; p < kParts; ++p) sum = vadd(sum, acc[i][p]);
    part[i][r] = fVec(sum);
  }
}

template <typename T>
void gemv_int4_pairs(const T* x, int64_t xs, const QWeight& qw, const T* bias, const T* res, int64_t rs, T* y,
                     int64_t ys, int64_t M, int64_t N, int64_t K) {
  const int64_t groups = K / kQBlock, xpk = (groups + 1) / 2 * kPairFloats;
  std::vector<float> xf(groups * kQBlock), xp(M * xpk);
  for (int64_t i = 0; i < M; ++i) {
    convert_row(x + i * xs, xf.data(), K);
    pair_order_x_f32(xf.data(), groups, xp.data() + i * xpk);
  }
  gemv_rows_lanes<T>(K / 2, bias, res, rs, y, ys, M, N,
                     [&](int64_t n, int64_t m0, int64_t mr, fVec (*part)[kBlockRows], int r) {
    const uint8_t* w = qw.data + n * qw.row_stride;
    const float* s = qw.scales + n * qw.groups;
    const float* xm = xp.data() + m0 * xpk;
    static_assert(kMaxXRows == 4, "one instantiation per row count below");
    switch (mr) {
      case 1: row_dot_int4_pairs<1>(w, s, groups, xm, xpk, part, r); break;
      case 2: row_dot_int4_pairs<2>(w, s, groups, xm, xpk, part, r); break;
      case 3: row_dot_int4_pairs<3>(w, s, groups, xm, xpk, part, r); break;
      default: row_dot_int4_pairs<4>(w, s, groups, xm, xpk, part, r); break;
    }
  });
}
#endif

template <typename T>
void gemv(const T* x, int64_t xs, const QWeight& qw, int bits, const T* bias, const T* res, int64_t rs, T* y,
          int64_t ys, int64_t M, int64_t N, int64_t K) {
#if defined(FASTLM_AVX512_BF16)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (bits == 4 && qw.group_size == kQBlock) return gemv_int4_bf16(x, xs, qw, bias, res, rs, y, ys, M, N, K);
  }
#endif
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if (bits == 4 && qw.group_size == kQBlock) return gemv_int4_pairs(x, xs, qw, bias, res, rs, y, ys, M, N, K);
#endif
  const int64_t xk = round_up(K, kQBlock);
  using XT = DecodeX<T>;
  std::vector<XT> xf(M * xk, XT(0.f));
  for (int64_t i = 0; i < M; ++i) convert_row(x + i * xs, xf.data() + i * xk, K);
#if defined(FASTLM_AVX512_BF16)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    static_assert(std::is_same_v<XT, at::BFloat16>, "AVX512-BF16 builds are AVX-512 builds: x stays bf16");
    if (bits == 8) return gemv_int8_bf16(xf.data(), xk, qw, bias, res, rs, y, ys, M, N, K);
  }
#endif
  const auto dots = pick_row_dots<XT>(bits, qw.groups > 1);
  gemv_rows<T>(K * bits / 8, bias, res, rs, y, ys, M, N, [&](int64_t n, int64_t m0, int64_t mr, float* out) {
    dots[mr - 1](qw.data + n * qw.row_stride, qw.scales + n * qw.groups, qw.group_size, qw.groups,
                 xf.data() + m0 * xk, xk, out);
  });
}

// Rows [n0, n0 + rows) of the weight widened to fp32 (q * scale, the reference's values) into dst [rows, K].
template <int kBits>
void widen_rows(const QWeight& qw, int64_t n0, int64_t rows, int64_t K, float* dst) {
  const int64_t G = qw.group_size, full = G / kQBlock * kQBlock;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* w = qw.data + (n0 + r) * qw.row_stride;
    const float* s = qw.scales + (n0 + r) * qw.groups;
    float* d = dst + r * K;
    Widener<kBits, true> widen;
    for (int64_t g = 0; g < qw.groups; ++g) {
      const int64_t k0 = g * G;
      widen.set_scale(s[g]);
      for (int64_t k = k0; k < k0 + full; k += kQBlock) {
        VF wv[kVecs];
        widen(w, k, wv);
        for (int j = 0; j < kVecs; ++j) {
#if defined(CPU_CAPABILITY_AVX512)
          _mm512_storeu_ps(d + k + j * kL, wv[j]);
#elif defined(CPU_CAPABILITY_AVX2)
          _mm256_storeu_ps(d + k + j * kL, wv[j]);
#else
          d[k + j] = wv[j];
#endif
        }
      }
      const int64_t t = G - full, k = k0 + full;
      const uint8_t* p = kBits == 8 ? w + k : w + k / 2;
      for (int64_t o = 0; o < t; ++o) d[k + o] = static_cast<float>(tail_q<kBits>(p, t, o)) * s[g];
    }
  }
}

// M > kMaxGemvRows (or nothing to stream): fp32 GEMMs on weight panels widened to q * scale
// (csrc/cpu/widened_gemm.h).
at::Tensor prefill(const Rows& xr, const QWeight& qw, int bits, const OptT& bias, const OptT& residual, int64_t M,
                   int64_t N, int64_t K, const std::vector<int64_t>& out_shape) {
  if (M == 0 || N == 0 || K == 0) {  // nothing to multiply: bias + residual in fp32, rounded once
    at::Tensor yf = at::zeros({M, N}, xr.data.options().dtype(at::kFloat));
    if (bias) yf.add_(bias->to(at::kFloat));
    if (residual) yf.add_(residual->reshape({M, N}).to(at::kFloat));
    return yf.to(xr.data.scalar_type()).view(out_shape);
  }
#if defined(FASTLM_AVX512_BF16)
  static const bool bf16_dots = native16_under_isa_cap().bf16;
  if (bf16_dots && xr.data.scalar_type() == at::kBFloat16 && K % 2 == 0 && qw.group_size % 2 == 0) {
    at::Tensor y = at::empty(out_shape, xr.data.options().memory_format(at::MemoryFormat::Contiguous));
    const at::Tensor b32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const Rows rr = residual ? rows_of(*residual) : Rows{};
    prefill_bf16(reinterpret_cast<const at::BFloat16*>(xr.data.const_data_ptr()), xr.stride, qw, bits,
                 bias ? b32.const_data_ptr<float>() : nullptr,
                 residual ? reinterpret_cast<const at::BFloat16*>(rr.data.const_data_ptr()) : nullptr, rr.stride,
                 reinterpret_cast<at::BFloat16*>(y.data_ptr()), N, M, N, K);
    return y;
  }
#endif
  return linear_widened("quant_linear", xr, bias, residual, out_shape, N, K, [&](auto) {
    return [&](int64_t n0, int64_t rows, float* dst) {
      if (bits == 8) {
        widen_rows<8>(qw, n0, rows, K, dst);
      } else {
        widen_rows<4>(qw, n0, rows, K, dst);
      }
    };
  });
}

}  // namespace

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const OptT& bias,
                        const OptT& residual, int64_t bits, int64_t group_size) {
  // The checks of fastlm/ops/quantized.py (check_quant_args), in its order and with its error types.
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastlm: x must be [..., K], got a 0-d tensor");
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, "fastlm: bits must be 8 or 4, got ", bits);
  const int64_t K = x.size(-1);
  check_like("qweight", qweight, x, "x", /*same_dtype=*/false);
  const at::ScalarType qtype = bits == 8 ? at::kChar : at::kByte;
  TORCH_CHECK_TYPE(qweight.scalar_type() == qtype, "fastlm: qweight must be ", qtype, " for bits=", bits, ", got ",
                   qweight.scalar_type());
  const int64_t packed_k = bits == 8 ? K : K / 2;
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(1) == packed_k, "fastlm: qweight must be [N, ",
                    bits == 8 ? "K" : "K // 2", "] = [N, ", packed_k, "] for x's K = ", K, ", got ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK_VALUE(group_size >= 1, "fastlm: group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(K % group_size == 0, "fastlm: group_size (", group_size, ") must divide x's K = ", K);
  TORCH_CHECK_VALUE(bits == 8 || group_size % 2 == 0,
                    "fastlm: group_size must be even for bits=4 (two weights a byte), got ", group_size);
  check_like("scales", scales, x, "x", /*same_dtype=*/false);
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "fastlm: scales must be float32, got ", scales.scalar_type());
  const int64_t groups = K / group_size;
  check_shape("scales", scales, {N, groups});
  const std::vector<int64_t> out_shape = projection_out_shape(x, N, bias, residual);

  const at::Tensor w = qweight.stride(1) == 1 || packed_k <= 1 ? qweight : qweight.contiguous();
  const at::Tensor s = scales.contiguous();
  const QWeight qw{reinterpret_cast<const uint8_t*>(w.const_data_ptr()), N > 1 ? w.stride(0) : packed_k,
                   s.const_data_ptr<float>(), groups, group_size};
  const Rows xr = rows_of(x);  // no view on the decode path (see rows_of)
  const int64_t M = xr.rows;
  if (M > kMaxGemvRows || M == 0 || K == 0 || N == 0) {
    return prefill(xr, qw, static_cast<int>(bits), bias, residual, M, N, K, out_shape);
  }
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const Rows rr = residual ? rows_of(*residual) : Rows{};
  FASTLM_DISPATCH_FLOAT(x.scalar_type(), "quant_linear", [&] {
    using T = scalar_t;
    gemv<T>(reinterpret_cast<const T*>(xr.data.const_data_ptr()), xr.stride, qw, static_cast<int>(bits),
            bias ? reinterpret_cast<const T*>(b.const_data_ptr()) : nullptr,
            residual ? reinterpret_cast<const T*>(rr.data.const_data_ptr()) : nullptr, rr.stride,
            reinterpret_cast<T*>(y.data_ptr()), N, M, N, K);
  });
  return y;
}

}  // namespace fastlm::cpu
