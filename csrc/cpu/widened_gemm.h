// GEMMs on weights widened to fp32 panel by panel: y = round_T(x @ W^T + bias + residual), for weights
// whose own format has no fast GEMM on this CPU: 16-bit weights without native 16-bit dot products
// (csrc/cpu/linear.cpp, chosen at run time by csrc/cpu/cpu_features.h) and int8 / int4 weights
// (csrc/cpu/quant_linear.cpp). Both run the fp32 GEMM that fastlm's fp32 path uses (oneDNN's, or ATen's
// addmm: Gemm32Mode in cpu_features.h; single-threaded, one panel a task: oneDNN 88-105 GFLOP/s against
// MKL's 67-100 at these panels' shapes on one Zen 4 core, fp16 prefill of 512 tokens 1.08-1.11x), on fp32
// copies that stay in cache:
//   x: a slice of at most ~kXSliceBytes of fp32 rows [mb, K] (widened once per slice unless x is fp32);
//   W: one parallel region per slice; each task widens a panel of nb rows [nb, K] into its own buffer
//      (the caller's widen_rows: exact for 16-bit weights, q * scale for quantized ones), multiplies it
//      with a single-threaded GEMM (ATen runs a GEMM nested in a parallel region inline) into its own
//      fp32 tile [mb, nb], and writes y's columns of the panel from the tile: bias and residual added in
//      fp32 and rounded once to T, as ATen's addmm rounds its fp32 accumulator.
// One region per slice, not a multi-threaded GEMM per panel: that opened two parallel regions per panel,
// each a wake-up and a barrier of every thread, 3x slower than one fp32 GEMM at M = 512 on a loaded
// 2-core machine, where a descheduled thread stalls a barrier.
// Widening costs (M / mb + 1) * N * K conversions per call against 2 * M * N * K flops.
// On AVX2 builds the panels' GEMM is fastlm's own (csrc/cpu/packed_gemm.h; FASTLM_CPU_PANEL_GEMM): the panel
// is widened 16 rows at a time and packed for its micro-kernel, x is read in place rather than packed again
// for every panel as oneDNN's op does.
#pragma once

#include <c10/core/InferenceMode.h>

#include <optional>
#include <vector>

#include "cpu_features.h"
#include "packed_gemm.h"
#include "vec_util.h"

namespace fastlm::cpu {

// fp32 bytes of one x slice: slices beyond L3 would be re-read from memory by every panel's GEMM
constexpr int64_t kXSliceBytes = 16ll << 20;
// fp32 bytes of one widened weight panel at most (see widened_panel_rows)
constexpr int64_t kPanelBytes = 4ll << 20;

inline int64_t ceil_div(int64_t n, int64_t d) { return (n + d - 1) / d; }


// This thread's scratch buffer `slot` of at least n floats. Kept (and grown) for the thread's lifetime, as a
// caching allocator would keep it: fresh buffers of a few MB come from glibc as fresh mmaps whose every
// page faults in zero-filled on first touch, as costly as the widening itself at prefill sizes.
enum ScratchSlot : int { kPanelSlot = 0, kTileSlot = 1, kXSlot = 2, kAttentionSlot = 3, kRowsSlot = 4, kScratchSlots = 5 };
inline float* thread_scratch(ScratchSlot slot, int64_t n) {
  thread_local std::vector<float> buffers[kScratchSlots];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) {
    b = std::vector<float>();  // freed first: the peak is the new size, not old + new
    b.resize(n);
  }
  return b.data();
}

// Rows of a weight panel: at most ~kPanelBytes, at least two panels per thread where N allows (so that
// a thread descheduled on a loaded machine holds up at most half its share), as even as multiples of
// 16 rows allow (MKL's tile widths).
inline int64_t widened_panel_rows(int64_t N, int64_t K, int64_t threads) {
  const int64_t max_rows = std::max<int64_t>(16, kPanelBytes / (4 * K));
  const int64_t panels = std::max(ceil_div(N, max_rows), std::min(2 * threads, ceil_div(N, 16)));
  return std::min(N, round_up(ceil_div(N, panels), 16));
}

// y[m, n] = round_T(acc[m, n] + bias[n] + res[m, n]) for one tile: acc [rows, cols] (stride as), y and
// res with their row strides; bias (fp32) and res may be null.
template <typename T>
inline void widened_epilogue(const float* acc, int64_t as, const float* bias, const T* res, int64_t rs, T* y,
                             int64_t ys, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* a = acc + i * as;
    const T* r = res ? res + i * rs : nullptr;
    T* o = y + i * ys;
    for (int64_t j = 0; j < cols; j += kChunk) {
      const int64_t m = std::min(kChunk, cols - j);
      fVec va, vb;
      IO<float>::load(a + j, m, va, vb);
      if (bias) {
        fVec ba, bb;
        IO<float>::load(bias + j, m, ba, bb);
        va = va + ba;
        vb = vb + bb;
      }
      if (r) {
        fVec ra, rb;
        IO<T>::load(r + j, m, ra, rb);
        va = va + ra;
        vb = vb + rb;
      }
      IO<T>::store(o + j, m, va, vb);
    }
  }
}

