// add + RMSNorm / LayerNorm on CPU: one pass over memory per row (x, residual read once; y, h written
// once; the row is re-read from cache for the second/third sweep), fp32 statistics (row_norm.h).
#include "../checks.h"
#include "../op_list.h"
#include "row_norm.h"

#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

// For each row (in parallel): sweep 1 of row_norm.h (h = x + residual, stored; sum of h, or of h^2
// when kSquares), then f(stream, src, sum, y_row) with src the fp32 row of h (of x without a
// residual). For 16-bit T the row is kept in a per-task fp32 scratch buffer (L1-resident at these
// widths), so the later sweeps pay no conversions; for fp32 they read the h / x row itself, unless the
// outputs are streamed (kStreamOutBytes): a streamed h is not in the cache to be read back. f gets
// std::true_type / std::false_type for its stores (store_chunk).
template <bool kSquares, typename T, typename Y, typename F>
void for_each_row(const T* x, int64_t xs, const T* r, int64_t rs, Y* y, int64_t ys, T* h, int64_t hs, int64_t rows,
                  int64_t n, const F& f) {
  const int64_t out_bytes = rows * n * (static_cast<int64_t>(sizeof(Y)) + (r ? sizeof(T) : 0));
  with_stream(out_bytes >= kStreamOutBytes, [&](auto stream) {
    constexpr bool kStream = decltype(stream)::value;
    constexpr bool kScratch = kStream || !std::is_same_v<T, float>;
    // A second thread pays for itself from ~16K elements each (8 rows of 4096: 12.5 -> 8.8 us; 8 rows of
    // 2560 split in two ran no faster).
    at::parallel_for(0, rows, grain_for_rows(rows, n, 16384), [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(kScratch ? n : 0);
      for (int64_t i = begin; i < end; ++i) {
        const T* xr = x + i * xs;
        const T* rr = r ? r + i * rs : nullptr;
        T* hr = r ? h + i * hs : nullptr;
        if constexpr (kScratch) {
          const float sum = add_and_sum<T, kSquares, kStream>(xr, rr, hr, n, scratch.data());
          f(stream, scratch.data(), sum, y + i * ys);
        } else {
          const float sum = add_and_sum<T, kSquares>(xr, rr, hr, n);
          f(stream, reinterpret_cast<const float*>(r ? hr : xr), sum, y + i * ys);
        }
      }
      if constexpr (kStream) stream_fence();
    });
  });
}

template <typename T, typename W, typename Y>
void rms_rows(const T* x, int64_t xs, const T* r, int64_t rs, const W* w, Y* y, int64_t ys, T* h, int64_t hs,
              int64_t rows, int64_t n, float eps, bool weight_in_fp32) {
  for_each_row<true>(x, xs, r, rs, y, ys, h, hs, rows, n, [&](auto stream, const float* src, float sum_sq, Y* yr) {
    const fVec vr(rms_rstd(sum_sq, n, eps));
    for (int64_t j = 0; j < n; j += kChunk) {
      const int64_t m = std::min(kChunk, n - j);
      fVec a, b, wa, wb;
      IO<float>::load(src + j, m, a, b);
      IO<W>::load(w + j, m, wa, wb);
      if (weight_in_fp32) {  // Helium: (w.float() * (h * rstd)).to(T)
        a = rms_apply_weight_fp32(a, vr, wa);
        b = rms_apply_weight_fp32(b, vr, wb);
      } else {  // Arcee: w * (h * rstd).to(T), in the promoted dtype Y
        a = a * vr;
        b = b * vr;
        IO<T>::round(a, b);
        a = a * wa;
        b = b * wb;
      }
      store_chunk<decltype(stream)::value>(yr + j, m, a, b);
    }
  });
}

