// add + RMSNorm / LayerNorm on CPU: one pass over memory per row (x, residual read once; y, h written
// once; the row is re-read from cache for the second/third sweep), fp32 statistics.
#include "../checks.h"
#include "../ops.h"
#include "vec_util.h"

namespace fastlm::cpu {
namespace {

// Sweep 1: h = x (+ residual), rounded to T and stored to h_out when there is a residual; returns
// sum(h) (or sum(h^2) when squares). The returned pointer is where h now lives (h_out or x).
template <typename T, bool kSquares>
inline float add_and_sum(const T* x, const T* r, T* h, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t m = std::min(kChunk, n - j);
    fVec a, b;
    IO<T>::load(x + j, m, a, b);
    if (r != nullptr) {
      fVec c, d;
      IO<T>::load(r + j, m, c, d);
      a = a + c;
      b = b + d;
      IO<T>::store_round(h + j, m, a, b);
    }
    mask_tail(m, a, b);
    if (kSquares) {
      acc0 = at::vec::fmadd(a, a, acc0);
      acc1 = at::vec::fmadd(b, b, acc1);
    } else {
      acc0 = acc0 + a;
      acc1 = acc1 + b;
    }
  }
  return hsum(acc0 + acc1);
}

template <typename T, typename W, typename Y>
void rms_rows(const T* x, int64_t xs, const T* r, int64_t rs, const W* w, Y* y, int64_t ys, T* h, int64_t hs,
              int64_t rows, int64_t n, float eps, bool weight_in_fp32) {
  at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * xs;
      const T* rr = r ? r + i * rs : nullptr;
      T* hr = r ? h + i * hs : nullptr;
      Y* yr = y + i * ys;
      const float rstd = rms_rstd(add_and_sum<T, true>(xr, rr, hr, n), n, eps);
      const T* src = r ? hr : xr;
      const fVec vr(rstd);
      for (int64_t j = 0; j < n; j += kChunk) {
        const int64_t m = std::min(kChunk, n - j);
        fVec a, b, wa, wb;
        IO<T>::load(src + j, m, a, b);
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
        IO<Y>::store(yr + j, m, a, b);
      }
    }
  });
}

template <typename T>
void ln_rows(const T* x, int64_t xs, const T* r, int64_t rs, const T* w, const T* bias, T* y, int64_t ys, T* h,
             int64_t hs, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * xs;
      const T* rr = r ? r + i * rs : nullptr;
      T* hr = r ? h + i * hs : nullptr;
      T* yr = y + i * ys;
      const float mean = layer_norm_mean(add_and_sum<T, false>(xr, rr, hr, n), n);
      const T* src = r ? hr : xr;
      const fVec vm(mean);
      fVec acc0(0.f), acc1(0.f);
      for (int64_t j = 0; j < n; j += kChunk) {
        const int64_t m = std::min(kChunk, n - j);
        fVec a, b;
        IO<T>::load(src + j, m, a, b);
        a = a - vm;
        b = b - vm;
        mask_tail(m, a, b);
        acc0 = at::vec::fmadd(a, a, acc0);
        acc1 = at::vec::fmadd(b, b, acc1);
      }
      const fVec vr(layer_norm_rstd(hsum(acc0 + acc1), n, eps));
      for (int64_t j = 0; j < n; j += kChunk) {
        const int64_t m = std::min(kChunk, n - j);
        fVec a, b, wa, wb;
        IO<T>::load(src + j, m, a, b);
        IO<T>::load(w + j, m, wa, wb);
        if (bias) {
          fVec ba, bb;
          IO<T>::load(bias + j, m, ba, bb);
          a = layer_norm_apply(a, vm, vr, wa, ba);
          b = layer_norm_apply(b, vm, vr, wb, bb);
        } else {
          a = layer_norm_apply(a, vm, vr, wa);
          b = layer_norm_apply(b, vm, vr, wb);
        }
        IO<T>::store(yr + j, m, a, b);
      }
    }
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

