// Decode-shaped linear on CPU: y = x @ W^T (+ bias) (+ residual) for a few rows of x (see kMaxGemvRows*).
//
// Why: at decode, every projection is a matrix-vector product whose cost is streaming W from DRAM
// once. ATen's small-M path reaches ~14 GB/s on this project's 2-core machines; reading W in order
// reaches 30-50 GB/s, and decode time is mostly these products.
//
// Algorithm: x is copied once to a scratch [M, K] (fp32, or 16-bit x as is on AVX-512: DecodeX,
// csrc/cpu/vec_util.h),
// rows zero-padded to a multiple of 32. Each thread takes a contiguous range of W's rows in blocks
// of 8 and reads each row in full, in memory order (a block is contiguous, so the thread makes one
// sequential pass over its share of W), accumulating up to 4 rows of x at once in fp32 registers
// (two accumulators each). More rows of x re-read the block from L1/L2, so W comes from memory
// exactly once; 16-bit rows are software-prefetched a few lines ahead (prefetch_stream, vec_util.h). The
// epilogue adds bias and residual in fp32 and rounds once, as ATen's addmm does.
// Larger M is a GEMM with reuse that ATen (oneDNN / MKL) already does well: it goes there, except for
// 16-bit types on CPUs without native 16-bit dot products (cpu_features.h, read at run time), where
// ATen's 16-bit GEMM is several times slower than its fp32 one: there the fp32 GEMM runs on weight
// panels widened in cache (widened_gemm.h).
#include "../checks.h"
#include "../op_list.h"
#include "cpu_features.h"
#include "vec_util.h"
#include "widened_gemm.h"

#include <type_traits>
#include <vector>

#if defined(FASTLM_AVX512_BF16)
#include <immintrin.h>
#endif

namespace fastlm::cpu {
namespace {

// Rows of x up to which the streaming kernel runs: measured on Zen 4 (2 cores) against ATen, fp32 wins
// ~2x through 16 rows; 16-bit types win at 1-4 rows and lose from 8 (oneDNN's bf16 GEMM takes over).
constexpr int64_t kMaxGemvRowsFp32 = 16;
constexpr int64_t kMaxGemvRows16 = 4;
// ... and where the 16-bit GEMM runs widened to fp32 (no native 16-bit dot products, cpu_features.h):
// against the widened GEMM, the streaming kernel won at 8 rows (1.0-1.2x) and tied or lost from 16
// (0.75-1.0x at 16, 0.6-0.95x at 32) on the E2E / 1.6B shapes (AVX2 build, ATen and oneDNN capped to
// AVX2, 2 threads, Zen 4).
constexpr int64_t kMaxGemvRows16Widened = 8;
constexpr int64_t kRowsPerStep = 8;  // W rows per block (read in order; re-read from cache per x tile)
constexpr int kMaxXRows = 4;         // rows of x per register tile (kChains accumulators each)
// out[r][i] = W[n0 + r, :] . x[m0 + i, :] for the block's rows, MR rows of x. The rows are read one
// after another: a block is contiguous in W, so this is one sequential stream, which the hardware
// prefetchers follow at full bandwidth (interleaving the rows' streams measured ~40% slower at K = 768).
// kChains accumulators a row of x, enough FMAs in flight to hide their latency (4 cycles on Zen): with
// 2 at batch 1 the loop was bound by it, at one 16-bit chunk (16 elements on AVX2) per 4 cycles.
template <int MR>
constexpr int kChains = MR <= 2 ? 4 : 2;

template <typename T, typename XT, int MR>
inline void gemv_tile(const T* const w_rows[kRowsPerStep], const XT* xt, int64_t xk, int64_t K,
                      float out[kRowsPerStep][kMaxXRows]) {
  constexpr int C = kChains<MR>;
  static_assert(C % 2 == 0, "a 16-bit chunk fills two chains");
  for (int r = 0; r < kRowsPerStep; ++r) {
    const T* wr = w_rows[r];
    fVec acc[MR][C];
    for (int i = 0; i < MR; ++i) {
      for (int c = 0; c < C; ++c) acc[i][c] = fVec(0.f);
    }
    int64_t k = 0;
    for (; k + C * kF <= K; k += C * kF) {
      if constexpr (sizeof(T) == 2) prefetch_stream<C * kF * sizeof(T)>(wr + k);
      for (int c = 0; c < C; c += 2) {
        fVec wa, wb;
        IO<T>::load(wr + k + c * kF, wa, wb);
        for (int i = 0; i < MR; ++i) {
          fVec xa, xb;
          IO<XT>::load(xt + i * xk + k + c * kF, xa, xb);
          acc[i][c] = at::vec::fmadd(wa, xa, acc[i][c]);
          acc[i][c + 1] = at::vec::fmadd(wb, xb, acc[i][c + 1]);
        }
      }
    }
    for (; k < K; k += kChunk) {  // the last < C * kF elements (x is zero-padded to a multiple of 32)
      const int64_t m = std::min(kChunk, K - k);
      fVec wa, wb;
      IO<T>::load(wr + k, m, wa, wb);  // tail lanes zero
      for (int i = 0; i < MR; ++i) {
        fVec xa, xb;
        IO<XT>::load(xt + i * xk + k, xa, xb);
        acc[i][0] = at::vec::fmadd(wa, xa, acc[i][0]);
        acc[i][1] = at::vec::fmadd(wb, xb, acc[i][1]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      fVec sum = acc[i][0];
      for (int c = 1; c < C; ++c) sum = sum + acc[i][c];
      out[r][i] = hsum(sum);
    }
  }
}

#if defined(FASTLM_AVX512_BF16)
// bf16 weights and x on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids): vdpbf16ps multiplies bf16
// pairs exactly and accumulates in fp32, 32 elements per instruction with no conversions, which
// keeps the loop bound by memory rather than by the widening shifts of the generic path. x stays
// bf16 (it is bf16 already, so this is exact); xb rows are zero-padded to a multiple of 32.
template <int MR>
inline void gemv_tile_bf16(const at::BFloat16* const w_rows[kRowsPerStep], const at::BFloat16* xb, int64_t xk,
                           int64_t K, float out[kRowsPerStep][kMaxXRows]) {
  for (int r = 0; r < kRowsPerStep; ++r) {  // rows one after another, as in gemv_tile
    const at::BFloat16* wr = w_rows[r];
    __m512 acc0[MR], acc1[MR];
    for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      prefetch_stream<128>(wr + k);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k), w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
      for (int i = 0; i < MR; ++i) {
        acc0[i] = _mm512_dpbf16_ps(acc0[i], w0, (__m512bh)_mm512_loadu_si512(xb + i * xk + k));
        acc1[i] = _mm512_dpbf16_ps(acc1[i], w1, (__m512bh)_mm512_loadu_si512(xb + i * xk + k + 32));
      }
    }
    for (; k < K; k += 32) {
      const int64_t m = std::min<int64_t>(32, K - k);
      const __mmask32 mask = m == 32 ? ~__mmask32(0) : (__mmask32(1) << m) - 1;
      const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + k);
      for (int i = 0; i < MR; ++i) acc0[i] = _mm512_dpbf16_ps(acc0[i], w0, (__m512bh)_mm512_loadu_si512(xb + i * xk + k));
    }
    for (int i = 0; i < MR; ++i) out[r][i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i]));
  }
}
#endif