template <typename T, typename W>
void ln_rows(const T* x, int64_t xs, const T* r, int64_t rs, const W* w, const W* bias, T* y, int64_t ys, T* h,
             int64_t hs, int64_t rows, int64_t n, float eps) {
  for_each_row<false>(x, xs, r, rs, y, ys, h, hs, rows, n, [&](auto stream, const float* src, float sum, T* yr) {
    layer_norm_row<decltype(stream)::value>(src, layer_norm_mean(sum, n), w, bias, yr, n, eps);
  });
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// 16-bit weights are widened to fp32 once per call (exact) when there are enough rows to repay the
// allocation, so the row loops do not convert them for every row; a decode step (a few rows) reads
// them as they are. A weight of another dtype than x (fp32 for Helium) is always read as fp32.
constexpr int64_t kWidenWeightRows = 16;

template <typename T>
bool widen_weights(const at::Tensor& weight, int64_t rows) {
  return weight.scalar_type() != c10::CppTypeToScalarType<T>::value || rows >= kWidenWeightRows;
}

// y, h: contiguous outputs of x's shape (h undefined without residual).
void run_rms(const at::Tensor& x, const OptT& residual, const at::Tensor& weight, double eps, bool weight_in_fp32,
             const at::Tensor& y, const at::Tensor& h) {
  const Rows xr = rows_of(x);
  const Rows rr = residual ? rows_of(*residual) : Rows{};
  const int64_t rows = xr.rows, n = xr.n;
  if (rows == 0) return;
  const bool y32 = y.scalar_type() == at::kFloat;
  FASTLM_DISPATCH_FLOAT(x.scalar_type(), "add_rms_norm", [&] {
    using T = scalar_t;
    const T* rp = residual ? ptr<T>(rr.data) : nullptr;
    T* hp = residual ? mptr<T>(h) : nullptr;
    // W: float (widened) or T; Y: float (y32) or T
    auto run = [&](auto* w, auto* yp) {
      rms_rows<T>(ptr<T>(xr.data), xr.stride, rp, rr.stride, w, yp, n, hp, n, rows, n, static_cast<float>(eps),
                  weight_in_fp32);
    };
    const bool widen = widen_weights<T>(weight, rows);
    const at::Tensor w = widen ? weight.to(at::kFloat).contiguous() : weight.contiguous();
    if (widen && y32) {
      run(ptr<float>(w), mptr<float>(y));
    } else if (widen) {
      run(ptr<float>(w), mptr<T>(y));
    } else if (y32) {
      run(ptr<T>(w), mptr<float>(y));
    } else {
      run(ptr<T>(w), mptr<T>(y));
    }
  });
}

void run_ln(const at::Tensor& x, const OptT& residual, const at::Tensor& weight, const OptT& bias, double eps,
            const at::Tensor& y, const at::Tensor& h) {
  const Rows xr = rows_of(x);
  const Rows rr = residual ? rows_of(*residual) : Rows{};
  const int64_t rows = xr.rows, n = xr.n;
  if (rows == 0) return;
  FASTLM_DISPATCH_FLOAT(x.scalar_type(), "add_layer_norm", [&] {
    using T = scalar_t;
    auto run = [&](auto* w, auto* b) {
      ln_rows<T>(ptr<T>(xr.data), xr.stride, residual ? ptr<T>(rr.data) : nullptr, rr.stride, w, b, mptr<T>(y), n,
                 residual ? mptr<T>(h) : nullptr, n, rows, n, static_cast<float>(eps));
    };
    // weight and bias have x's dtype (checked): widened together or not at all
    if (widen_weights<T>(weight, rows)) {
      const at::Tensor w = weight.to(at::kFloat).contiguous();
      const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
      run(ptr<float>(w), bias ? ptr<float>(b) : nullptr);
    } else {
      const at::Tensor w = weight.contiguous();
      const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
      run(ptr<T>(w), bias ? ptr<T>(b) : nullptr);
    }
  });
}

}  // namespace

// When residual is None, h would be x itself; a functional op may not return an input alias, so it
// returns an empty h and the Python wrapper hands back x.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                double eps, bool weight_in_fp32) {
  check_norm_args(x, residual, weight, std::nullopt, eps, /*weight_any_float=*/true);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(rms_out_dtype(x, weight, weight_in_fp32)));
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  run_rms(x, residual, weight, eps, weight_in_fp32, y, residual ? h : at::Tensor());
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                  const OptT& bias, double eps) {
  check_norm_args(x, residual, weight, bias, eps, /*weight_any_float=*/false);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  run_ln(x, residual, weight, bias, eps, y, residual ? h : at::Tensor());
  return {y, h};
}

}  // namespace fastlm::cpu
