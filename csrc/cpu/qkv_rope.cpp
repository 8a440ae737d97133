// QKV epilogue on CPU: split the fused QKV GEMM output (split [q|k|v] or Persimmon [H, 3, D]),
// optional qk-LayerNorm (shared [D] or per-head [heads, D] weight, optional bias), partial RoPE
// (half-split or interleaved) and either dense q/k/v outputs or a k/v cache write. Each head vector is
// read once, processed in an fp32 stack buffer, and written once (v is a straight copy).
#include "../checks.h"
#include "../op_list.h"
#include "../qkv_entry_points.h"
#include "row_norm.h"

#include <cstring>
#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

// Head sizes up to this use per-task stack scratch; larger ones (no family has them) a heap buffer.
constexpr int64_t kMaxHeadDim = 1024;

struct NormW {  // fp32 copies (the weights are tiny; widening them per head vector cost ~10% at Persimmon sizes)
  const float* w = nullptr;
  const float* b = nullptr;
  int64_t w_head_stride = 0;  // D for per-head [heads, D] weights, 0 for a shared [D] weight
  int64_t b_head_stride = 0;
};

struct QkvArgs {
  int64_t B, S, H, Hkv, D, R;
  bool interleaved, head_major;  // head_major: Persimmon's [H, 3, D] fused layout
  float eps;
  const void* qkv;
  int64_t qkv_sb, qkv_ss;
  const void* cos;
  const void* sin;
  int64_t cos_sb, cos_ss, sin_sb, sin_ss;
  NormW qn, kn;
  // dense outputs (contiguous [B, heads, S, D]) ...
  void* q_out;
  void* k_out;
  void* v_out;
  // ... or cache outputs (cache set, k_out/v_out null): [B, Hkv, Tmax, D] with strides, positions [B, S]
  // (a zero-length cache has null data pointers, so the mode is its own flag)
  bool cache = false;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int64_t kc_s[3] = {0, 0, 0}, vc_s[3] = {0, 0, 0};
  const void* pos = nullptr;
  bool pos64 = false;
  int64_t pos_sb = 0, pos_ss = 0, tmax = 0;
};

inline int64_t position(const QkvArgs& a, int64_t b, int64_t s) {
  return a.pos64 ? static_cast<const int64_t*>(a.pos)[b * a.pos_sb + s * a.pos_ss]
                 : static_cast<const int32_t*>(a.pos)[b * a.pos_sb + s * a.pos_ss];
}

// Every cache position in [0, Tmax), checked before the kernel writes anything (B * S reads, next to
// the kernel's B * S * (H + 2 Hkv) * D): a bad position raises and leaves the caches untouched.
void check_positions(const QkvArgs& a) {
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t p = position(a, b, s);
      TORCH_CHECK_VALUE(p >= 0 && p < a.tmax, "fastlm: cache_positions[", b, ", ", s, "] = ", p,
                        " is outside the cache: positions must be in [0, Tmax) = [0, ", a.tmax, ")");
    }
  }
}

// Up to kF elements of S as one fp32 register (lanes past m zero), and back to T.
template <typename S>
inline fVec load_f32(const S* p, int64_t m) {
  if constexpr (std::is_same_v<S, float>) {
    return fVec::loadu(p, m);
  } else {
    if (m == kF) {  // a half-width load: converting a full 16-bit register would convert 2 * kF
      fVec out;
      at::vec::load_to_float<S>(p, out);
      return out;
    }
    return std::get<0>(at::vec::convert_to_float<S>(at::vec::Vectorized<S>::loadu(p, m)));
  }
}
template <typename T>
inline void store_f32(T* p, int64_t m, const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, m);
  } else {
    pack_from_float<T>(v, fVec(0.f)).store(p, m);
  }
}

// Identity, or the qk-LayerNorm affine (x - mean) * rstd * w (+ b) of element j onwards: applied by
// rope_store to each value as it is loaded, so a normalised head needs no extra sweep.
struct NoAffine {
  static constexpr bool kIdentity = true;
  fVec operator()(const fVec& x, int64_t, int64_t) const { return x; }
  float operator()(float x, int64_t) const { return x; }
};
struct LayerNormAffine {
  static constexpr bool kIdentity = false;
  fVec vm, vr;
  float mean, rstd;
  const float* w;
  const float* b;  // may be null
  LayerNormAffine(float mean_, float rstd_, const float* w_, const float* b_)
      : vm(mean_), vr(rstd_), mean(mean_), rstd(rstd_), w(w_), b(b_) {}
  fVec operator()(const fVec& x, int64_t j, int64_t m) const {  // lanes j .. j + m
    const fVec wv = fVec::loadu(w + j, m);
    return b ? layer_norm_apply(x, vm, vr, wv, fVec::loadu(b + j, m)) : layer_norm_apply(x, vm, vr, wv);
  }
  float operator()(float x, int64_t j) const {
    return b ? layer_norm_apply(x, mean, rstd, w[j], b[j]) : layer_norm_apply(x, mean, rstd, w[j]);
  }
};

