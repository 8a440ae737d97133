// [rows, N] views of tensors whose last dim is N, shared by the CPU kernels and the CUDA binding.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>

#include <algorithm>
#include <vector>

namespace fastlm {

// 2-D view [rows, N] without a copy when the leading dims collapse into one row stride (any row
// stride is fine); copies only when the last dim is not contiguous or the leading dims cannot be
// collapsed.
inline at::Tensor rows_view(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  at::Tensor c = (t.stride(-1) == 1 || n == 1) ? t : t.contiguous();
  return c.reshape({-1, n});
}
inline int64_t row_stride(const at::Tensor& t2d) { return t2d.size(0) > 1 ? t2d.stride(0) : t2d.size(1); }

// The [rows, N] geometry of t (N its last dim) for a row kernel, read off its sizes and strides, as
// rows_view's but without creating a view: through the dispatcher and autograd's view tracking each
// view costs ~0.2 us, and a decode-sized kernel is ~0.5 us. `data` is t itself when its last dim is
// contiguous and its leading dims collapse into one row stride, else a contiguous copy it keeps alive.
struct Rows {
  at::Tensor data;
  int64_t rows = 0, n = 0, stride = 0;
};
inline Rows rows_of(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  if (t.stride(-1) == 1 || n == 1) {
    if (auto st = at::detail::computeStride(t.sizes(), t.strides(), std::vector<int64_t>{rows, n})) {
      return {t, rows, n, rows > 1 ? (*st)[0] : n};
    }
  }
  return {t.contiguous(), rows, n, n};
}

// An elementwise row kernel in place: run(rows2d) on t's own [rows, N] memory; where t has no such
// view (last dim strided, or leading dims that do not collapse into one row stride), dst.copy_(aside())
// instead, with aside() computing the result out of place (dst: the part of t the result replaces).
template <typename Run, typename Aside>
inline void run_in_place(const at::Tensor& t, const at::Tensor& dst, const Run& run, const Aside& aside) {
  const int64_t n = t.size(-1);
  const std::vector<int64_t> shape2d{t.numel() / std::max<int64_t>(n, 1), n};
  if ((t.stride(-1) == 1 || n == 1) && at::detail::computeStride(t.sizes(), t.strides(), shape2d)) {
    run(t.view(shape2d));  // the same stride computation as the check: a view of t's memory
  } else {
    dst.copy_(aside());
  }
}

}  // namespace fastlm
