// QKV epilogue: one block per token (b, s), one warp per head vector. A warp loads the head's D
// elements (16-byte packs when aligned) into registers, applies the optional qk-LayerNorm with warp
// reductions, stages the normalised row in shared memory so each lane can fetch its RoPE partner,
// rotates the first rotary_dim elements and writes q (dense [B, H, S, D]) and k/v (dense [B, Hkv, S, D]
// or into the [B, Hkv, Tmax, D] caches at cache_positions[b, s]). v is copied. A position outside
// [0, Tmax) is not checked on the host (that would need a sync): its k/v rows are not written at all,
// so a bad position never writes out of bounds (q is still written).
#pragma once

#include "fastlm/common.cuh"

namespace fastlm {
namespace cuda {

constexpr int kQkvMaxHeadDim = 256;
constexpr int kQkvWarps = 4;

template <typename T>
struct QkvParams {
  int B, S, H, Hkv, D, R;
  bool interleaved, qkv_head_major;
  float eps;
  const T* qkv;
  int64_t qkv_sb, qkv_ss;  // strides of [B, S, W] in elements; last dim contiguous
  const T* cos;
  const T* sin;            // [B or 1, S, >= R]; last dim contiguous
  int64_t cos_sb, cos_ss, sin_sb, sin_ss;  // cos_sb = 0 when broadcast over the batch
  const T* q_w; const T* q_b; const T* k_w; const T* k_b;  // nullable; [D] or [heads, D]
  int64_t q_w_hs, q_b_hs, k_w_hs, k_b_hs;                // per-head strides: D or 0 (shared)
  T* q_out;                // [B, H, S, D] contiguous
  T* k_out; T* v_out;      // [B, Hkv, S, D] contiguous (dense mode)
  T* k_cache; T* v_cache;  // cache mode (k_out == nullptr): [B, Hkv, Tmax, D], last dim contiguous
  int64_t kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2;
  const void* positions;   // [B, S] int32 or int64
  bool positions64;
  int64_t pos_sb, pos_ss;
  int64_t tmax;            // cache slots: k/v of a position outside [0, tmax) are dropped
};

template <typename T, int V>
__global__ void __launch_bounds__(kQkvWarps * 32, 4) qkv_rope_kernel(const QkvParams<T> p) {
  constexpr int K = (kQkvMaxHeadDim + 32 * V - 1) / (32 * V);  // packs per lane
  __shared__ float row_smem[kQkvWarps][kQkvMaxHeadDim];
  const int tok = blockIdx.x;
  const int b = tok / p.S, s = tok % p.S;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = p.D, half = p.R / 2;
  const T* row = p.qkv + b * p.qkv_sb + s * p.qkv_ss;
  const T* cos_row = p.cos + b * p.cos_sb + s * p.cos_ss;
  const T* sin_row = p.sin + b * p.sin_sb + s * p.sin_ss;
  int64_t pos = 0;
  if (p.k_out == nullptr) {
    pos = p.positions64 ? static_cast<const int64_t*>(p.positions)[b * p.pos_sb + s * p.pos_ss]
                        : static_cast<const int32_t*>(p.positions)[b * p.pos_sb + s * p.pos_ss];
  }
  float* sm = row_smem[warp];
  const int total_heads = p.H + 2 * p.Hkv;
  for (int slot = warp; slot < total_heads; slot += kQkvWarps) {
    const int kind = slot < p.H ? 0 : (slot < p.H + p.Hkv ? 1 : 2);
    const int h = kind == 0 ? slot : (kind == 1 ? slot - p.H : slot - p.H - p.Hkv);
    if (kind != 0 && p.k_out == nullptr && (pos < 0 || pos >= p.tmax)) continue;  // warp-uniform
    const T* src = p.qkv_head_major ? row + (3 * h + kind) * D : row + slot * D;
    T* dst;
    if (kind == 0) {
      dst = p.q_out + ((static_cast<int64_t>(b) * p.H + h) * p.S + s) * D;
    } else if (p.k_out != nullptr) {
      dst = (kind == 1 ? p.k_out : p.v_out) + ((static_cast<int64_t>(b) * p.Hkv + h) * p.S + s) * D;
    } else if (kind == 1) {
      dst = p.k_cache + b * p.kc_s0 + h * p.kc_s1 + pos * p.kc_s2;
    } else {
      dst = p.v_cache + b * p.vc_s0 + h * p.vc_s1 + pos * p.vc_s2;
    }
    float r[K][V];
#pragma unroll
    for (int c = 0; c < K; ++c) {
      const int e = (lane + 32 * c) * V;
      if (e < D) load_f32<T, V>(src + e, r[c]);
    }
    if (kind == 2) {
#pragma unroll
      for (int c = 0; c < K; ++c) {
        const int e = (lane + 32 * c) * V;
        if (e < D) store_f32<T, V>(dst + e, r[c]);
      }
      continue;
    }
    const T* nw = kind == 0 ? p.q_w : p.k_w;
    if (nw != nullptr) {
      const T* nb = kind == 0 ? p.q_b : p.k_b;
      nw += h * (kind == 0 ? p.q_w_hs : p.k_w_hs);
      if (nb != nullptr) nb += h * (kind == 0 ? p.q_b_hs : p.k_b_hs);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < K; ++c) {
        const int e = (lane + 32 * c) * V;
#pragma unroll
        for (int k = 0; k < V; ++k) sum += e < D ? r[c][k] : 0.f;
      }
      const float mean = layer_norm_mean(warp_sum(sum), D);
      float m2 = 0.f;
#pragma unroll
      for (int c = 0; c < K; ++c) {
        const int e = (lane + 32 * c) * V;
#pragma unroll
        for (int k = 0; k < V; ++k) m2 += e < D ? (r[c][k] - mean) * (r[c][k] - mean) : 0.f;
      }
      const float rstd = layer_norm_rstd(warp_sum(m2), D, p.eps);
#pragma unroll
      for (int c = 0; c < K; ++c) {
        const int e = (lane + 32 * c) * V;
        if (e < D) {
          float wv[V], bv[V];
          load_f32<T, V>(nw + e, wv);
          if (nb != nullptr) {
            load_f32<T, V>(nb + e, bv);
          } else {
#pragma unroll
            for (int k = 0; k < V; ++k) bv[k] = 0.f;
          }
#pragma unroll
          for (int k = 0; k < V; ++k) r[c][k] = layer_norm_apply(r[c][k], mean, rstd, wv[k], bv[k]);
        }
      }
    }
    if (half > 0) {
      __syncwarp();  // the previous head's readers are done with sm
#pragma unroll
      for (int c = 0; c < K; ++c) {
        const int e = (lane + 32 * c) * V;
        if (e < D) {
#pragma unroll
          for (int k = 0; k < V; ++k) sm[e + k] = r[c][k];
        }
      }
      __syncwarp();
#pragma unroll
      for (int c = 0; c < K; ++c) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const int e = (lane + 32 * c) * V + k;
          if (e < p.R) {
            int i, partner;
            bool first;
            if (p.interleaved) {
              i = e >> 1;
              first = (e & 1) == 0;
              partner = e ^ 1;
            } else {
              first = e < half;
              i = first ? e : e - half;
              partner = first ? e + half : e - half;
            }
            float x0 = first ? r[c][k] : sm[partner];
            float x1 = first ? sm[partner] : r[c][k];
            rope_rotate(x0, x1, Cvt<T>::to(cos_row[i]), Cvt<T>::to(sin_row[i]));
            r[c][k] = first ? x0 : x1;
          }
        }
      }
    }
#pragma unroll
    for (int c = 0; c < K; ++c) {
      const int e = (lane + 32 * c) * V;
      if (e < D) store_f32<T, V>(dst + e, r[c]);
    }
  }
}

