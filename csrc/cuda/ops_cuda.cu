// Thin torch binding of the CUDA kernels (templates in csrc/include/fastlm/*.cuh, instantiated in
// csrc/cuda_kernels/instantiate.cu): argument checks (csrc/checks.h), the current stream, dtype
// dispatch. Built only by the CUDA build of fastlm._C (setup.py, when torch has CUDA and nvcc exists).
// decode_attention has no CUDA C++ kernel yet: the Python wrapper sends CUDA tensors to the reference.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../op_list.h"
#include "../qkv_entry_points.h"
#include "../rows.h"
#include "fastlm/activations.cuh"
#include "fastlm/norm.cuh"
#include "fastlm/qkv_rope.cuh"

namespace fastlm::cuda_binding {
namespace {

using OptT = std::optional<at::Tensor>;
using fastlm::cuda::NormRows;
using fastlm::cuda::QkvParams;

template <typename S> struct CudaType { using type = S; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

#define FASTLM_CUDA_DISPATCH(TYPE, NAME, ...)                                                         \
  [&] {                                                                                                \
    switch (TYPE) {                                                                                    \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }                                      \
      case at::kHalf: { using T = __half; return __VA_ARGS__(); }                                      \
      case at::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }                           \
      default: TORCH_CHECK(false, NAME, ": expected float32, bfloat16 or float16, got ", TYPE);       \
    }                                                                                                  \
  }()

template <typename T>
const T* cptr(const at::Tensor& t) { return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr; }
template <typename T>
T* mptr(const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; }

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastlm: ", what, " failed: ", cudaGetErrorString(err));
}

using fastlm::run_in_place;
using fastlm::row_stride;
using fastlm::rows_view;

void run_norm(bool rms, const at::Tensor& x, const OptT& residual, const at::Tensor& weight, const OptT& bias,
              double eps, bool weight_in_fp32, const at::Tensor& y, const at::Tensor& h) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = rows_view(x);
  const at::Tensor r2 = residual ? rows_view(*residual) : at::Tensor();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const int64_t n = x2.size(1);
  const at::Tensor y2 = y.view({-1, n});
  const at::Tensor h2 = residual ? h.view({-1, n}) : at::Tensor();
  NormRows d{x2.size(0), n, row_stride(x2), residual ? row_stride(r2) : 0, row_stride(y2),
             residual ? row_stride(h2) : 0};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool w32 = w.scalar_type() == at::kFloat, y32 = y.scalar_type() == at::kFloat;
  FASTLM_CUDA_DISPATCH(x.scalar_type(), rms ? "add_rms_norm" : "add_layer_norm", [&] {
    cudaError_t err;
    if (!rms) {
      err = fastlm::cuda::add_layer_norm<T>(cptr<T>(x2), cptr<T>(r2), cptr<T>(w), cptr<T>(b), mptr<T>(y2),
                                            mptr<T>(h2), d, static_cast<float>(eps), stream);
    } else if (w32 && y32) {
      err = fastlm::cuda::add_rms_norm<T, float, float>(cptr<T>(x2), cptr<T>(r2), cptr<float>(w), mptr<float>(y2),
                                                        mptr<T>(h2), d, static_cast<float>(eps), weight_in_fp32,
                                                        stream);
    } else if (w32) {
      err = fastlm::cuda::add_rms_norm<T, float, T>(cptr<T>(x2), cptr<T>(r2), cptr<float>(w), mptr<T>(y2),
                                                    mptr<T>(h2), d, static_cast<float>(eps), weight_in_fp32, stream);
    } else {
      err = fastlm::cuda::add_rms_norm<T, T, T>(cptr<T>(x2), cptr<T>(r2), cptr<T>(w), mptr<T>(y2), mptr<T>(h2), d,
                                                static_cast<float>(eps), weight_in_fp32, stream);
    }
    check_cuda(err, rms ? "add_rms_norm" : "add_layer_norm");
  });
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                double eps, bool weight_in_fp32) {
  check_norm_args(x, residual, weight, std::nullopt, eps, true);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(rms_out_dtype(x, weight, weight_in_fp32)));
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (x.numel() > 0) run_norm(true, x, residual, weight, std::nullopt, eps, weight_in_fp32, y, h);
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                                  const OptT& bias, double eps) {
  check_norm_args(x, residual, weight, bias, eps, false);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (x.numel() > 0) run_norm(false, x, residual, weight, bias, eps, false, y, h);
  return {y, h};
}

