// fastlm._C: the TORCH_LIBRARY(fastlm) schemas (the op contract, see fastlm/ops/*.py) and the Python
// module. Device kernels register under TORCH_LIBRARY_IMPL in csrc/cpu (always) and csrc/cuda (when
// built with CUDA). Python-side ops (the Triton backend's fastlm::triton_*) join the same namespace
// through FRAGMENT libraries, which is valid before or after this library loads.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"

TORCH_LIBRARY(fastlm, m) {
  // add + norm. h is empty when residual is None (h would alias x; the Python wrapper returns x).
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, bool weight_in_fp32=False) "
        "-> (Tensor, Tensor)");
  m.def("add_rms_norm_out(Tensor x, Tensor? residual, Tensor weight, float eps, bool weight_in_fp32, *, "
        "Tensor(a!) out, Tensor(b!)? residual_out) -> ()");
  m.def("add_layer_norm(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  m.def("add_layer_norm_out(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, *, "
        "Tensor(a!) out, Tensor(b!)? residual_out) -> ()");
  // QKV epilogue
  m.def("qkv_rope(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm_weight, Tensor? q_norm_bias, "
        "Tensor? k_norm_weight, Tensor? k_norm_bias, int num_heads, int num_kv_heads, int head_dim, "
        "int rotary_dim, bool interleaved, bool per_head_layout, float qk_norm_eps) -> (Tensor, Tensor, Tensor)");
  m.def("qkv_rope_out(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm_weight, Tensor? q_norm_bias, "
        "Tensor? k_norm_weight, Tensor? k_norm_bias, int num_heads, int num_kv_heads, int head_dim, "
        "int rotary_dim, bool interleaved, bool per_head_layout, float qk_norm_eps, *, Tensor(a!) q_out, "
        "Tensor(b!) k_out, Tensor(c!) v_out) -> ()");
  m.def("qkv_rope_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm_weight, Tensor? q_norm_bias, "
        "Tensor? k_norm_weight, Tensor? k_norm_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_positions, int num_heads, int num_kv_heads, int head_dim, int rotary_dim, "
        "bool interleaved, bool per_head_layout, float qk_norm_eps) -> Tensor");
  m.def("qkv_rope_cache_out(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm_weight, Tensor? q_norm_bias, "
        "Tensor? k_norm_weight, Tensor? k_norm_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_positions, int num_heads, int num_kv_heads, int head_dim, int rotary_dim, "
        "bool interleaved, bool per_head_layout, float qk_norm_eps, *, Tensor(c!) q_out) -> ()");
  // MLP epilogues
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("swiglu_out(Tensor gate_up, *, Tensor(a!) out) -> ()");
  m.def("relu2(Tensor x) -> Tensor");
  m.def("relu2_out(Tensor x, *, Tensor(a!) out) -> ()");
  // in place on the GEMM output they consume, as the fused MLP calls them: swiglu_ writes the gate half
  m.def("swiglu_(Tensor(a!) gate_up) -> ()");
  m.def("relu2_(Tensor(a!) x) -> ()");
  // projections at decode sizes (CPU: a weight-streaming kernel for a few rows, ATen's GEMM beyond)
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  // decode attention over a static cache
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor");
  m.def("decode_attention_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale, *, "
        "Tensor(a!) out) -> ()");
}

namespace {

bool has_cuda_kernels() {
#ifdef FASTLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

// Distinct threads that ran the tasks of one at::parallel_for over `tasks` single-item tasks, as the
// kernels call it. A build without OpenMP drops the `#pragma omp parallel` inside at::parallel_for and
// silently runs every kernel on one thread: the test suite checks this against torch's thread count.
int64_t parallel_threads_used(int64_t tasks) {
  std::vector<int> seen(std::max(at::get_num_threads(), 1), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int>(seen.size())) seen[id] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}

// An unboxed call of the registered op `kOp` through the dispatcher, as ATen's own Python bindings make:
// every dispatch key still applies (CPU / CUDA kernels, autograd, TorchDispatchModes, fake tensors),
// without torch.ops' Python OpOverload layer, which boxes each argument against the schema (~2 us a
// call, as much as a decode-sized kernel). The handle is looked up once.
template <const char* kOp, typename Sig>
struct DispatchCall;
template <const char* kOp, typename R, typename... Args>
struct DispatchCall<kOp, R(Args...)> {
  static R call(Args... args) {
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(kOp, "").template typed<R(Args...)>();
    return handle.call(args...);
  }
};
#define FASTLM_OP_NAME(op) constexpr char k_##op[] = "fastlm::" #op;
FASTLM_OP_NAME(add_rms_norm)
FASTLM_OP_NAME(add_layer_norm)
FASTLM_OP_NAME(qkv_rope)
FASTLM_OP_NAME(qkv_rope_cache)
FASTLM_OP_NAME(swiglu)
FASTLM_OP_NAME(relu2)
FASTLM_OP_NAME(swiglu_)
FASTLM_OP_NAME(relu2_)
FASTLM_OP_NAME(linear)
FASTLM_OP_NAME(decode_attention)
#undef FASTLM_OP_NAME

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm C++ ops (registered as torch.ops.fastlm.*)";
  m.def("has_cuda_kernels", &has_cuda_kernels, "whether this build contains the CUDA kernels");
  m.def("cpu_isa", &cpu_isa, "the SIMD level the CPU kernels were compiled for");
  m.def("parallel_threads_used", &parallel_threads_used,
        "threads that one at::parallel_for over `tasks` tasks ran on (1 means the build lost OpenMP)");
  // Dispatcher calls without torch.ops' Python layer (see DispatchCall), for fastlm.ops' eager path:
  // call_<op> for each functional op of the contract.
#define FASTLM_DEF_CALL(op)                                                                  \
  m.def("call_" #op, &DispatchCall<k_##op, decltype(fastlm::cpu::op)>::call,                 \
        py::call_guard<py::gil_scoped_release>())
  FASTLM_DEF_CALL(add_rms_norm);
  FASTLM_DEF_CALL(add_layer_norm);
  FASTLM_DEF_CALL(qkv_rope);
  FASTLM_DEF_CALL(qkv_rope_cache);
  FASTLM_DEF_CALL(swiglu);
  FASTLM_DEF_CALL(relu2);
  FASTLM_DEF_CALL(swiglu_);
  FASTLM_DEF_CALL(relu2_);
  FASTLM_DEF_CALL(linear);
  FASTLM_DEF_CALL(decode_attention);
#undef FASTLM_DEF_CALL
}