// Dense outputs when p.k_out != nullptr, else the cache write. Returns cudaErrorInvalidValue for
// head_dim > 256.
template <typename T>
cudaError_t qkv_rope(const QkvParams<T>& p, cudaStream_t stream) {
  if (p.D > kQkvMaxHeadDim || p.D <= 0) return cudaErrorInvalidValue;
  if (p.B == 0 || p.S == 0) return cudaSuccess;
  constexpr int V = pack_size<T>();
  bool vec = p.D % V == 0 && aligned16(p.qkv) && p.qkv_sb % V == 0 && p.qkv_ss % V == 0 && aligned16(p.q_out);
  if (p.k_out != nullptr) {
    vec = vec && aligned16(p.k_out) && aligned16(p.v_out);
  } else {
    vec = vec && aligned16(p.k_cache) && aligned16(p.v_cache) && p.kc_s0 % V == 0 && p.kc_s1 % V == 0 &&
          p.kc_s2 % V == 0 && p.vc_s0 % V == 0 && p.vc_s1 % V == 0 && p.vc_s2 % V == 0;
  }
  const T* norms[4] = {p.q_w, p.q_b, p.k_w, p.k_b};
  for (int i = 0; i < 4; ++i) vec = vec && (norms[i] == nullptr || aligned16(norms[i]));
  const dim3 grid(static_cast<unsigned>(p.B) * static_cast<unsigned>(p.S));
  if (vec) {
    qkv_rope_kernel<T, V><<<grid, kQkvWarps * 32, 0, stream>>>(p);
  } else {
    qkv_rope_kernel<T, 1><<<grid, kQkvWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// Explicit instantiations for one element type T, expanded by csrc/cuda_kernels/instantiate.cu.
#define FASTLM_QKV_ROPE_INSTANTIATE(T) template cudaError_t qkv_rope<T>(const QkvParams<T>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastlm
