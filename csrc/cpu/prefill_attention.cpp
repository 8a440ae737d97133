// Prefill attention on CPU: out = softmax(q k^T * scale (+ causal mask)) v for q [B, H, S, D] over k [B, Hkv, T, D]
// and v [B, Hkv, T, Dv] (GQA: query head h reads kv head h / (H / Hkv)); is_causal masks key j > query i
// (aligned top-left, as SDPA's is_causal). fp32 arithmetic throughout, one rounding of the output.
//
// Algorithm: blocks of kQueryRows queries of one head are the tasks. A task multiplies its fp32 queries
// with every key it may see (keys [0, min(T, i1)) under the causal mask) in one GEMM into a score tile
// [rows, keys], takes each row's softmax in place (exp_u1; masked and past-the-diagonal scores are 0), and
// multiplies the tile with the same keys' values in a second GEMM; each output row is divided by its sum
// once. Both GEMMs are ATen's single-threaded fp32 GEMM inside one parallel region over the tasks (as in
// csrc/cpu/widened_gemm.h); 16-bit K and V are widened to fp32 once per call, q block by block. A task
// pairs query block p with block nb - 1 - p, so that every task has the same causal work and the threads'
// halves of the range come out even.
// Work: 4 * S * T * D flops without the mask, about half with it (block by block, the diagonal blocks
// whole); K and V are read from L2 / L3 once per task, ~(2 * T * D * 4) bytes against the task's
// 4 * 64 * T * D flops. No online softmax: a block's whole score tile stays in L2 up to T ~ 2k
// (kQueryRows * T * 4 bytes: 256 KB at T = 1024), so each score is written once and read twice (max and
// exp, then the GEMM); beyond, it streams through L3.
// Against ATen's CPU flash attention (its fp32 GEMMs on smaller blocks, a rescaled running softmax per
// key block; fp16 on CPUs without native fp16 dot products widened by the caller): [1, 12, 512, 64] causal,
// 2 threads, Zen 4, see the header of fastlm/ops/attention.py for the measured times.
#include "../checks.h"
#include "../op_list.h"
#include "vec_util.h"
#include "widened_gemm.h"

#include <c10/core/InferenceMode.h>

#include <limits>
#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

constexpr int64_t kQueryRows = 64;  // queries per block (a GEMM's rows)

// Row-wise softmax of s [rows, cols] in place, scaled first; row r keeps its first limit(r) entries and
// zeroes the rest. Returns each row's sum of exponentials in sums [rows].
template <typename Limit>
inline void softmax_rows(float* s, int64_t rows, int64_t cols, float scale, const Limit& limit, float* sums) {
  const fVec vscale(scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * cols;
    const int64_t n = limit(r);
    fVec vmax(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + kF <= n; j += kF) vmax = at::vec::maximum(vmax, fVec::loadu(row + j) * vscale);
    float m = hmax(vmax);
    for (; j < n; ++j) m = std::max(m, row[j] * scale);
    const fVec vm(m);
    fVec vsum(0.f);
    for (j = 0; j + kF <= n; j += kF) {
      const fVec p = exp_u1(fVec::loadu(row + j) * vscale - vm);
      p.store(row + j);
      vsum = vsum + p;
    }
    if (j < n) {
      const int64_t t = n - j;
      const fVec p = fVec::set(fVec(0.f), exp_u1(fVec::loadu(row + j, t) * vscale - vm), t);
      p.store(row + j, t);
      vsum = vsum + p;
      j = n;
    }
    std::fill(row + j, row + cols, 0.f);
    sums[r] = hsum(vsum);
  }
}

// t [B, Hkv, T, D] as fp32 rows of unit stride: t itself for such fp32, else widened once (row by row in
// parallel; ATen's dtype copy of the transposed bf16 views ran ~2x slower than the attention's GEMMs).
template <typename E>
at::Tensor rows_as_f32(const at::Tensor& t) {
  if (std::is_same_v<E, float> && t.stride(3) == 1) return t;
  at::Tensor f = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const int64_t heads = t.size(1), T = t.size(2), D = t.size(3);
  const E* src = reinterpret_cast<const E*>(t.const_data_ptr());
  float* dst = f.data_ptr<float>();
  at::parallel_for(0, t.size(0) * heads * T, grain_for(D, 16384), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * T), hk = row / T % heads, j = row % T;
      const E* s = src + b * t.stride(0) + hk * t.stride(1) + j * t.stride(2);
      if (t.stride(3) == 1) {
        convert_row(s, dst + row * D, D);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[row * D + d] = static_cast<float>(s[d * t.stride(3)]);
      }
    }
  });
  return f;
}