// q_out always; k_out/v_out (dense) or caches + positions.
void run_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const OptT& qw, const OptT& qb,
             const OptT& kw, const OptT& kb, const QkvDims& d, bool interleaved, bool qkv_head_major, double eps,
             const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& v_out, const at::Tensor& k_cache,
             const at::Tensor& v_cache, const at::Tensor& pos) {
  if (d.B * d.S == 0) return;
  TORCH_CHECK_VALUE(d.D <= fastlm::cuda::kQkvMaxHeadDim, "fastlm: head_dim must be <= ",
                    fastlm::cuda::kQkvMaxHeadDim, " for the CUDA C++ kernel (backends 'triton' and 'torch' take any), "
                    "got ", d.D);
  const c10::cuda::CUDAGuard guard(qkv.device());
  const at::Tensor q3 = qkv.stride(2) == 1 ? qkv : qkv.contiguous();
  const at::Tensor c3 = cos.stride(2) == 1 ? cos : cos.contiguous();
  const at::Tensor s3 = sin.stride(2) == 1 ? sin : sin.contiguous();
  const at::Tensor nw[4] = {qw ? qw->contiguous() : at::Tensor(), qb ? qb->contiguous() : at::Tensor(),
                            kw ? kw->contiguous() : at::Tensor(), kb ? kb->contiguous() : at::Tensor()};
  FASTLM_CUDA_DISPATCH(qkv.scalar_type(), "qkv_rope", [&] {
    QkvParams<T> p{};
    p.B = static_cast<int>(d.B); p.S = static_cast<int>(d.S); p.H = static_cast<int>(d.H);
    p.Hkv = static_cast<int>(d.Hkv); p.D = static_cast<int>(d.D); p.R = static_cast<int>(d.R);
    p.interleaved = interleaved; p.qkv_head_major = qkv_head_major; p.eps = static_cast<float>(eps);
    p.qkv = cptr<T>(q3); p.qkv_sb = q3.stride(0); p.qkv_ss = q3.stride(1);
    p.cos = cptr<T>(c3); p.sin = cptr<T>(s3);
    p.cos_sb = c3.size(0) == 1 ? 0 : c3.stride(0); p.cos_ss = c3.stride(1);
    p.sin_sb = s3.size(0) == 1 ? 0 : s3.stride(0); p.sin_ss = s3.stride(1);
    p.q_w = cptr<T>(nw[0]); p.q_b = cptr<T>(nw[1]); p.k_w = cptr<T>(nw[2]); p.k_b = cptr<T>(nw[3]);
    p.q_w_hs = nw[0].defined() && nw[0].dim() == 2 ? d.D : 0;
    p.q_b_hs = nw[1].defined() && nw[1].dim() == 2 ? d.D : 0;
    p.k_w_hs = nw[2].defined() && nw[2].dim() == 2 ? d.D : 0;
    p.k_b_hs = nw[3].defined() && nw[3].dim() == 2 ? d.D : 0;
    p.q_out = mptr<T>(q_out);
    p.k_out = mptr<T>(k_out); p.v_out = mptr<T>(v_out);
    if (k_cache.defined()) {
      p.k_cache = mptr<T>(k_cache); p.v_cache = mptr<T>(v_cache);
      p.kc_s0 = k_cache.stride(0); p.kc_s1 = k_cache.stride(1); p.kc_s2 = k_cache.stride(2);
      p.vc_s0 = v_cache.stride(0); p.vc_s1 = v_cache.stride(1); p.vc_s2 = v_cache.stride(2);
      p.positions = pos.const_data_ptr(); p.positions64 = pos.scalar_type() == at::kLong;
      p.pos_sb = pos.stride(0); p.pos_ss = pos.stride(1);
      p.tmax = k_cache.size(2);
    }
    check_cuda(fastlm::cuda::qkv_rope<T>(p, at::cuda::getCurrentCUDAStream()), "qkv_rope");
  });
}

FASTLM_QKV_ENTRY_POINTS()

// in2 [rows, 2I] and o2 [rows, I], row-strided (o2 may be in2's gate half)
void run_swiglu(const at::Tensor& in2, const at::Tensor& o2) {
  const c10::cuda::CUDAGuard guard(in2.device());
  FASTLM_CUDA_DISPATCH(in2.scalar_type(), "swiglu", [&] {
    check_cuda(fastlm::cuda::swiglu<T>(cptr<T>(in2), row_stride(in2), mptr<T>(o2), row_stride(o2), in2.size(0),
                                       in2.size(1) / 2, at::cuda::getCurrentCUDAStream()), "swiglu");
  });
}

// in2 and o2 [rows, N], row-strided (o2 may be in2)
void run_relu2(const at::Tensor& in2, const at::Tensor& o2) {
  const c10::cuda::CUDAGuard guard(in2.device());
  FASTLM_CUDA_DISPATCH(in2.scalar_type(), "relu2", [&] {
    check_cuda(fastlm::cuda::relu2<T>(cptr<T>(in2), row_stride(in2), mptr<T>(o2), row_stride(o2), in2.size(0),
                                      in2.size(1), at::cuda::getCurrentCUDAStream()), "relu2");
  });
}

at::Tensor swiglu(const at::Tensor& gate_up) {
  at::Tensor out = at::empty(swiglu_out_shape(gate_up), gate_up.options());
  if (out.numel() == 0) return out;
  run_swiglu(rows_view(gate_up), out.view({-1, out.size(-1)}));
  return out;
}

void swiglu_(const at::Tensor& gate_up) {
  swiglu_out_shape(gate_up);
  if (gate_up.numel() == 0) return;
  run_in_place(gate_up, gate_up.narrow(-1, 0, gate_up.size(-1) / 2),
               [](const at::Tensor& in2) { run_swiglu(in2, in2.narrow(1, 0, in2.size(1) / 2)); },
               [&] { return swiglu(gate_up); });
}

at::Tensor relu2(const at::Tensor& x) {
  check_relu2_input(x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  run_relu2(rows_view(x), out.view({-1, out.size(-1)}));
  return out;
}

void relu2_(const at::Tensor& x) {
  check_relu2_input(x);
  if (x.numel() == 0) return;
  run_in_place(x, x, [](const at::Tensor& x2) { run_relu2(x2, x2); }, [&] { return relu2(x); });
}

}  // namespace
}  // namespace fastlm::cuda_binding

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
#define FASTLM_IMPL_CUDA(op, schema) m.impl(#op, &fastlm::cuda_binding::op);
  FASTLM_DEVICE_OPS(FASTLM_IMPL_CUDA)
#undef FASTLM_IMPL_CUDA
}
