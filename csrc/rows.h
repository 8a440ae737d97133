// [rows, N] layouts of tensors whose last dim is N, shared by the CPU kernels and the CUDA binding.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/TensorUtils.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace fastlm {

// t's [rows, N] layout (N its last dim, rows the product of the leading dims) and, when the last dim
// is contiguous (or single) and the leading dims collapse into one row stride, that stride.
struct RowLayout {
  int64_t rows = 0, n = 0;
  std::optional<int64_t> stride;
};
inline RowLayout row_layout(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  if (t.stride(-1) == 1 || n == 1) {
    if (auto st = at::detail::computeStride(t.sizes(), t.strides(), std::vector<int64_t>{rows, n})) {
      return {rows, n, rows > 1 ? (*st)[0] : n};
    }
  }
  return {rows, n, std::nullopt};
}

// The [rows, N] geometry of t for a row kernel, without creating a view: through the dispatcher and
// autograd's view tracking each view costs ~0.2 us, and a decode-sized kernel is ~0.5 us. `data` is t
// itself when its rows collapse into one stride (row_layout), else a contiguous copy it keeps alive.
struct Rows {
  at::Tensor data;
  int64_t rows = 0, n = 0, stride = 0;
};
inline Rows rows_of(const at::Tensor& t) {
  const RowLayout l = row_layout(t);
  if (l.stride) return {t, l.rows, l.n, *l.stride};
  return {t.contiguous(), l.rows, l.n, l.n};
}

// rows_of as a 2-D tensor [rows, N] (a view of t, or of its contiguous copy), for code that needs one.
inline at::Tensor rows_view(const at::Tensor& t) {
  const Rows r = rows_of(t);
  return r.data.as_strided({r.rows, r.n}, {r.stride, 1});
}
inline int64_t row_stride(const at::Tensor& t2d) { return t2d.size(0) > 1 ? t2d.stride(0) : t2d.size(1); }

// An elementwise row kernel in place: run(rows2d) on t's own [rows, N] memory; where t has no such
// view (row_layout finds no row stride) or its rows overlap one another (a row stride below N, as in
// an expanded or as_strided tensor: a row would read what another row already overwrote),
// dst.copy_(aside()) instead, with aside() computing the result out of place (dst: the part of t the
// result replaces), which is what the references do. A dst whose own elements alias (a zero stride)
// gets torch's error for in-place ops on such tensors, as the references' copy_ raises.
template <typename Run, typename Aside>
inline void run_in_place(const at::Tensor& t, const at::Tensor& dst, const Run& run, const Aside& aside) {
  at::assert_no_internal_overlap(dst);
  const RowLayout l = row_layout(t);
  if (l.stride && *l.stride >= l.n) {  // rows <= 1 report a stride of n
    run(t.as_strided({l.rows, l.n}, {*l.stride, 1}));
  } else {
    dst.copy_(aside());
  }
}

}  // namespace fastlm
