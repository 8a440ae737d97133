// fastlm._C: the TORCH_LIBRARY(fastlm) schemas (the op contract, csrc/op_list.h) and the Python
// module. Device kernels register under TORCH_LIBRARY_IMPL in csrc/cpu (always) and csrc/cuda (when
// built with CUDA). Python-side ops (the Triton backend's fastlm::triton_*) join the same namespace
// through FRAGMENT libraries, which is valid before or after this library loads.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
#include "op_list.h"

TORCH_LIBRARY(fastlm, m) {
#define FASTLM_DEF_SCHEMA(op, schema) m.def(#op schema);
  FASTLM_ALL_OPS(FASTLM_DEF_SCHEMA)
#undef FASTLM_DEF_SCHEMA
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

// The library linear's fp32 GEMMs run on under the current mode.
std::string gemm32_library() { return fastlm::cpu::gemm32_uses_onednn() ? "onednn" : "aten"; }

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
#define FASTLM_OP_NAME(op, schema) constexpr char k_##op[] = "fastlm::" #op;
FASTLM_ALL_OPS(FASTLM_OP_NAME)
#undef FASTLM_OP_NAME

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm C++ ops (registered as torch.ops.fastlm.*)";
  m.def("has_cuda_kernels", &has_cuda_kernels, "whether this build contains the CUDA kernels");
  m.def("cpu_isa", &cpu_isa, "the SIMD level the CPU kernels were compiled for");
  m.def("set_cpu_gemm16", &fastlm::cpu::set_gemm16_mode,
        "set how linear multiplies 16-bit x by a 16-bit weight beyond decode sizes on CPU: 'auto' (by the "
        "CPU's native 16-bit dot products), 'widen' (the fp32 GEMM on widened panels) or 'aten' (ATen's "
        "16-bit GEMM); returns the previous mode (initially FASTLM_CPU_GEMM16)");
  m.def(
      "cpu_gemm16_widens",
      [](const std::string& dtype) {
        TORCH_CHECK_VALUE(dtype == "bfloat16" || dtype == "float16",
                          "fastlm: dtype must be 'bfloat16' or 'float16', got '", dtype, "'");
        return fastlm::cpu::widen_gemm16(dtype == "bfloat16" ? c10::kBFloat16 : c10::kHalf);
      },
      "whether linear widens a 16-bit GEMM of this dtype to fp32 on this CPU, under the current mode");
  m.def("set_cpu_gemm32", &fastlm::cpu::set_gemm32_mode,
        "set which library runs linear's fp32 GEMMs beyond decode sizes on CPU: 'auto' or 'onednn' (oneDNN "
        "where this torch has it) or 'aten' (ATen's addmm); returns the previous mode (initially FASTLM_CPU_GEMM32)");
  m.def(
      "cpu_gemm32_library", [] { return gemm32_library(); },
      "the library linear's fp32 GEMMs run on under the current mode: 'onednn' or 'aten'");
  m.def("set_cpu_panel_gemm", &fastlm::cpu::set_panel_gemm_mode,
        "set which GEMM multiplies the widened weight panels on CPU: 'auto' or 'packed' (fastlm's own AVX2 + "
        "FMA kernel where the build has it) or 'library' (the fp32 GEMM library); returns the previous mode "
        "(initially FASTLM_CPU_PANEL_GEMM)");
  m.def(
      "cpu_panel_gemm", [] {
        return fastlm::cpu::panel_gemm_packed() ? std::string("packed") : gemm32_library();
      },
      "the GEMM the widened panels run on under the current modes: 'packed', 'onednn' or 'aten'");
  m.def("parallel_threads_used", &parallel_threads_used,
        "threads that one at::parallel_for over `tasks` tasks ran on (1 means the build lost OpenMP)");
  // Dispatcher calls without torch.ops' Python layer (see DispatchCall), for fastlm.ops' eager path:
  // call_<op> for each functional op of the contract.
#define FASTLM_DEF_CALL(op, schema)                                                          \
  m.def("call_" #op, &DispatchCall<k_##op, decltype(fastlm::cpu::op)>::call,                 \
        py::call_guard<py::gil_scoped_release>());
  FASTLM_ALL_OPS(FASTLM_DEF_CALL)
#undef FASTLM_DEF_CALL
}
