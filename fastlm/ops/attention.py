"""Attention: SDPA prefill and decode over a static KV cache with per-sequence lengths (GQA).

* ``prefill_attention(q, k, v, ...)``: q [B, H, S, D], k/v [B, Hkv, T, D]. Without a mask, the C++ CPU
  kernel (csrc/cpu/prefill_attention.cpp: two fp32 GEMMs and a softmax per block of 64 queries); else, and
  on CUDA, eager SDPA (or flash-attn when installed and on CUDA), GQA through ``enable_gqa``. fp16 SDPA on
  a CPU without native fp16 dot products runs in fp32 (see _sdpa). The C++ kernel against ATen's SDPA,
  causal, T = 512, 2 threads, 2-core Zen 4 (SDPA's fp16 widened to fp32 as _sdpa does): [1, 12, 512, 64]
  fp32 / bf16 / fp16 1.50x / 1.62x / 1.56x faster, Arcee's GQA [1, 5 on 1 kv head, 512, 128] 1.26x /
  1.50x / 1.62x, [1, 6, 512, 128] 1.60x / 1.68x / 1.61x; its error against fp64 SDPA equals SDPA's.
* ``decode_attention(q, k_cache, v_cache, lengths, scale)``: one new token per sequence, q [B, H, D],
  caches [B, Hkv, Tmax, D], ``lengths`` [B] (int32/int64, each in [1, Tmax]): sequence b attends to
  cache slots [0, lengths[b]). Query head h reads kv head h // (H / Hkv). fp32 accumulation.
  Slots past a length are never part of the answer, whatever they hold (NaN or inf included).
  A kernel reads each sequence's valid K/V once (2 * len * Hkv * D elements) and q once; eager SDPA
  over the full static cache reads Tmax slots and materialises a mask.

Lengths outside [1, Tmax] raise a ValueError on CPU tensors, in every backend. On CUDA they are not
checked (their values live on the device: a check is a host sync per call), nor inside a torch.compile
graph (which cannot branch on them); there a length above Tmax attends to all Tmax slots and a length
<= 0 gives NaN rows (a softmax over no slots), in the reference and the Triton kernel alike, and no
kernel reads outside the cache.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fastlm._checks import as_finite, check_float, check_index, check_lengths, check_same
from fastlm.ops._registry import declare, dispatch

# the public op(s) and reference(s), re-exported by fastlm.ops
__all__ = ["decode_attention", "prefill_attention", "decode_attention_ref", "prefill_attention_ref"]


def decode_attention_ref(q, k_cache, v_cache, lengths, scale: float):
    B, H, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    span = check_lengths(lengths, T)  # (min, max), on CPU in eager mode
    if span is not None and span[1] < T:  # read only up to the longest sequence
        T = span[1]
        k_cache, v_cache = k_cache[:, :, :T], v_cache[:, :, :T]
    qg = q.float().view(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]: query heads grouped by their kv head
    scores = torch.einsum("bkgd,bktd->bkgt", qg, k_cache.float()) * scale
    valid = torch.arange(T, device=q.device).view(1, 1, 1, T) < lengths.view(B, 1, 1, 1)  # [B, 1, 1, T]
    probs = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    # V slots past a length hold anything (a reused cache: NaN, inf), and 0 * NaN is NaN: never read them
    if span is None:  # without reading the lengths (on the device, or traced): zeroed
        out = torch.einsum("bkgt,bktd->bkgd", probs, v_cache.float().masked_fill(~valid.view(B, 1, T, 1), 0.0))
    elif span[0] < span[1]:  # on CPU, lengths that differ: each sequence over its own slots
        out = torch.stack([torch.einsum("kgt,ktd->kgd", probs[b, ..., :n], v_cache[b, :, :n].float())
                           for b, n in enumerate(lengths.tolist())])
    else:  # one length: every slot read is valid
        out = torch.einsum("bkgt,bktd->bkgd", probs, v_cache.float())
    return out.reshape(B, H, D).to(q.dtype)


def _decode_attention_fake(q, k_cache, v_cache, lengths, scale):
    # also run for a call mixing meta and real tensors, where no kernel checks the devices
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("lengths", lengths)):
        check_same(name, t, q, "q", dtype=False)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


DECODE_ATTENTION = declare("decode_attention", decode_attention_ref, fake=_decode_attention_fake)


def _check_decode(q, k_cache, v_cache, lengths, scale):
    check_float("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got shape {tuple(q.shape)}")
    B, H, D = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_same(name, c, q, "q", required=True)
        if c.dim() != 4 or c.shape[0] != B or c.shape[3] != D or c.shape[1] == 0 or H % c.shape[1]:
            raise ValueError(f"{name} must be [B, Hkv, Tmax, D] with B={B}, D={D} and Hkv > 0 dividing H={H}, "
                             f"got {tuple(c.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    check_index("lengths", lengths, (B,), q, "q")
    return scale if type(scale) is float and math.isfinite(scale) else as_finite("scale", scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float, *, backend: str = "auto") -> torch.Tensor:
    """Attention of one query token per sequence over the first ``lengths[b]`` cache slots -> [B, H, D].
    Differentiable: with grad enabled and an input requiring grad, the reference computes it."""
    scale = _check_decode(q, k_cache, v_cache, lengths, scale)
    fn = dispatch("decode_attention", backend, q.device)
    out = fn(q, k_cache, v_cache, lengths, scale)
    if out.requires_grad and fn is not decode_attention_ref:  # a kernel has no backward
        return decode_attention_ref(q, k_cache, v_cache, lengths, scale)
    return out


def _check_prefill(q, k, v, attn_mask, scale):
    check_float("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, S, D], got shape {tuple(q.shape)}")
    B, H, S, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check_same(name, t, q, "q", required=True)
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] == 0 or H % t.shape[1]:
            raise ValueError(f"{name} must be [B, Hkv, T, D] with B={B} and Hkv > 0 dividing H={H}, "
                             f"got {tuple(t.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have q's head dim D={D}, got shape {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, Hkv, T, Dv] with k's B, Hkv, T = {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    if attn_mask is not None:
        check_same("attn_mask", attn_mask, q, "q", dtype=False, required=True)
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise TypeError(f"attn_mask must be bool or q's dtype ({q.dtype}), got {attn_mask.dtype}")
        full = (B, H, S, k.shape[2])
        if attn_mask.dim() > 4 or any(m not in (1, n) for m, n in zip(attn_mask.shape[::-1], full[::-1])):
            raise ValueError(f"attn_mask must broadcast to [B, H, S, T] = {list(full)}, got {tuple(attn_mask.shape)}")
    return None if scale is None else as_finite("scale", scale)


def prefill_attention_ref(q, k, v, is_causal: bool, scale: float):
    """The op's reference, without a mask: ``_sdpa`` (SDPA, or flash-attn when installed on CUDA)."""
    return _sdpa(q, k, v, None, is_causal, scale)


