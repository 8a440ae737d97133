// What the CPU running this process can do, read at run time (cpuid), for kernels that choose a path
// by the machine rather than by the build's -m flags: a build for AVX2 or AVX-512 runs on CPUs with and
// without native 16-bit dot products alike, and which of ATen's 16-bit GEMMs is fast depends on them.
//
// ATen's bf16 / fp16 GEMM (oneDNN) is fast only with native dot products: AVX512-BF16 or AMX-BF16 for
// bf16, AVX512-FP16 or AMX-FP16 for fp16. Elsewhere it is ~3x slower than the fp32 GEMM (measured on
// an AVX2 Zen 3 and, emulated, on Zen 4), so `linear` widens to fp32 there (csrc/cpu/widened_gemm.h).
//
// Emulating an older CPU (benchmarking an AVX2 machine on an AVX-512 one): ATen's oneDNN honours
// ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA); so does this decision, so that fastlm and
// ATen see the same CPU. A cap without BF16 / FP16 / AMX / AVX10 in its name (AVX2, AVX512_CORE, ...)
// hides native bf16; without FP16 / AVX10 in it, native fp16. FASTLM_CPU_GEMM16 overrides both
// (fastlm/ops/projection.py documents both).
#pragma once

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "packed_gemm.h"  // FASTLM_PACKED_GEMM: whether the build has the packed panel GEMM

namespace fastlm::cpu {

struct Native16 {
  bool bf16 = false, fp16 = false;  // native dot products for bf16 / fp16 on this CPU (and OS)
};

#if defined(__x86_64__) || defined(__i386__)
inline unsigned long long read_xcr0() {
  unsigned int lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

// The CPU's native 16-bit dot products, with the OS's state support: AVX-512 needs XCR0's opmask and
// upper-ZMM state (bits 5-7), AMX its tile state (bits 17-18).
inline Native16 detect_native16() {
  Native16 n;
#if defined(__x86_64__) || defined(__i386__)
  unsigned int a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return n;  // no OSXSAVE: no xgetbv
  const unsigned long long xcr0 = read_xcr0();
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6, os_amx = (xcr0 & 0x60000) == 0x60000;
  unsigned int max_leaf = 0;
  if (!__get_cpuid(0, &max_leaf, &b, &c, &d) || max_leaf < 7) return n;
  unsigned int a0 = 0, b0 = 0, c0 = 0, d0 = 0, a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __cpuid_count(7, 0, a0, b0, c0, d0);
  if (a0 >= 1) __cpuid_count(7, 1, a1, b1, c1, d1);  // a0: leaf 7's last subleaf
  const bool avx512f = b0 & (1u << 16);
  const bool avx512_bf16 = a1 & (1u << 5), avx512_fp16 = d0 & (1u << 23);
  const bool amx_bf16 = d0 & (1u << 22), amx_tile = d0 & (1u << 24), amx_fp16 = a1 & (1u << 21);
  n.bf16 = (os_avx512 && avx512f && avx512_bf16) || (os_amx && amx_tile && amx_bf16);
  n.fp16 = (os_avx512 && avx512f && avx512_fp16) || (os_amx && amx_tile && amx_fp16);
#endif
  return n;
}

// detect_native16, capped by ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA as oneDNN caps itself (see above).
inline Native16 native16_under_isa_cap() {
  Native16 n = detect_native16();
  const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (!cap || !*cap) cap = std::getenv("DNNL_MAX_CPU_ISA");
  if (!cap || !*cap) return n;
  std::string s(cap);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::toupper(ch); });
  if (s == "ALL" || s == "DEFAULT") return n;
  auto has = [&](const char* part) { return s.find(part) != std::string::npos; };
  n.bf16 = n.bf16 && (has("BF16") || has("FP16") || has("AMX") || has("AVX10"));
  n.fp16 = n.fp16 && (has("FP16") || has("AVX10"));
  return n;
}

