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

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

// How `linear` multiplies 16-bit x by a 16-bit weight beyond decode sizes (FASTLM_CPU_GEMM16):
// kAuto: ATen's 16-bit GEMM where the CPU has native dot products for the dtype, else widened to fp32;
// kWiden / kAten: always that one (benchmarks, tests).
enum class Gemm16Mode : int { kAuto = 0, kWiden = 1, kAten = 2, kInvalid = 3 };

inline const char* gemm16_mode_name(Gemm16Mode m) {
  switch (m) {
    case Gemm16Mode::kWiden: return "widen";
    case Gemm16Mode::kAten: return "aten";
    default: return "auto";
  }
}

inline Gemm16Mode parse_gemm16_mode(const std::string& s) {
  if (s.empty() || s == "auto") return Gemm16Mode::kAuto;
  if (s == "widen") return Gemm16Mode::kWiden;
  if (s == "aten") return Gemm16Mode::kAten;
  return Gemm16Mode::kInvalid;
}

// The process-wide mode: FASTLM_CPU_GEMM16 at first use, or what set_gemm16_mode set since.
inline std::atomic<int>& gemm16_mode_slot() {
  static std::atomic<int> slot([] {
    const char* env = std::getenv("FASTLM_CPU_GEMM16");
    return static_cast<int>(parse_gemm16_mode(env ? env : ""));
  }());
  return slot;
}

inline Gemm16Mode gemm16_mode() {
  const auto m = static_cast<Gemm16Mode>(gemm16_mode_slot().load(std::memory_order_relaxed));
  if (m == Gemm16Mode::kInvalid) {  // only from the environment: set_gemm16_mode accepts valid modes only
    const char* env = std::getenv("FASTLM_CPU_GEMM16");
    TORCH_CHECK_VALUE(false, "fastlm: FASTLM_CPU_GEMM16 must be auto, widen or aten, got '", env ? env : "", "'");
  }
  return m;
}

// Set the mode ("auto", "widen" or "aten"); returns the previous one.
inline std::string set_gemm16_mode(const std::string& mode) {
  const Gemm16Mode m = parse_gemm16_mode(mode);
  TORCH_CHECK_VALUE(m != Gemm16Mode::kInvalid && !mode.empty(),
                    "fastlm: the 16-bit GEMM mode must be auto, widen or aten, got '", mode, "'");
  const auto prev = static_cast<Gemm16Mode>(gemm16_mode_slot().exchange(static_cast<int>(m)));
  return prev == Gemm16Mode::kInvalid ? "invalid" : gemm16_mode_name(prev);
}

// Whether `linear` widens a 16-bit GEMM of dtype t to fp32 (else: ATen's 16-bit GEMM).
inline bool widen_gemm16(c10::ScalarType t) {
  const Gemm16Mode m = gemm16_mode();
  if (m != Gemm16Mode::kAuto) return m == Gemm16Mode::kWiden;
  static const Native16 native = native16_under_isa_cap();
  return t == c10::kBFloat16 ? !native.bf16 : !native.fp16;
}

}  // namespace fastlm::cpu