def _prefill_attention_fake(q, k, v, is_causal, scale):
    for name, t in (("k", k), ("v", v)):
        check_same(name, t, q, "q", dtype=False)
    B, H, S, _ = q.shape
    return q.new_empty((B, S, H, v.shape[3])).transpose(1, 2)  # the C++ kernel's [B, S, H, Dv] memory


PREFILL_ATTENTION = declare("prefill_attention", prefill_attention_ref, fake=_prefill_attention_fake)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      *, is_causal: bool = True, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """SDPA over q [B, H, S, D], k/v [B, Hkv, T, D] -> [B, H, S, D]. A mask (bool, or additive in q's
    dtype, broadcasting to [B, H, S, T]) overrides ``is_causal``; ``is_causal`` masks key j > query i (SDPA's
    top-left alignment), and a single query (S = 1) sees every key. Without a mask, a backend's kernel
    runs it where there is one (the C++ CPU kernel: csrc/cpu/prefill_attention.cpp), else SDPA, as with
    a mask. Differentiable: with grad enabled and an input requiring grad, SDPA computes it."""
    scale = _check_prefill(q, k, v, attn_mask, scale)
    causal = bool(is_causal) and attn_mask is None and q.shape[2] > 1
    # a kernel has no backward (SDPA's graph then); with no keys or D = 0, SDPA's answer (NaN rows)
    if attn_mask is None and k.shape[2] > 0 and q.shape[3] > 0 and not (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        fn = dispatch("prefill_attention", backend, q.device)
        if fn is not prefill_attention_ref:
            return fn(q, k, v, causal, q.shape[-1] ** -0.5 if scale is None else scale)
    return _sdpa(q, k, v, attn_mask, causal, scale)


def _sdpa(q, k, v, attn_mask, causal: bool, scale: float | None) -> torch.Tensor:
    """SDPA (flash-attn on CUDA when installed and possible); ``causal`` as SDPA's is_causal."""
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda and attn_mask is None and q.dtype != torch.float32:
        flash = _flash_attn()
        if flash is not None:
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
            return out.transpose(1, 2)
    if q.dtype == torch.float16 and q.device.type == "cpu" and _cpu_fp16_widens():
        # ATen's CPU SDPA in fp16 runs ~2.4x slower than in fp32 where the CPU has no native fp16 dot products
        # (bf16 runs as fast as fp32): fp32 SDPA on widened copies (exact), the output rounded once, 1.4x
        # fp32's time ([1, 12, 512, 64] causal, 2 threads, Zen 4 at AVX-512 and capped to AVX2)
        mask = attn_mask.float() if attn_mask is not None and attn_mask.dtype != torch.bool else attn_mask
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                             scale=scale, enable_gqa=gqa)
        return out.to(torch.float16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale,
                                          enable_gqa=gqa)


def _cpu_fp16_widens() -> bool:
    """Whether 16-bit GEMMs in fp16 run widened to fp32 on this CPU, under the C++ extension's current mode
    (fastlm.ops.projection: the CPU's native fp16 dot products, ONEDNN_MAX_CPU_ISA, FASTLM_CPU_GEMM16 and
    fastlm._C.set_cpu_gemm16), so that attention and the projections follow one choice. Without the
    extension: unless the CPU has AMX-FP16 (torch has no AVX512-FP16 probe)."""
    query = _gemm16_widens_query()
    return query("float16") if query is not None else not torch.cpu._is_amx_fp16_supported()


@functools.cache
def _gemm16_widens_query():
    """fastlm._C.cpu_gemm16_widens, or None in a pure-Python install (the import looked up once)."""
    try:
        from fastlm import _C
    except ImportError:
        return None
    return _C.cpu_gemm16_widens


_FLASH = []


def _flash_attn():
    if not _FLASH:
        try:
            from flash_attn import flash_attn_func  # optional accelerator
        except Exception:
            flash_attn_func = None
        _FLASH.append(flash_attn_func)
    return _FLASH[0]