// A process-wide choice among named modes (mode 0 is "auto"): the environment variable `env` at first
// use, or what set() set since. An invalid variable raises at the first use of the mode, naming it.
template <size_t N>
class ModeSetting {
 public:
  constexpr ModeSetting(const char* env, const char* what, std::array<const char*, N> names)
      : env_(env), what_(what), names_(names) {}

  int get() const {
    int m = slot_.load(std::memory_order_relaxed);
    if (m == kUnread) {  // first use: parse the variable, unless set() (or another thread) got there first
      const char* v = std::getenv(env_);
      int expected = kUnread;
      slot_.compare_exchange_strong(expected, parse(v ? v : ""));
      m = slot_.load(std::memory_order_relaxed);
    }
    TORCH_CHECK_VALUE(m != kInvalid, "fastlm: ", env_, " must be ", choices(), ", got '",
                      std::getenv(env_) ? std::getenv(env_) : "", "'");
    return m;
  }

  // Set the mode by name; returns the previous one's name ("invalid" for an invalid variable never read).
  std::string set(const std::string& name) {
    const int m = parse(name);
    TORCH_CHECK_VALUE(m != kInvalid && !name.empty(), "fastlm: ", what_, " must be ", choices(), ", got '", name,
                      "'");
    int prev = slot_.exchange(m);
    if (prev == kUnread) {
      const char* v = std::getenv(env_);
      prev = parse(v ? v : "");
    }
    return prev == kInvalid ? "invalid" : names_[prev];
  }

 private:
  static constexpr int kUnread = -1, kInvalid = static_cast<int>(N);
  int parse(const std::string& s) const {
    if (s.empty()) return 0;
    for (size_t i = 0; i < N; ++i)
      if (s == names_[i]) return static_cast<int>(i);
    return kInvalid;
  }
  std::string choices() const {
    std::string out;
    for (size_t i = 0; i < N; ++i) out += std::string(i == 0 ? "" : i + 1 == N ? " or " : ", ") + names_[i];
    return out;
  }
  const char* env_;
  const char* what_;
  std::array<const char*, N> names_;
  mutable std::atomic<int> slot_{kUnread};
};

// How `linear` multiplies 16-bit x by a 16-bit weight beyond decode sizes (FASTLM_CPU_GEMM16):
// auto: ATen's 16-bit GEMM where the CPU has native dot products for the dtype, else widened to fp32;
// widen / aten: always that one (benchmarks, tests).
enum class Gemm16Mode : int { kAuto = 0, kWiden = 1, kAten = 2 };
inline ModeSetting<3> gemm16_setting("FASTLM_CPU_GEMM16", "the 16-bit GEMM mode", {"auto", "widen", "aten"});
inline Gemm16Mode gemm16_mode() { return static_cast<Gemm16Mode>(gemm16_setting.get()); }
inline std::string set_gemm16_mode(const std::string& mode) { return gemm16_setting.set(mode); }

// Which library runs `linear`'s fp32 GEMMs beyond decode sizes (FASTLM_CPU_GEMM32): auto and onednn:
// oneDNN's matmul (ATen's mkldnn::_linear_pointwise op, the weight as it is) where this torch has it,
// else ATen's addmm (MKL or torch's BLAS); aten: always addmm. On the 2-core Zen 4, two threads, M = 512
// and the E2E shapes: oneDNN 185-208 GFLOP/s against addmm's 112-166 (one thread: 88-105 against 67-100,
// so the difference is mostly MKL's two-thread scaling); capped to AVX2, 149-170 against 124-166.
enum class Gemm32Mode : int { kAuto = 0, kOnednn = 1, kAten = 2 };
inline ModeSetting<3> gemm32_setting("FASTLM_CPU_GEMM32", "the fp32 GEMM mode", {"auto", "onednn", "aten"});
inline Gemm32Mode gemm32_mode() { return static_cast<Gemm32Mode>(gemm32_setting.get()); }
inline std::string set_gemm32_mode(const std::string& mode) { return gemm32_setting.set(mode); }

