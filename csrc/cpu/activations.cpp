// MLP epilogues on CPU: swiglu ([..., 2I] -> silu(gate) * up) and relu2, fp32 math, one rounding.
//
// Each also runs in place on the GEMM output it consumes (swiglu_ writes into the gate half, relu2_
// into x), as the fused MLP calls them: no output allocation, whose page faults cost as much as the
// kernel's own traffic at prefill sizes, and the lines written were just read, so they are in cache
// (no read-for-ownership). The row loops read each chunk before writing the same (or an earlier)
// address, so out == in is safe.
#include "../checks.h"
#include "../op_list.h"
#include "vec_util.h"

#include <type_traits>

namespace fastlm::cpu {
namespace {

template <bool kStream, typename T>
void swiglu_rows(const T* in, int64_t is, T* out, int64_t os, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, grain_for(3 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = in + i * is;
      const T* u = g + inter;
      T* o = out + i * os;
      for (int64_t j = 0; j < inter; j += kChunk) {
        const int64_t m = std::min(kChunk, inter - j);
        fVec ga, gb, ua, ub;
        IO<T>::load(g + j, m, ga, gb);
        IO<T>::load(u + j, m, ua, ub);
        store_chunk<kStream>(o + j, m, silu_mul(ga, ua), silu_mul(gb, ub));
      }
    }
    if constexpr (kStream) stream_fence();
  });
}

template <bool kStream, typename T>
void relu2_rows(const T* in, int64_t is, T* out, int64_t os, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, grain_for(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* x = in + i * is;
      T* o = out + i * os;
      for (int64_t j = 0; j < n; j += kChunk) {
        const int64_t m = std::min(kChunk, n - j);
        fVec a, b;
        IO<T>::load(x + j, m, a, b);
        store_chunk<kStream>(o + j, m, fastlm::relu2(a), fastlm::relu2(b));
      }
    }
    if constexpr (kStream) stream_fence();
  });
}

// Out-of-place outputs of kStreamOutBytes and more are streamed (store_chunk). In place, the lines
// written were just read, so they are in the cache already: no read-for-ownership to save.
inline bool stream_output(const Rows& in, const void* out, int64_t out_bytes) {
  return out != in.data.const_data_ptr() && out_bytes >= kStreamOutBytes;
}

// in: [rows, 2I]; out: [rows, I] at out_stride (may be in's gate half).
void run_swiglu(const Rows& in, void* out, int64_t out_stride) {
  const int64_t rows = in.rows, inter = in.n / 2;
  if (rows == 0 || inter == 0) return;
  FASTLM_DISPATCH_FLOAT(in.data.scalar_type(), "swiglu", [&] {
    with_stream(stream_output(in, out, rows * inter * in.data.element_size()), [&](auto stream) {
      swiglu_rows<decltype(stream)::value>(reinterpret_cast<const scalar_t*>(in.data.const_data_ptr()), in.stride,
                                           static_cast<scalar_t*>(out), out_stride, rows, inter);
    });
  });
}

// in and out: [rows, N] (out at out_stride; may be in).
void run_relu2(const Rows& in, void* out, int64_t out_stride) {
  const int64_t rows = in.rows, n = in.n;
  if (rows == 0 || n == 0) return;
  FASTLM_DISPATCH_FLOAT(in.data.scalar_type(), "relu2", [&] {
    with_stream(stream_output(in, out, rows * n * in.data.element_size()), [&](auto stream) {
      relu2_rows<decltype(stream)::value>(reinterpret_cast<const scalar_t*>(in.data.const_data_ptr()), in.stride,
                                          static_cast<scalar_t*>(out), out_stride, rows, n);
    });
  });
}

}  // namespace

at::Tensor swiglu(const at::Tensor& gate_up) {
  at::Tensor out = at::empty(swiglu_out_shape(gate_up), gate_up.options());
  if (out.numel() == 0) return out;
  run_swiglu(rows_of(gate_up), out.data_ptr(), out.size(-1));
  return out;
}

void swiglu_(const at::Tensor& gate_up) {
  swiglu_out_shape(gate_up);
  if (gate_up.numel() == 0) return;
  run_in_place(gate_up, gate_up.narrow(-1, 0, gate_up.size(-1) / 2),
               [](const at::Tensor& in2) {
                 const Rows r = rows_of(in2);
                 run_swiglu(r, r.data.data_ptr(), r.stride);  // into the gate half: same start and stride
               },
               [&] { return swiglu(gate_up); });
}

at::Tensor relu2(const at::Tensor& x) {
  check_relu2_input(x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  run_relu2(rows_of(x), out.data_ptr(), out.size(-1));
  return out;
}

void relu2_(const at::Tensor& x) {
  check_relu2_input(x);
  if (x.numel() == 0) return;
  run_in_place(
      x, x,
      [](const at::Tensor& x2) {
        const Rows r = rows_of(x2);
        run_relu2(r, r.data.data_ptr(), r.stride);
      },
      [&] { return relu2(x); });
}

}  // namespace fastlm::cpu
