// fastlm's own fp32 GEMM for the widened weight panels (csrc/cpu/widened_gemm.h): tile [M, 16 * blocks] =
// x [M, K] @ panel^T, the panel's rows widened 16 at a time and packed k-major, single-threaded (one panel a
// task). AVX2 + FMA (256-bit): compiled into AVX2 and AVX-512 builds, taken by FASTLM_CPU_PANEL_GEMM's auto on
// AVX2 builds only (csrc/cpu/cpu_features.h: against oneDNN's AVX-512 kernels it measured 0.94-1.01x).
//
// Why its own: the panels' GEMM was oneDNN's fp32 matmul called once a panel, which packs x again on every
// call (x is the same for all panels of a slice) and, capped to AVX2, ran the widened fp16 panels at
// 126-164 GFLOP/s on the 2-core Zen 4 against an FMA peak of 232 (a two-thread vfmadd231ps loop).
// Here x is never packed: its rows are read in place (fp32, widened once per slice), broadcast one
// element at a time; only the panel is packed, which the widening writes anyway.
//
// Algorithm (GotoBLAS's loops, with the roles suited to a panel of a few hundred weight rows):
//   pack: each block of 16 weight rows [16, K] -> [K, 16] (an 8x8 register transpose per 64 elements;
//         rows past the panel's end are zero);
//   for each k block [k0, k0 + kc) (kc = K up to 1024, else about 512):
//     for each chunk of kMC x rows (their kc columns, kMC * kc * 4 bytes, stay in L2):
//       for each block of 16 panel rows (its [kc, 16] slice, up to 64 KB, from L2):
//         for each group of 6 rows of the chunk: the 6 x 16 micro-kernel, 12 accumulators in ymm
//           registers, per k one 16-wide row of the packed block (2 loads), 6 broadcasts of x and 12 FMAs;
//           the tile's 6 x 16 is loaded before (k0 > 0) and stored after.
// Bytes against flops: per k a micro-kernel reads 64 B of the packed block (L1 / L2) and 24 B of x for 192
// flops. One k block for K <= 1024: each tile element is written once; beyond, the tile is re-read once per
// k block (the panels there are narrow: widened_panel_rows caps them at ~kPanelBytes, so the tile stays in L2).
// Measured (stand-alone, fp16 panels widened and packed inside, 2 threads, 2-core Zen 4, M = 512, Arcee's
// and StableLM's prefill shapes): 168-216 GFLOP/s, against 153-208 with kc = 256 throughout (the tile's
// reloads from L3 on wide panels). In the op, against oneDNN capped to AVX2 on the same panels, interleaved:
// 1.01-1.12x (fp16), 0.96-1.28x (bf16); the engine's prefill, 1.00-1.11x (csrc/cpu/cpu_features.h).
#pragma once

#include <cstdint>
#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTLM_PACKED_GEMM 1
#endif