// oneDNN's fp32 linear in this torch: ATen's mkldnn::_linear_pointwise op and its binary form (absent from
// torch builds without oneDNN, and not used off x86, where oneDNN wraps other libraries).
struct OnednnLinearOps {
  std::optional<c10::OperatorHandle> pointwise, binary;
};
inline const OnednnLinearOps& onednn_linear_ops() {
  static const OnednnLinearOps ops = [] {
    OnednnLinearOps o;
#if defined(__x86_64__)
    if (at::hasMKLDNN()) {
      o.pointwise = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
      o.binary = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", "binary"});
    }
#endif
    return o;
  }();
  return ops;
}

// Whether `linear`'s fp32 GEMMs run on oneDNN (else ATen's addmm), under the current mode.
inline bool gemm32_uses_onednn() {
  const OnednnLinearOps& ops = onednn_linear_ops();
  return gemm32_mode() != Gemm32Mode::kAten && ops.pointwise && ops.binary;
}

// fp32 y [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]) (+ other [M, N], oneDNN's post-op: one rounding, as
// addmm's) by oneDNN (gemm32_uses_onednn() must hold). Both take rows with unit column stride. Boxed
// calls (the schema's list of optional Scalars has no simple unboxed type): a few us, against a GEMM.
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& other) {
  const OnednnLinearOps& ops = onednn_linear_ops();
  const c10::IValue b = bias ? c10::IValue(bias->contiguous()) : c10::IValue();
  std::vector<c10::IValue> stack;
  if (other) {
    stack = {x, other->contiguous(), w, b, std::string("add")};
    ops.binary->callBoxed(&stack);
  } else {
    stack = {x, w, b, std::string("none"), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    ops.pointwise->callBoxed(&stack);
  }
  return stack.back().toTensor();
}

// Which GEMM multiplies the widened weight panels (FASTLM_CPU_PANEL_GEMM, csrc/cpu/widened_gemm.h): packed:
// fastlm's own AVX2 + FMA kernel (csrc/cpu/packed_gemm.h) where the build has it (x86-64 builds for AVX2 or
// AVX-512), else the library; library: the fp32 GEMM library above; auto: packed on AVX2 builds, the library
// on AVX-512 builds. Engine prefill of 512 tokens, 2-core Zen 4, interleaved in one process: capped to AVX2,
// packed / oneDNN 1.00-1.11x (fp16) and 1.02-1.04x (int4); native AVX-512, 0.94-0.98x (fp16, int4) and
// 1.01x (int8) against oneDNN's AVX-512 kernels.
enum class PanelGemmMode : int { kAuto = 0, kPacked = 1, kLibrary = 2 };
inline ModeSetting<3> panel_gemm_setting("FASTLM_CPU_PANEL_GEMM", "the widened panels' GEMM mode",
                                         {"auto", "packed", "library"});
inline std::string set_panel_gemm_mode(const std::string& mode) { return panel_gemm_setting.set(mode); }
// Whether the widened panels run on the packed kernel under the current mode (packed without the kernel in
// the build: the library, as auto).
inline bool panel_gemm_packed() {
  const auto m = static_cast<PanelGemmMode>(panel_gemm_setting.get());
#if defined(FASTLM_PACKED_GEMM)
#if defined(CPU_CAPABILITY_AVX512)
  return m == PanelGemmMode::kPacked;
#else
  return m != PanelGemmMode::kLibrary;
#endif
#else
  (void)m;
  return false;
#endif
}

// Whether `linear` widens a 16-bit GEMM of dtype t to fp32 (else: ATen's 16-bit GEMM).
inline bool widen_gemm16(c10::ScalarType t) {
  const Gemm16Mode m = gemm16_mode();
  if (m != Gemm16Mode::kAuto) return m == Gemm16Mode::kWiden;
  static const Native16 native = native16_under_isa_cap();
  return t == c10::kBFloat16 ? !native.bf16 : !native.fp16;
}

}  // namespace fastlm::cpu