// One register tile: the bf16 dot-product instructions where built with them, else the fp32 path.
template <typename T, typename XT, int MR>
inline void tile(const T* const w_rows[kRowsPerStep], const XT* xt, int64_t xk, int64_t K,
                 float out[kRowsPerStep][kMaxXRows]) {
#if defined(FASTLM_AVX512_BF16)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    gemv_tile_bf16<MR>(w_rows, xt, xk, K, out);
    return;
  }
#endif
  gemv_tile<T, XT, MR>(w_rows, xt, xk, K, out);
}

template <typename T>
void gemv(const T* x, int64_t xs, const T* w, int64_t ws, const T* bias, const T* res, int64_t rs, T* y, int64_t ys,
          int64_t M, int64_t N, int64_t K) {
  // x in the scratch's dtype (DecodeX; always T for the bf16 dot-product tile), each row zero-padded to a
  // whole number of 32-element chunks so the tile loads of x need no masks.
  const int64_t xk = round_up(K, 32);
  using XT = DecodeX<T>;
  std::vector<XT> xt(M * xk, XT(0.f));
  for (int64_t i = 0; i < M; ++i) convert_row(x + i * xs, xt.data() + i * xk, K);

  const int64_t blocks = (N + kRowsPerStep - 1) / kRowsPerStep;
  const int64_t grain = grain_for(K, 16384);  // >= ~64 KB of W per task
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float out[kRowsPerStep][kMaxXRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kRowsPerStep;
      const T* w_rows[kRowsPerStep];
      for (int r = 0; r < kRowsPerStep; ++r) w_rows[r] = w + std::min(n0 + r, N - 1) * ws;  // tail: repeat
      for (int64_t m0 = 0; m0 < M; m0 += kMaxXRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxXRows, M - m0));
        const XT* xt_m = xt.data() + m0 * xk;
        static_assert(kMaxXRows == 4, "one tile instantiation per row count below");
        switch (mr) {
          case 1: tile<T, XT, 1>(w_rows, xt_m, xk, K, out); break;
          case 2: tile<T, XT, 2>(w_rows, xt_m, xk, K, out); break;
          case 3: tile<T, XT, 3>(w_rows, xt_m, xk, K, out); break;
          default: tile<T, XT, 4>(w_rows, xt_m, xk, K, out); break;
        }
        for (int r = 0; r < kRowsPerStep && n0 + r < N; ++r) {
          const int64_t n = n0 + r;
          const float b = bias ? IO<T>::to_float(bias[n]) : 0.f;
          for (int i = 0; i < mr; ++i) {
            const int64_t row = m0 + i;
            float v = out[r][i] + b;
            if (res) v += IO<T>::to_float(res[row * rs + n]);
            y[row * ys + n] = static_cast<T>(v);
          }
        }
      }
    }
  });
}