// dst[0:D] = RoPE(pre(src[0:D])): the first R dims rotated with the fp32 tables cs/sn (R/2 entries),
// the rest copied; fp32 math, one rounding to T. src is the head vector in storage (no qk-norm) or the
// fp32 buffer of a head being normalised (pre = its affine): either way one sweep from src to dst.
template <typename S, typename T, typename Pre>
inline void rope_store(const S* src, T* dst, int64_t D, int64_t R, const float* cs, const float* sn,
                       bool interleaved, const Pre& pre) {
  const int64_t half = R / 2;
  if (!interleaved) {
    for (int64_t i = 0; i < half; i += kF) {
      const int64_t m = std::min(kF, half - i);
      fVec x0 = pre(load_f32(src + i, m), i, m), x1 = pre(load_f32(src + half + i, m), half + i, m);
      rope_rotate(x0, x1, fVec::loadu(cs + i, m), fVec::loadu(sn + i, m));
      store_f32(dst + i, m, x0);
      store_f32(dst + half + i, m, x1);
    }
  } else {
    int64_t i = 0;
    for (; i + kF <= half; i += kF) {  // pairs (2i, 2i+1): de-interleave, rotate, re-interleave
      fVec a, b;
      IO<S>::load(src + 2 * i, a, b);
      auto [x0, x1] = at::vec::deinterleave2(pre(a, 2 * i, kF), pre(b, 2 * i + kF, kF));
      rope_rotate(x0, x1, fVec::loadu(cs + i), fVec::loadu(sn + i));
      auto [o0, o1] = at::vec::interleave2(x0, x1);
      IO<T>::store(dst + 2 * i, kChunk, o0, o1);
    }
    for (; i < half; ++i) {
      float x0 = pre(IO<S>::to_float(src[2 * i]), 2 * i), x1 = pre(IO<S>::to_float(src[2 * i + 1]), 2 * i + 1);
      rope_rotate(x0, x1, cs[i], sn[i]);
      dst[2 * i] = static_cast<T>(x0);
      dst[2 * i + 1] = static_cast<T>(x1);
    }
  }
  if constexpr (Pre::kIdentity && std::is_same_v<S, T>) {
    std::memcpy(dst + R, src + R, (D - R) * sizeof(T));
  } else {
    for (int64_t j = R; j < D; j += kChunk) {
      const int64_t m = std::min(kChunk, D - j);
      fVec a, b;
      IO<S>::load(src + j, m, a, b);
      IO<T>::store(dst + j, m, pre(a, j, std::min(kF, m)), pre(b, j + kF, std::max<int64_t>(0, m - kF)));
    }
  }
}

// Tokens per task. Work goes token block by token block, and inside a block head by head, so each
// head's outputs for the block are written as one contiguous run ([B, H, S, D] rows s0..s0+n). Token
// by token, the q/k/v rows of a token land H apart at a stride of S * D elements, a power of two for
// many shapes (Persimmon at S = 512: 128 KiB), and those writes all fall into the same cache sets.
constexpr int64_t kTokBlock = 8;