template <typename E>
void attention_kernel(const at::Tensor& q, const at::Tensor& kf, const at::Tensor& vf, bool is_causal, float scale,
                      const at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const int64_t Hkv = kf.size(1), T = kf.size(2), Dv = vf.size(3), G = H / Hkv;
  const int64_t blocks = (S + kQueryRows - 1) / kQueryRows, pairs = (blocks + 1) / 2;
  const E* qp = reinterpret_cast<const E*>(q.const_data_ptr());
  E* op = reinterpret_cast<E*>(out.data_ptr());  // [B, S, H, Dv] memory
  at::parallel_for(0, B * H * pairs, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode no_autograd;  // worker threads do not inherit it (see widened_gemm.h)
    const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
    float* qb = thread_scratch(kAttentionSlot, kQueryRows * (D + T + Dv + 1));  // q rows, scores, outputs, sums
    float* sc = qb + kQueryRows * D;
    float* ob = sc + kQueryRows * T;
    float* sums = ob + kQueryRows * Dv;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task % pairs, bh = task / pairs, b = bh / H, h = bh % H, hk = h / G;
      const E* qh = qp + b * q.stride(0) + h * q.stride(1);
      const at::Tensor kh = kf.select(0, b).select(0, hk), vh = vf.select(0, b).select(0, hk);  // [T, D / Dv]
      const int64_t pair_blocks[2] = {p, blocks - 1 - p};
      for (int u = 0; u < (pair_blocks[1] != p ? 2 : 1); ++u) {  // one block in the middle of an odd count
        const int64_t blk = pair_blocks[u];
        const int64_t i0 = blk * kQueryRows, rows = std::min(kQueryRows, S - i0);
        const int64_t keys = is_causal ? std::min(T, i0 + rows) : T;
        for (int64_t r = 0; r < rows; ++r) convert_row(qh + (i0 + r) * q.stride(2), qb + r * D, D);
        at::Tensor scores = at::from_blob(sc, {rows, keys}, f32);
        at::mm_out(scores, at::from_blob(qb, {rows, D}, f32), kh.narrow(0, 0, keys).t());
        softmax_rows(sc, rows, keys, scale,
                     [&](int64_t r) { return is_causal ? std::min(keys, i0 + r + 1) : keys; }, sums);
        at::Tensor o = at::from_blob(ob, {rows, Dv}, f32);
        at::mm_out(o, scores, vh.narrow(0, 0, keys));  // no keys (T = 0): zeros
        for (int64_t r = 0; r < rows; ++r) {  // / sum (0 / 0 = NaN where no key is visible, as in SDPA)
          float* orow = ob + r * Dv;
          const float inv = 1.f / sums[r];
          for (int64_t j = 0; j < Dv; ++j) orow[j] *= inv;
          convert_row(orow, op + ((b * S + i0 + r) * H + h) * Dv, Dv);
        }
      }
    }
  });
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal,
                             double scale) {
  check_float("q", q);
  TORCH_CHECK_VALUE(q.dim() == 4, "fastlm: q must be [B, H, S, D], got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}}) {
    check_like(name, *t, q, "q");
    TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) > 0 && H % t->size(1) == 0, "fastlm: ", name,
                      " must be [B, Hkv, T, D] with B=", B, " and Hkv > 0 dividing H=", H, ", got ", t->sizes());
  }
  TORCH_CHECK_VALUE(k.size(3) == D, "fastlm: k must have q's head dim D=", D, ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
                    "fastlm: v must be [B, Hkv, T, Dv] with k's B, Hkv, T, got ", v.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "fastlm: scale must be finite, got ", scale);
  const int64_t Dv = v.size(3);
  // [B, S, H, Dv] memory (what the caller's transpose(1, 2).reshape(B, S, H * Dv) reads as a view)
  at::Tensor out = at::empty({B, S, H, Dv}, q.options()).transpose(1, 2);
  if (out.numel() == 0) return out;
  FASTLM_DISPATCH_FLOAT(q.scalar_type(), "prefill_attention", [&] {
    attention_kernel<scalar_t>(q, rows_as_f32<scalar_t>(k), rows_as_f32<scalar_t>(v), is_causal,
                               static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace fastlm::cpu