// y2d / h2d: [rows, N] views of the outputs (h2d undefined without residual).
void run_rms(const at::Tensor& x, const OptT& residual, const at::Tensor& weight, double eps, bool weight_in_fp32,
             const at::Tensor& y2d, const at::Tensor& h2d) {
  const at::Tensor x2 = rows_view(x);
  const at::Tensor r2 = residual ? rows_view(*residual) : at::Tensor();
  const at::Tensor w = weight.contiguous();
  const int64_t rows = x2.size(0), n = x2.size(1);
  if (rows == 0) return;
  const bool w32 = w.scalar_type() == at::kFloat;
  const bool y32 = y2d.scalar_type() == at::kFloat;
  FASTLM_DISPATCH_FLOAT(x.scalar_type(), "add_rms_norm", [&] {
    using T = scalar_t;
    const T* rp = residual ? ptr<T>(r2) : nullptr;
    T* hp = residual ? mptr<T>(h2d) : nullptr;
    const int64_t rs = residual ? row_stride(r2) : 0, hs = residual ? row_stride(h2d) : 0;
    if (w32 && y32) {
      rms_rows<T, float, float>(ptr<T>(x2), row_stride(x2), rp, rs, ptr<float>(w), mptr<float>(y2d),
                                row_stride(y2d), hp, hs, rows, n, static_cast<float>(eps), weight_in_fp32);
    } else if (w32) {
      rms_rows<T, float, T>(ptr<T>(x2), row_stride(x2), rp, rs, ptr<float>(w), mptr<T>(y2d), row_stride(y2d), hp,
                            hs, rows, n, static_cast<float>(eps), weight_in_fp32);
    } else {
      rms_rows<T, T, T>(ptr<T>(x2), row_stride(x2), rp, rs, ptr<T>(w), mptr<T>(y2d), row_stride(y2d), hp, hs, rows,
                        n, static_cast<float>(eps), weight_in_fp32);
    }
  });
}

void run_ln(const at::Tensor& x, const OptT& residual, const at::Tensor& weight, const OptT& bias, double eps,
            const at::Tensor& y2d, const at::Tensor& h2d) {
  const at::Tensor x2 = rows_view(x);
  const at::Tensor r2 = residual ? rows_view(*residual) : at::Tensor();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const int64_t rows = x2.size(0), n = x2.size(1);
  if (rows == 0) return;
  FASTLM_DISPATCH_FLOAT(x.scalar_type(), "add_layer_norm", [&] {
    using T = scalar_t;
    ln_rows<T>(ptr<T>(x2), row_stride(x2), residual ? ptr<T>(r2) : nullptr, residual ? row_stride(r2) : 0,
               ptr<T>(w), bias ? ptr<T>(b) : nullptr, mptr<T>(y2d), row_stride(y2d),
               residual ? mptr<T>(h2d) : nullptr, residual ? row_stride(h2d) : 0, rows, n, static_cast<float>(eps));
  });
}

}  // namespace

// When residual is None, h would be x itself; a functional op may not return an input alias, so it
// returns an empty h and the Python wrapper hands back x.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                double eps, bool weight_in_fp32) {
  check_norm_args(x, residual, weight, std::nullopt, /*weight_any_float=*/true);
  const int64_t n = x.size(-1);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(rms_out_dtype(x, weight, weight_in_fp32)));
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  run_rms(x, residual, weight, eps, weight_in_fp32, y.view({-1, n}), residual ? h.view({-1, n}) : at::Tensor());
  return {y, h};
}

void add_rms_norm_out(const at::Tensor& x, const OptT& residual, const at::Tensor& weight, double eps,
                      bool weight_in_fp32, const at::Tensor& out, const OptT& residual_out) {
  check_norm_args(x, residual, weight, std::nullopt, true);
  check_out("out", out, x.sizes(), rms_out_dtype(x, weight, weight_in_fp32), x);
  TORCH_CHECK(residual.has_value() == residual_out.has_value(),
              "fastlm: add_rms_norm_out needs residual_out exactly when residual is given");
  if (residual_out) check_out("residual_out", *residual_out, x.sizes(), x.scalar_type(), x);
  const int64_t n = x.size(-1);
  run_rms(x, residual, weight, eps, weight_in_fp32, out.view({-1, n}),
          residual_out ? residual_out->view({-1, n}) : at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                  const OptT& bias, double eps) {
  check_norm_args(x, residual, weight, bias, /*weight_any_float=*/false);
  const int64_t n = x.size(-1);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  run_ln(x, residual, weight, bias, eps, y.view({-1, n}), residual ? h.view({-1, n}) : at::Tensor());
  return {y, h};
}

void add_layer_norm_out(const at::Tensor& x, const OptT& residual, const at::Tensor& weight, const OptT& bias,
                        double eps, const at::Tensor& out, const OptT& residual_out) {
  check_norm_args(x, residual, weight, bias, false);
  check_out("out", out, x.sizes(), x.scalar_type(), x);
  TORCH_CHECK(residual.has_value() == residual_out.has_value(),
              "fastlm: add_layer_norm_out needs residual_out exactly when residual is given");
  if (residual_out) check_out("residual_out", *residual_out, x.sizes(), x.scalar_type(), x);
  const int64_t n = x.size(-1);
  run_ln(x, residual, weight, bias, eps, out.view({-1, n}), residual_out ? residual_out->view({-1, n}) : at::Tensor());
}

}  // namespace fastlm::cpu