// qk-LayerNorm of one head for n <= kTokBlock tokens, D <= V * kF: three register sweeps per head,
// each token's head staged in its fp32 buffer (lanes past D zero), then normalised there for
// rope_store. The statistics are gathered across the tokens: each sweep leaves one accumulator per
// token, and hsum_lanes reduces them all at once, so the means and the rstds are one vector divide /
// sqrt each. Token by token, the two horizontal sums and the divide + sqrt formed a ~100-cycle chain
// per head that the out-of-order window did not hide (StableLM bf16 T=512, one thread: ~1470 -> ~1150
// us). The head's weight and bias stay in registers across the tokens.
template <int V, typename T>
inline void layer_norm_heads(const T* const* src, float* const* buf, int64_t n, int64_t D, float eps,
                             const float* w, const float* b) {
  static_assert(kTokBlock <= kF, "one lane per token");
  const int64_t tail = D - (V - 1) * kF;  // lanes of the last register, 1..kF
  const fVec zero(0.f), vD(static_cast<float>(D));
  fVec acc[kTokBlock];  // rows past n stay zero for hsum_lanes
  for (int64_t t = 0; t < kTokBlock; ++t) acc[t] = zero;
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < V; ++i) {
      const fVec x = load_f32(src[t] + i * kF, i == V - 1 ? tail : kF);
      x.store(buf[t] + i * kF);
      acc[t] = acc[t] + x;
    }
  }
  alignas(64) float mean[kF], rstd[kF];
  (hsum_lanes<kTokBlock>(acc) / vD).store(mean);  // layer_norm_mean, lane by lane
  for (int64_t t = 0; t < n; ++t) {
    const fVec vm(mean[t]);
    acc[t] = zero;
    for (int i = 0; i < V; ++i) {
      fVec c = fVec::loadu(buf[t] + i * kF) - vm;
      if (i == V - 1 && tail < kF) c = fVec::set(zero, c, tail);  // lanes past D stay out of the sum
      acc[t] = at::vec::fmadd(c, c, acc[t]);
    }
  }
  (fVec(1.f) / (hsum_lanes<kTokBlock>(acc) / vD + fVec(eps)).sqrt()).store(rstd);  // layer_norm_rstd
  fVec wv[V], bv[V];
  for (int i = 0; i < V; ++i) {
    const int64_t m = i == V - 1 ? tail : kF;
    wv[i] = fVec::loadu(w + i * kF, m);
    bv[i] = b ? fVec::loadu(b + i * kF, m) : zero;
  }
  for (int64_t t = 0; t < n; ++t) {
    const fVec vm(mean[t]), vr(rstd[t]);
    for (int i = 0; i < V; ++i) {
      float* p = buf[t] + i * kF;
      layer_norm_apply(fVec::loadu(p), vm, vr, wv[i], bv[i]).store(p);
    }
  }
}

// layer_norm_heads for the register count D needs; false when D is over 8 registers (8 * kF).
template <typename T>
inline bool layer_norm_heads_in_registers(const T* const* src, float* const* buf, int64_t n, int64_t D, float eps,
                                          const float* w, const float* b) {
  switch ((D + kF - 1) / kF) {
    case 1: layer_norm_heads<1>(src, buf, n, D, eps, w, b); return true;
    case 2: layer_norm_heads<2>(src, buf, n, D, eps, w, b); return true;
    case 3: layer_norm_heads<3>(src, buf, n, D, eps, w, b); return true;
    case 4: layer_norm_heads<4>(src, buf, n, D, eps, w, b); return true;
    case 5: layer_norm_heads<5>(src, buf, n, D, eps, w, b); return true;
    case 6: layer_norm_heads<6>(src, buf, n, D, eps, w, b); return true;
    case 7: layer_norm_heads<7>(src, buf, n, D, eps, w, b); return true;
    case 8: layer_norm_heads<8>(src, buf, n, D, eps, w, b); return true;
    default: return false;
  }
}