// x [M, K] (row stride xs), W [N, K] given by widen_rows(n0, rows, dst): W's rows [n0, n0 + rows) in fp32
// into dst [rows, K] (row stride K). bias [N] in fp32 or null; res [M, N] (row stride rs) or null; y [M, N]
// (row stride ys). M, N, K > 0.
template <typename T, typename WidenRows>
void gemm_widened(const T* x, int64_t xs, const WidenRows& widen_rows, const float* bias, const T* res, int64_t rs,
                  T* y, int64_t ys, int64_t M, int64_t N, int64_t K) {
  // Every tensor here is scratch (no autograd). at::parallel_for's worker threads do not inherit the
  // caller's InferenceMode: without the guard in each task, a GEMM in a worker thread mixing its own
  // tensors with the caller's inference tensors raises "Inplace update to inference tensor outside
  // InferenceMode" (the engine runs under torch.inference_mode).
  c10::InferenceMode no_autograd;
  constexpr bool kFp32 = std::is_same_v<T, float>;
  const bool packed = panel_gemm_packed();    // fastlm's own panel GEMM (csrc/cpu/packed_gemm.h), else:
  const bool onednn = gemm32_uses_onednn();  // the panels' GEMM library, as linear's own fp32 GEMMs
  const int64_t threads = std::max(1, at::get_num_threads());
  // x slices as even as multiples of 16 rows allow (MKL ran a 341-row slice 1.7x slower per flop than
  // a 512-row one)
  const int64_t max_mb = std::max<int64_t>(16, kXSliceBytes / (4 * K));
  const int64_t mb = std::min(M, round_up(ceil_div(M, ceil_div(M, max_mb)), 16));
  const int64_t nb = widened_panel_rows(N, K, threads);
  const int64_t panels = ceil_div(N, nb);
  float* x_buf = kFp32 ? nullptr : thread_scratch(kXSlot, mb * K);
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    const int64_t mr = std::min(mb, M - m0);
    const float* xf = nullptr;
    int64_t xfs = K;
    if constexpr (kFp32) {
      xf = x + m0 * xs;
      xfs = xs;
    } else {
      at::parallel_for(0, mr, grain_for(K, 16384), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) convert_row(x + (m0 + i) * xs, x_buf + i * K, K);
      });
      xf = x_buf;
    }
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode task_no_autograd;
      const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
      const at::Tensor x2 = packed ? at::Tensor() : at::from_blob(const_cast<float*>(xf), {mr, K}, {xfs, 1}, f32);
      // packed: the panel holds whole blocks of kPackRows rows, and so does the tile [mr, width]
      const int64_t width = packed ? round_up(nb, kPackRows) : nb;
      float* panel = thread_scratch(kPanelSlot, width * K);
      float* tile = packed || !onednn ? thread_scratch(kTileSlot, mr * width) : nullptr;  // (oneDNN allocates)
      float* rows16 = packed ? thread_scratch(kRowsSlot, kPackRows * K) : nullptr;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * nb, nr = std::min(nb, N - n0);
        at::Tensor out;  // [mr, nr] fp32: the tile, or oneDNN's output
        if (packed) {  // rows widened 16 at a time into rows16 and packed into the panel
#if defined(FASTLM_PACKED_GEMM)
          const int64_t blocks = ceil_div(nr, kPackRows);
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t rows = std::min(kPackRows, nr - b * kPackRows);
            widen_rows(n0 + b * kPackRows, rows, rows16);
            pack_rows16(rows16, K, rows, K, panel + b * kPackRows * K);
          }
          gemm_packed(xf, xfs, mr, panel, blocks, K, tile, blocks * kPackRows);
          out = at::from_blob(tile, {mr, nr}, {blocks * kPackRows, 1}, f32);
#endif
        } else {  // the GEMMs run single-threaded inside this parallel region
          widen_rows(n0, nr, panel);
          const at::Tensor w = at::from_blob(panel, {nr, K}, f32);
          if (onednn) {
            out = onednn_linear(x2, w, std::nullopt, std::nullopt);
          } else {
            out = at::from_blob(tile, {mr, nr}, f32);
            at::mm_out(out, x2, w.t());  // panel^T: [K, nr]
          }
        }
        widened_epilogue<T>(out.const_data_ptr<float>(), out.stride(0), bias ? bias + n0 : nullptr,
                            res ? res + m0 * rs + n0 : nullptr, rs, y + m0 * ys + n0, ys, mr, nr);
      }
    });
  }
}

// linear / quant_linear beyond decode sizes: y [out_shape] = round_T(x @ W^T + bias + residual) with x's rows xr
// [M, K] (M, N, K > 0), the tensors' side of gemm_widened: y allocated, bias widened to fp32, residual's rows,
// x's dtype dispatched. make_widen_rows(T{}) returns gemm_widened's widen_rows for x's dtype T.
template <typename MakeWidenRows>
at::Tensor linear_widened(const char* op, const Rows& xr, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, const std::vector<int64_t>& out_shape, int64_t N,
                          int64_t K, const MakeWidenRows& make_widen_rows) {
  at::Tensor y = at::empty(out_shape, xr.data.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor b32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const Rows rr = residual ? rows_of(*residual) : Rows{};
  FASTLM_DISPATCH_FLOAT(xr.data.scalar_type(), op, [&] {
    using T = scalar_t;
    gemm_widened<T>(reinterpret_cast<const T*>(xr.data.const_data_ptr()), xr.stride, make_widen_rows(T{}),
                    bias ? b32.const_data_ptr<float>() : nullptr,
                    residual ? reinterpret_cast<const T*>(rr.data.const_data_ptr()) : nullptr, rr.stride,
                    reinterpret_cast<T*>(y.data_ptr()), N, xr.rows, N, K);
  });
  return y;
}

}  // namespace fastlm::cpu