// fp32 y [M, N] = x2 @ W^T (+ bias) (+ residual) by oneDNN's matmul (cpu_features.h: onednn_linear), faster
// than addmm's MKL at prefill shapes (Gemm32Mode has the numbers); nullopt where the mode or this torch says
// addmm: 16-bit x, an empty product, or a layout the op does not take as it is (a transposed weight).
std::optional<at::Tensor> onednn_linear_f32(const at::Tensor& x2, const at::Tensor& weight, const OptT& bias,
                                            const OptT& residual) {
  if (x2.scalar_type() != at::kFloat || x2.numel() == 0 || weight.numel() == 0 || !gemm32_uses_onednn() ||
      weight.stride(1) != 1 || x2.stride(1) != 1)
    return std::nullopt;
  return onednn_linear(x2, weight, bias, residual ? OptT(residual->reshape({x2.size(0), weight.size(0)})) : OptT());
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const OptT& bias, const OptT& residual) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastlm: x must be [..., K], got ", x.sizes());
  check_like("weight", weight, x, "x");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(-1),
                    "fastlm: weight must be [N, K] with K = x.size(-1) = ", x.size(-1), ", got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  const std::vector<int64_t> out_shape = projection_out_shape(x, N, bias, residual);
  const Rows xr = rows_of(x);  // no view on the decode path (see rows_of)
  const int64_t M = xr.rows;
  const bool is16 = x.scalar_type() != at::kFloat;
  // 16-bit beyond the native threshold, where ATen's 16-bit GEMM is slow: the fp32 GEMM on widened panels
  const bool widen = is16 && M > kMaxGemvRows16 && N > 0 && K > 0 && widen_gemm16(x.scalar_type());
  const int64_t max_rows = !is16 ? kMaxGemvRowsFp32 : widen ? kMaxGemvRows16Widened : kMaxGemvRows16;
  if (widen && M > max_rows) {
    const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
    const int64_t ws = N > 1 ? w.stride(0) : K;
    return linear_widened("linear", xr, bias, residual, out_shape, N, K, [&](auto tag) {
      using T = decltype(tag);  // x's dtype, the weight's too
      const T* wp = reinterpret_cast<const T*>(w.const_data_ptr());
      return [wp, ws, K](int64_t n0, int64_t rows, float* dst) {
        for (int64_t j = 0; j < rows; ++j) convert_row(wp + (n0 + j) * ws, dst + j * K, K);
      };
    });
  }
  if (M > max_rows || M == 0 || K == 0) {  // a real GEMM (or nothing to stream): oneDNN's or ATen's
    const at::Tensor x2 = xr.data.as_strided({M, K}, {xr.stride, 1});
    if (auto y = onednn_linear_f32(x2, weight, bias, residual)) return y->view(out_shape);
    at::Tensor y;
    if (residual && !bias) {
      y = at::addmm(residual->reshape({M, N}), x2, weight.t());  // not -1: ambiguous when N = 0
    } else {
      y = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
      if (residual) y.add_(residual->reshape({M, N}));
    }
    return y.view(out_shape);
  }
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const Rows rr = residual ? rows_of(*residual) : Rows{};
  FASTLM_DISPATCH_FLOAT(x.scalar_type(), "linear", [&] {
    using T = scalar_t;
    gemv<T>(reinterpret_cast<const T*>(xr.data.const_data_ptr()), xr.stride,
            reinterpret_cast<const T*>(w.const_data_ptr()), N > 1 ? w.stride(0) : K,
            bias ? reinterpret_cast<const T*>(b.const_data_ptr()) : nullptr,
            residual ? reinterpret_cast<const T*>(rr.data.const_data_ptr()) : nullptr, rr.stride,
            reinterpret_cast<T*>(y.data_ptr()), N, M, N, K);
  });
  return y;
}

}  // namespace fastlm::cpu