template <typename T>
void qkv_kernel(const QkvArgs& a) {
  const int64_t B = a.B, S = a.S, H = a.H, Hkv = a.Hkv, D = a.D, R = a.R, half = a.R / 2;
  const int64_t width = (H + 2 * Hkv) * D;
  const int64_t blocks_per_seq = (S + kTokBlock - 1) / kTokBlock;
  const T* qkv = static_cast<const T*>(a.qkv);
  const T* cosp = static_cast<const T*>(a.cos);
  const T* sinp = static_cast<const T*>(a.sin);
  const int64_t grain = std::max<int64_t>(1, grain_for(width) / kTokBlock);
  const bool stream_out = !a.cache && B * S * width * static_cast<int64_t>(sizeof(T)) >= kStreamOutBytes;
  at::parallel_for(0, B * blocks_per_seq, grain, [&](int64_t begin, int64_t end) {
    // Scratch rows packed at a stride of the head size plus one cache line, not at the maximum head
    // size: rows 4 KiB apart fall into one L1 set and alias in the load/store unit (StableLM bf16
    // T=512 with qk-norm, two threads: 850 -> 730 us, in noisy timings).
    const int64_t buf_stride = round_up(D, kF) + kF, tab_stride = round_up(std::max<int64_t>(half, 1), kF) + kF;
    alignas(64) float stack_scratch[kTokBlock * (kMaxHeadDim + kF) + 2 * kTokBlock * (kMaxHeadDim / 2 + kF)];
    alignas(64) T stack_stage[kTokBlock * kMaxHeadDim];
    const bool big_head = D > kMaxHeadDim;
    std::vector<float> heap_scratch(big_head ? kTokBlock * (buf_stride + 2 * tab_stride) : 0);
    std::vector<T> heap_stage(big_head && stream_out ? kTokBlock * D : 0);
    float* const scratch = big_head ? heap_scratch.data() : stack_scratch;
    T* const stage = big_head ? heap_stage.data() : stack_stage;
    float* buf[kTokBlock];
    float* cs[kTokBlock];
    float* sn[kTokBlock];
    for (int64_t t = 0; t < kTokBlock; ++t) {
      buf[t] = scratch + t * buf_stride;
      cs[t] = scratch + kTokBlock * buf_stride + t * tab_stride;
      sn[t] = scratch + kTokBlock * (buf_stride + tab_stride) + t * tab_stride;
    }
    int64_t pos[kTokBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk / blocks_per_seq, s0 = (blk % blocks_per_seq) * kTokBlock;
      const int64_t n = std::min(kTokBlock, S - s0);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t s = s0 + t;
        if (half > 0) {
          convert_row(cosp + b * a.cos_sb + s * a.cos_ss, cs[t], half);
          convert_row(sinp + b * a.sin_sb + s * a.sin_ss, sn[t], half);
        }
        pos[t] = a.cache ? position(a, b, s) : 0;  // in [0, Tmax): check_positions ran before
      }
      // Head slots in the order they sit in a qkv row (slot u at column u * D in both layouts): q heads,
      // k heads, v heads for [q|k|v]; q, k, v of head 0, then of head 1, ... for Persimmon's [H, 3, D].
      // Walking the row in order keeps every token's read one forward stream; Persimmon walked kind by
      // kind read each row three times at a 3D stride (T=512 fp32 without qk-norm: 2.5 -> 1.5 ms).
      for (int64_t u = 0; u < H + 2 * Hkv; ++u) {
        int kind;  // 0: a q head, 1: a k head, 2: a v head
        int64_t h;
        if (a.head_major) {
          kind = static_cast<int>(u % 3);
          h = u / 3;
        } else {
          kind = u < H ? 0 : (u < H + Hkv ? 1 : 2);
          h = kind == 0 ? u : (kind == 1 ? u - H : u - H - Hkv);
        }
        const NormW& nw = kind == 0 ? a.qn : a.kn;
        const T* src[kTokBlock];
        T* dst[kTokBlock];
        for (int64_t t = 0; t < n; ++t) {
          const int64_t s = s0 + t;
          src[t] = qkv + b * a.qkv_sb + s * a.qkv_ss + u * D;
          if (kind == 0) {
            dst[t] = static_cast<T*>(a.q_out) + ((b * H + h) * S + s) * D;
          } else if (a.cache) {
            const int64_t* st = kind == 1 ? a.kc_s : a.vc_s;
            dst[t] = static_cast<T*>(kind == 1 ? a.k_cache : a.v_cache) + b * st[0] + h * st[1] + pos[t] * st[2];
          } else {
            dst[t] = static_cast<T*>(kind == 1 ? a.k_out : a.v_out) + ((b * Hkv + h) * S + s) * D;
          }
        }
        // A dense output's rows for the block are one run; streamed (kStreamOutBytes), they are
        // produced in the stage and copied out in whole cache lines with non-temporal stores
        // (StableLM bf16 T=2048, two threads: 3390 -> 2250 us; software prefetches of the next
        // block's output lines had got it to 2950 us, and did nothing for outputs that fit in L3).
        T* const run = dst[0];
        if (stream_out) {
          for (int64_t t = 0; t < n; ++t) dst[t] = stage + t * D;
        }
        if (kind == 2) {
          for (int64_t t = 0; t < n; ++t) std::memcpy(dst[t], src[t], D * sizeof(T));
        } else if (!nw.w) {
          for (int64_t t = 0; t < n; ++t) rope_store(src[t], dst[t], D, R, cs[t], sn[t], a.interleaved, NoAffine{});
        } else {
          const float* w = nw.w + h * nw.w_head_stride;
          const float* bias = nw.b ? nw.b + h * nw.b_head_stride : nullptr;
          if (layer_norm_heads_in_registers(src, buf, n, D, a.eps, w, bias)) {
            for (int64_t t = 0; t < n; ++t) rope_store(buf[t], dst[t], D, R, cs[t], sn[t], a.interleaved, NoAffine{});
          } else {  // D > 8 * kF: token by token, sweeping the fp32 buffer
            for (int64_t t = 0; t < n; ++t) {
              const float mean = layer_norm_mean(add_and_sum<T, false>(src[t], nullptr, nullptr, D, buf[t]), D);
              const float rstd = layer_norm_rstd(centred_sum_squares(buf[t], mean, D), D, a.eps);
              rope_store(buf[t], dst[t], D, R, cs[t], sn[t], a.interleaved, LayerNormAffine(mean, rstd, w, bias));
            }
          }
        }
        if (stream_out) stream_copy(run, stage, n * D * sizeof(T));
      }
    }
    if (stream_out) stream_fence();
  });
}

