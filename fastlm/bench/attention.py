"""The ``attention`` suite: decode attention (one query per sequence against its KV cache) at each
family's head layout (fastlm.bench.configs), per fastlm backend, against the call ``transformers``
makes at decode (``sdpa-eager``) and flash-attn's ``flash_attn_with_kvcache`` where it runs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlm import ops
from fastlm.bench import configs
from fastlm.bench.backends import discover, timed_backend
from fastlm.bench.suite import Built, Suite, Unavailable, snapshot


@dataclass(frozen=True)
class AttentionCase:
    layout: str       # the family whose head layout this is
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    context: int

    @property
    def name(self) -> str:
        return (f"decode_attention[{self.layout}-H{self.heads}-KV{self.kv_heads}-D{self.head_dim}]"
                f"/B{self.batch}-ctx{self.context}")

    @property
    def group(self) -> str:
        return f"{self.layout}-B{self.batch}"

    @property
    def shape(self) -> str:
        return f"ctx{self.context}"

    def kv_bytes(self, element_size: int) -> int:
        return 2 * self.batch * self.kv_heads * self.context * self.head_dim * element_size


def contexts(scale: str) -> list[int]:
    return {"tiny": [16, 64], "quick": [128, 512, 2048], "full": [128, 512, 2048, 4096, 8192, 16384]}[scale]


def attention_cases(scale: str = "quick") -> list[AttentionCase]:
    """Each family's (heads, KV heads, head_dim), once per distinct layout, at batch 1 and 8."""
    layouts = {}
    for layer in configs.layers(scale):
        a = layer.attention
        layouts.setdefault((a.num_heads, a.num_kv_heads, a.head_dim), layer.family)
    return [AttentionCase(family, H, Hkv, D, B, T) for (H, Hkv, D), family in layouts.items() for B in (1, 8)
            for T in contexts(scale)]


class _HFAttnModule:
    """The attributes ``transformers``' ``sdpa_attention_forward`` reads off an attention module."""

    def __init__(self, groups: int):
        self.num_key_value_groups = groups
        self.is_causal = True
        self.layer_idx = 0
        self.training = False


def sdpa_eager_decode(q, k, v, scale):
    """Decode attention the way ``transformers`` runs it with a DynamicCache and no padding:
    ``sdpa_attention_forward`` on q [B,H,1,D] against the full K/V [B,Hkv,T,D], mask None (so
    ``enable_gqa`` for GQA, else repeat_kv / pack_gqa as transformers decides). Returns [B,H,D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, D = q.shape
    out, _ = sdpa_attention_forward(_HFAttnModule(H // k.shape[1]), q.unsqueeze(2), k, v, None, scaling=scale,
                                    is_causal=True)
    return out.reshape(B, H, D)  # transformers returns [B, 1, H, D]


def flash_attn_kvcache():
    """``flash_attn_with_kvcache`` when flash-attn is installed, else None."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    return flash_attn_with_kvcache


def kv_cap_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.4)
    return 1 << 30


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class Attention(Suite):
    name = "attention"

    def __init__(self):
        self._last = None  # (case, device, dtype, inputs, sdpa output)

    def cases(self, scale, device=None):
        return attention_cases(scale)

    def providers(self, device_type):
        return ["sdpa-eager"] + [f"fastlm-{b.name}" for b in discover(device_type)] + ["flash-attn"]

    def _inputs(self, case: AttentionCase, device, dtype):
        if self._last is None or self._last[:3] != (case, device, dtype):
            self._last = None
            g = torch.Generator().manual_seed(6)
            B, T, Hkv, D = case.batch, case.context, case.kv_heads, case.head_dim
            q = torch.randn((B, case.heads, D), generator=g).to(device, dtype)
            k = torch.randn((B, Hkv, T, D), generator=g).to(device, dtype)
            v = torch.randn((B, Hkv, T, D), generator=g).to(device, dtype)
            lengths = torch.full((B,), T, dtype=torch.int32, device=device)
            inputs = (q, k, v, lengths, D ** -0.5)
            self._last = (case, device, dtype, inputs, snapshot(sdpa_eager_decode(q, k, v, D ** -0.5)))
        return self._last[3], self._last[4]

    def build(self, case, provider, device, dtype):
        device = torch.device(device)
        kv = case.kv_bytes(torch.empty((), dtype=dtype).element_size())
        if kv > kv_cap_bytes(device):
            raise Unavailable(f"KV cache {_gib(kv)} over this device's benchmark cap {_gib(kv_cap_bytes(device))}")
        backend = timed_backend(provider, device.type, "decode_attention") if provider.startswith("fastlm-") else None
        flash = flash_attn_kvcache() if provider == "flash-attn" else None
        if provider == "flash-attn" and (flash is None or device.type != "cuda" or dtype == torch.float32):
            raise Unavailable("flash-attn not installed" if flash is None else
                              "flash-attn needs CUDA" if device.type != "cuda" else "flash-attn needs fp16/bf16")
        (q, k, v, lengths, scale), expected = self._inputs(case, device, dtype)
        nbytes = 2 * q.numel() * q.element_size() + kv + lengths.numel() * lengths.element_size()
        if provider == "sdpa-eager":
            return Built(lambda: sdpa_eager_decode(q, k, v, scale), nbytes,
                         note="transformers sdpa_attention_forward, DynamicCache, no mask")
        if backend is not None:
            kernel = ops.impl("decode_attention", backend, device.type)  # as patch() calls it: no public checks
            return Built(lambda: kernel(q, k, v, lengths, scale), nbytes,
                         expected=lambda: expected,
                         note="plain-PyTorch reference (einsum, fp32)" if backend == "torch" else "")
        if flash is not None:
            # flash-attn's own cache layout [B, T, Hkv, D]
            kf, vf, q4 = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), q.unsqueeze(1)
            return Built(lambda: flash(q4, kf, vf, cache_seqlens=lengths, softmax_scale=scale, causal=True), nbytes,
                         note="flash_attn_with_kvcache, [B,T,Hkv,D] cache")
        raise Unavailable(f"unknown attention provider {provider!r}")