namespace fastlm::cpu {

constexpr int64_t kPackRows = 16;  // weight rows per packed block (the micro-kernel's width: two ymm)

#if defined(FASTLM_PACKED_GEMM)

namespace packed_detail {

constexpr int64_t kMicroRows = 6;   // x rows per micro-kernel: 12 accumulators + 2 loads + 1 broadcast of 16 ymm
constexpr int64_t kMC = 192;        // x rows per chunk: 192 * 1024 * 4 = 768 KB of x at kc = 1024 (L2: 1 MB)
constexpr int64_t kMaxWholeK = 1024;  // K up to this: one k block (no reload of the tile)

// The 8 x 8 block of rows r[0..8) (row stride rs) at column k, transposed into out (row stride 16).
inline void transpose8(const float* r, int64_t rs, float* out) {
  const __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + rs), r2 = _mm256_loadu_ps(r + 2 * rs),
               r3 = _mm256_loadu_ps(r + 3 * rs), r4 = _mm256_loadu_ps(r + 4 * rs),
               r5 = _mm256_loadu_ps(r + 5 * rs), r6 = _mm256_loadu_ps(r + 6 * rs),
               r7 = _mm256_loadu_ps(r + 7 * rs);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(out + 0 * kPackRows, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(out + 1 * kPackRows, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(out + 2 * kPackRows, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(out + 3 * kPackRows, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(out + 4 * kPackRows, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(out + 5 * kPackRows, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(out + 6 * kPackRows, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(out + 7 * kPackRows, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// c[r][0, 16) = (acc ? c[r] : 0) + sum_k a[r][k] * bp[k][0, 16) for r < Rows; a's rows with stride as, c's cs.
template <int Rows>
inline void micro_kernel(const float* a, int64_t as, const float* bp, int64_t kc, float* c, int64_t cs, bool acc) {
  __m256 lo[Rows], hi[Rows];
#pragma GCC unroll 6
  for (int r = 0; r < Rows; ++r) {
    lo[r] = acc ? _mm256_loadu_ps(c + r * cs) : _mm256_setzero_ps();
    hi[r] = acc ? _mm256_loadu_ps(c + r * cs + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp + k * kPackRows), b1 = _mm256_loadu_ps(bp + k * kPackRows + 8);
#pragma GCC unroll 6
    for (int r = 0; r < Rows; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * as + k);
      lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < Rows; ++r) {
    _mm256_storeu_ps(c + r * cs, lo[r]);
    _mm256_storeu_ps(c + r * cs + 8, hi[r]);
  }
}

inline void micro_kernel_rows(int64_t rows, const float* a, int64_t as, const float* bp, int64_t kc, float* c,
                              int64_t cs, bool acc) {
  switch (rows) {
    case 6: return micro_kernel<6>(a, as, bp, kc, c, cs, acc);
    case 5: return micro_kernel<5>(a, as, bp, kc, c, cs, acc);
    case 4: return micro_kernel<4>(a, as, bp, kc, c, cs, acc);
    case 3: return micro_kernel<3>(a, as, bp, kc, c, cs, acc);
    case 2: return micro_kernel<2>(a, as, bp, kc, c, cs, acc);
    default: return micro_kernel<1>(a, as, bp, kc, c, cs, acc);
  }
}

}  // namespace packed_detail

// bp [K, 16] = rows [n, K] (row stride rs, n <= 16) transposed; columns n.. of bp are zero.
inline void pack_rows16(const float* rows, int64_t rs, int64_t n, int64_t K, float* bp) {
  int64_t k = 0;
  if (n == kPackRows) {
    for (; k + 8 <= K; k += 8) {
      packed_detail::transpose8(rows + k, rs, bp + k * kPackRows);
      packed_detail::transpose8(rows + 8 * rs + k, rs, bp + k * kPackRows + 8);
    }
  }
  for (; k < K; ++k)
    for (int64_t j = 0; j < kPackRows; ++j) bp[k * kPackRows + j] = j < n ? rows[j * rs + k] : 0.f;
}

// tile [M, 16 * blocks] (row stride ts) = x [M, K] (row stride xs) @ the packed panel's rows^T; bp holds
// `blocks` blocks of [K, 16] one after another. M, K, blocks > 0.
inline void gemm_packed(const float* x, int64_t xs, int64_t M, const float* bp, int64_t blocks, int64_t K, float* tile,
                        int64_t ts) {
  using namespace packed_detail;
  const int64_t k_blocks = K <= kMaxWholeK ? 1 : (K + 511) / 512;
  const int64_t kc_max = (K + k_blocks - 1) / k_blocks;
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    for (int64_t m0 = 0; m0 < M; m0 += kMC) {
      const int64_t m1 = std::min(M, m0 + kMC);
      for (int64_t b = 0; b < blocks; ++b) {
        const float* bpk = bp + (b * K + k0) * kPackRows;
        for (int64_t m = m0; m < m1; m += kMicroRows)
          micro_kernel_rows(std::min(kMicroRows, m1 - m), x + m * xs + k0, xs, bpk, kc, tile + m * ts + b * kPackRows,
                            ts, k0 > 0);
      }
    }
  }
}

#endif  // FASTLM_PACKED_GEMM

}  // namespace fastlm::cpu