QkvArgs make_args(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const OptT& qw,
                  const OptT& qb, const OptT& kw, const OptT& kb, const QkvDims& d, bool interleaved,
                  bool qkv_head_major, double eps, at::Tensor& qkv_c, at::Tensor& cos_c, at::Tensor& sin_c,
                  std::array<at::Tensor, 4>& norms_c) {
  qkv_c = qkv.stride(2) == 1 ? qkv : qkv.contiguous();
  cos_c = cos.stride(2) == 1 ? cos : cos.contiguous();
  sin_c = sin.stride(2) == 1 ? sin : sin.contiguous();
  const OptT* ns[4] = {&qw, &qb, &kw, &kb};
  for (int i = 0; i < 4; ++i) {
    norms_c[i] = ns[i]->has_value() ? (*ns[i])->to(at::kFloat).contiguous() : at::Tensor();
  }
  QkvArgs a{};
  a.B = d.B; a.S = d.S; a.H = d.H; a.Hkv = d.Hkv; a.D = d.D; a.R = d.R;
  a.interleaved = interleaved;
  a.head_major = qkv_head_major;
  a.eps = static_cast<float>(eps);
  a.qkv = qkv_c.const_data_ptr();
  a.qkv_sb = qkv_c.stride(0);
  a.qkv_ss = qkv_c.stride(1);
  a.cos = cos_c.const_data_ptr();
  a.sin = sin_c.const_data_ptr();
  a.cos_sb = cos_c.size(0) == 1 ? 0 : cos_c.stride(0);
  a.cos_ss = cos_c.stride(1);
  a.sin_sb = sin_c.size(0) == 1 ? 0 : sin_c.stride(0);
  a.sin_ss = sin_c.stride(1);
  auto norm = [&](const at::Tensor& w, const at::Tensor& b) {
    NormW n;
    if (w.defined()) {
      n.w = w.const_data_ptr<float>();
      n.w_head_stride = w.dim() == 2 ? d.D : 0;
    }
    if (b.defined()) {
      n.b = b.const_data_ptr<float>();
      n.b_head_stride = b.dim() == 2 ? d.D : 0;
    }
    return n;
  };
  a.qn = norm(norms_c[0], norms_c[1]);
  a.kn = norm(norms_c[2], norms_c[3]);
  return a;
}

void fill_cache_args(QkvArgs& a, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos) {
  a.cache = true;
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.kc_s[i] = k_cache.stride(i);
    a.vc_s[i] = v_cache.stride(i);
  }
  a.pos = pos.const_data_ptr();
  a.pos64 = pos.scalar_type() == at::kLong;
  a.pos_sb = pos.stride(0);
  a.pos_ss = pos.stride(1);
  a.tmax = k_cache.size(2);
  check_positions(a);
}

// q_out always; k_out/v_out (dense) or, when k_cache is defined, the caches + positions.
void run_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const OptT& qw, const OptT& qb,
             const OptT& kw, const OptT& kb, const QkvDims& d, bool interleaved, bool qkv_head_major, double eps,
             const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& v_out, const at::Tensor& k_cache,
             const at::Tensor& v_cache, const at::Tensor& pos) {
  at::Tensor qkv_c, cos_c, sin_c;
  std::array<at::Tensor, 4> norms_c;
  QkvArgs a = make_args(qkv, cos, sin, qw, qb, kw, kb, d, interleaved, qkv_head_major, eps, qkv_c, cos_c, sin_c,
                        norms_c);
  a.q_out = q_out.data_ptr();
  if (k_cache.defined()) {
    fill_cache_args(a, k_cache, v_cache, pos);
  } else {
    a.k_out = k_out.data_ptr();
    a.v_out = v_out.data_ptr();
  }
  if (a.B * a.S == 0) return;
  FASTLM_DISPATCH_FLOAT(qkv.scalar_type(), "qkv_rope", [&] { qkv_kernel<scalar_t>(a); });
}

}  // namespace

FASTLM_QKV_ENTRY_POINTS()

}  // namespace fastlm::cpu
