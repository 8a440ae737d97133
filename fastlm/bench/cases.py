"""Case definitions shared by the ``fastlm bench`` driver and the pytest-benchmark files in
``benchmarks/``: shapes at the real families' sizes, input builders, and each case's callables per
provider (``eager`` = the ``*_ref`` composition, ``compile`` = ``torch.compile`` of it,
``fastlm-<backend>`` = the public op with ``backend=``).

Scales: ``full`` (real sizes, all shapes), ``quick`` (real sizes, fewer shapes), ``tiny`` (test-sized).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fastlm import ops
from fastlm.ops.activations import relu2_ref, swiglu_ref
from fastlm.ops.attention import decode_attention_ref
from fastlm.ops.layer_norm import add_layer_norm_ref
from fastlm.ops.qkv_rope import qkv_rope_cache_ref, qkv_rope_ref
from fastlm.ops.rms_norm import add_rms_norm_ref

SCALES = ("tiny", "quick", "full")

# The real families' layer sizes (FAMILIES.md section 6; head layouts as in the brief for issue #6).
FAMILY_SHAPES = {
    "arcee": dict(hidden=2560, heads=32, kv_heads=32, head_dim=80, rotary_dim=80, interleaved=False,
                  per_head_layout=False, qk_norm="none", norm="rms", rms_weight_in_fp32=False, eps=1e-5,
                  mlp="relu2", intermediate=18432),
    "stablelm": dict(hidden=2560, heads=32, kv_heads=32, head_dim=80, rotary_dim=20, interleaved=False,
                     per_head_layout=False, qk_norm="per_head", norm="layer", eps=1e-5, mlp="swiglu",
                     intermediate=6912),
    "persimmon": dict(hidden=4096, heads=64, kv_heads=64, head_dim=64, rotary_dim=32, interleaved=False,
                      per_head_layout=True, qk_norm="shared", norm="layer", eps=1e-5, mlp="relu2",
                      intermediate=16384),
    "helium": dict(hidden=2560, heads=20, kv_heads=20, head_dim=128, rotary_dim=128, interleaved=True,
                   per_head_layout=False, qk_norm="none", norm="rms", rms_weight_in_fp32=True, eps=1e-8,
                   mlp="swiglu", intermediate=7040),
}

# Test-sized twins: same quirks (partial / interleaved RoPE, layouts, qk-norm kinds), tiny sizes.
TINY_SHAPES = {
    "arcee": dict(FAMILY_SHAPES["arcee"], hidden=64, heads=4, kv_heads=4, head_dim=16, rotary_dim=16,
                  intermediate=128),
    "stablelm": dict(FAMILY_SHAPES["stablelm"], hidden=80, heads=4, kv_heads=4, head_dim=20, rotary_dim=4,
                     intermediate=96),
    "persimmon": dict(FAMILY_SHAPES["persimmon"], hidden=64, heads=4, kv_heads=4, head_dim=16, rotary_dim=8,
                      intermediate=128),
    "helium": dict(FAMILY_SHAPES["helium"], hidden=64, heads=2, kv_heads=2, head_dim=32, rotary_dim=32,
                   intermediate=96),
}


def family_shapes(scale: str) -> dict:
    return TINY_SHAPES if scale == "tiny" else FAMILY_SHAPES


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int

    @property
    def decode(self) -> bool:
        return self.tokens == 1


def kernel_shapes(scale: str) -> list[Shape]:
    if scale == "tiny":
        return [Shape("prefill-T8", 1, 8), Shape("decode-B2", 2, 1)]
    shapes = [Shape("prefill-T512", 1, 512)]
    if scale == "full":
        shapes.append(Shape("prefill-T2048", 1, 2048))
    return shapes + [Shape("decode-B1", 1, 1), Shape("decode-B8", 8, 1)]


# ---------------------------------------------------------------------------------------------
# Kernel cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Bound:
    """One case's inputs on a device: the eager composition, the public op per backend, bytes moved."""
    ref: Callable                      # the *_ref function (compiled for the ``compile`` provider)
    ref_args: tuple
    public: Callable[[str], Callable[[], object]]  # backend -> zero-arg callable
    nbytes: int

    def eager(self) -> Callable[[], object]:
        return lambda: self.ref(*self.ref_args)


@dataclass
class KernelCase:
    op: str          # fastlm op name (the registry key)
    variant: str     # family / cast order
    shape: Shape
    spec: dict = field(repr=False)
    build: Callable[["KernelCase", torch.device, torch.dtype], Bound] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.op}[{self.variant}]/{self.shape.name}"

    @property
    def group(self) -> str:
        return f"{self.op}[{self.variant}]"


def _gen(seed: int, device) -> torch.Generator:
    # random data generated on CPU for reproducibility, then moved
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, device, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def _build_rms(case: KernelCase, device, dtype) -> Bound:
    s, B, T = case.spec, case.shape.batch, case.shape.tokens
    N, g = s["hidden"], _gen(0, device)
    x, res = _randn((B, T, N), dtype, device, g), _randn((B, T, N), dtype, device, g)
    w = _randn((N,), dtype, device, g, 0.1) + 1
    eps, wf = s["eps"], s["rms_weight_in_fp32"]
    es = x.element_size()
    return Bound(add_rms_norm_ref, (x, res, w, eps, wf),
                 lambda b: (lambda: ops.add_rms_norm(x, res, w, eps, wf, backend=b)),
                 4 * B * T * N * es + w.numel() * w.element_size())


def _build_ln(case: KernelCase, device, dtype) -> Bound:
    s, B, T = case.spec, case.shape.batch, case.shape.tokens
    N, g = s["hidden"], _gen(1, device)
    x, res = _randn((B, T, N), dtype, device, g), _randn((B, T, N), dtype, device, g)
    w, b_ = _randn((N,), dtype, device, g, 0.1) + 1, _randn((N,), dtype, device, g, 0.1)
    eps, es = s["eps"], x.element_size()
    return Bound(add_layer_norm_ref, (x, res, w, b_, eps),
                 lambda b: (lambda: ops.add_layer_norm(x, res, w, b_, eps, backend=b)),
                 4 * B * T * N * es + 2 * N * es)


def _qkv_inputs(case: KernelCase, device, dtype, seed=2):
    s, B, T = case.spec, case.shape.batch, case.shape.tokens
    H, Hkv, D, r = s["heads"], s["kv_heads"], s["head_dim"], s["rotary_dim"]
    g = _gen(seed, device)
    W = (H + 2 * Hkv) * D
    qkv = _randn((B, T, W), dtype, device, g)
    # HF-style tables: cat(freqs, freqs) at random positions
    pos = torch.randint(0, 4096, (B, T), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / max(r, 1)))
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    norm = {}
    if s["qk_norm"] == "per_head":
        norm = dict(q_norm_weight=_randn((H, D), dtype, device, g, 0.1) + 1,
                    k_norm_weight=_randn((Hkv, D), dtype, device, g, 0.1) + 1)
    elif s["qk_norm"] == "shared":
        norm = dict(q_norm_weight=_randn((D,), dtype, device, g, 0.1) + 1,
                    q_norm_bias=_randn((D,), dtype, device, g, 0.1),
                    k_norm_weight=_randn((D,), dtype, device, g, 0.1) + 1,
                    k_norm_bias=_randn((D,), dtype, device, g, 0.1))
    static = dict(num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary_dim=r, interleaved=s["interleaved"],
                  per_head_layout=s["per_head_layout"], qk_norm_eps=s["eps"])
    es = qkv.element_size()
    nbytes = 2 * qkv.numel() * es + 2 * B * T * (r // 2) * es + sum(t.numel() * t.element_size()
                                                                    for t in norm.values())
    return qkv, cos, sin, norm, static, nbytes


def _norm_args(norm):
    return tuple(norm.get(k) for k in ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias"))


def _static_args(st):
    return (st["num_heads"], st["num_kv_heads"], st["head_dim"], st["rotary_dim"], st["interleaved"],
            st["per_head_layout"], st["qk_norm_eps"])


def _build_qkv(case: KernelCase, device, dtype) -> Bound:
    qkv, cos, sin, norm, st, nbytes = _qkv_inputs(case, device, dtype)
    return Bound(qkv_rope_ref, (qkv, cos, sin, *_norm_args(norm), *_static_args(st)),
                 lambda b: (lambda: ops.qkv_rope(qkv, cos, sin, **norm, **st, backend=b)), nbytes)


def _build_qkv_cache(case: KernelCase, device, dtype) -> Bound:
    qkv, cos, sin, norm, st, nbytes = _qkv_inputs(case, device, dtype)
    B, T = case.shape.batch, case.shape.tokens
    Tmax = 256 if case.spec["hidden"] > 256 else 16
    kc = torch.zeros(B, st["num_kv_heads"], Tmax, st["head_dim"], device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    g = _gen(3, device)
    positions = torch.randint(0, Tmax - T, (B, 1), generator=g) + torch.arange(T).view(1, T)
    positions = positions.to(device)
    nbytes += positions.numel() * positions.element_size()
    return Bound(qkv_rope_cache_ref, (qkv, cos, sin, *_norm_args(norm), kc, vc, positions, *_static_args(st)),
                 lambda b: (lambda: ops.qkv_rope_cache(qkv, cos, sin, kc, vc, positions, **norm, **st, backend=b)),
                 nbytes)


def _build_swiglu(case: KernelCase, device, dtype) -> Bound:
    B, T, I = case.shape.batch, case.shape.tokens, case.spec["intermediate"]
    gu = _randn((B, T, 2 * I), dtype, device, _gen(4, device))
    return Bound(swiglu_ref, (gu,), lambda b: (lambda: ops.swiglu(gu, backend=b)),
                 3 * B * T * I * gu.element_size())


def _build_relu2(case: KernelCase, device, dtype) -> Bound:
    B, T, I = case.shape.batch, case.shape.tokens, case.spec["intermediate"]
    x = _randn((B, T, I), dtype, device, _gen(5, device))
    return Bound(relu2_ref, (x,), lambda b: (lambda: ops.relu2(x, backend=b)), 2 * B * T * I * x.element_size())


def _build_swiglu_inplace(case: KernelCase, device, dtype) -> Bound:
    """swiglu_ as the fused MLP calls it, on its GEMM output, against the composition it replaces (HF's
    out-of-place silu(gate) * up, on the same input). Each backend times its own copy, which every
    call overwrites, so the input is a fixed point: gate in [-2, -0.05], up = 1 + exp(-gate) makes
    silu(gate) * up = gate, and the map contracts there (derivative 1 + gate * sigmoid(-gate) in
    (-1, 1)), so rounding does not drift. Random data would decay into denormals within a few dozen
    calls, which slow exp ~1.5x on this CPU and are not what a GEMM output holds."""
    B, T, I = case.shape.batch, case.shape.tokens, case.spec["intermediate"]
    gen = _gen(4, device)
    gate = torch.rand((B, T, I), generator=gen) * -1.95 - 0.05
    gu = torch.cat([gate, 1 + torch.exp(-gate)], dim=-1).to(device=device, dtype=dtype)
    return Bound(swiglu_ref, (gu,), lambda b: (lambda w: (lambda: ops.swiglu_(w, backend=b)))(gu.clone()),
                 3 * B * T * I * gu.element_size())


def _build_relu2_inplace(case: KernelCase, device, dtype) -> Bound:
    """relu2_ as the fused MLP calls it, against HF's out-of-place relu then square on the same input.
    Each backend times its own copy; repeated calls drive every element to 0 or inf within the
    warm-up calls (no denormals after), and max / multiply cost the same on those."""
    bound = _build_relu2(case, device, dtype)
    x = bound.ref_args[0]
    bound.public = lambda b: (lambda w: (lambda: ops.relu2_(w, backend=b)))(x.clone())
    return bound


def kernel_cases(scale: str = "quick") -> list[KernelCase]:
    """Every fused op at each family's size, for each shape: the family's norm (RMS with its cast
    order, or LayerNorm), its QKV epilogue (plus the cache-writing twin for decode shapes), its MLP
    activation out of place and in place (``swiglu_`` / ``relu2_``, the forms the fused MLP runs:
    ``relu2_`` always, ``swiglu_`` beyond decode sizes)."""
    cases = []
    fams = family_shapes(scale)
    for shape in kernel_shapes(scale):
        for fam, s in fams.items():
            if s["norm"] == "rms":
                variant = f"{fam}:" + ("w-fp32" if s["rms_weight_in_fp32"] else "w-after-cast")
                cases.append(KernelCase("add_rms_norm", variant, shape, s, _build_rms))
            else:
                cases.append(KernelCase("add_layer_norm", fam, shape, s, _build_ln))
            cases.append(KernelCase("qkv_rope", fam, shape, s, _build_qkv))
            if shape.decode:
                cases.append(KernelCase("qkv_rope_cache", fam, shape, s, _build_qkv_cache))
            if s["mlp"] == "swiglu":
                cases.append(KernelCase("swiglu", fam, shape, s, _build_swiglu))
                if not shape.decode:  # the fused MLP calls swiglu_ beyond decode sizes only (fastlm.modules.mlp)
                    cases.append(KernelCase("swiglu_", fam, shape, s, _build_swiglu_inplace))
            else:
                cases.append(KernelCase("relu2", fam, shape, s, _build_relu2))
                cases.append(KernelCase("relu2_", fam, shape, s, _build_relu2_inplace))
    return cases


# ---------------------------------------------------------------------------------------------
# Attention cases
# ---------------------------------------------------------------------------------------------
ATTN_LAYOUTS = {
    # MHA as in StableLM-3B / Arcee-doc (H 32, D 80); GQA 4:1 at D 128 (Llama-style GQA).
    "mha": dict(heads=32, kv_heads=32, head_dim=80),
    "gqa": dict(heads=32, kv_heads=8, head_dim=128),
}
ATTN_TINY = {"mha": dict(heads=4, kv_heads=4, head_dim=16), "gqa": dict(heads=4, kv_heads=2, head_dim=16)}


@dataclass
class AttentionCase:
    layout: str
    batch: int
    context: int
    spec: dict = field(repr=False)

    @property
    def name(self) -> str:
        s = self.spec
        return (f"decode_attention[{self.layout}-H{s['heads']}-KV{s['kv_heads']}-D{s['head_dim']}]"
                f"/B{self.batch}-ctx{self.context}")

    @property
    def group(self) -> str:
        return f"{self.layout}-B{self.batch}"

    def kv_bytes(self, element_size: int) -> int:
        s = self.spec
        return 2 * self.batch * s["kv_heads"] * self.context * s["head_dim"] * element_size

    def build(self, device, dtype):
        s, B, T = self.spec, self.batch, self.context
        H, Hkv, D = s["heads"], s["kv_heads"], s["head_dim"]
        g = _gen(6, device)
        q = _randn((B, H, D), dtype, device, g)
        k = _randn((B, Hkv, T, D), dtype, device, g)
        v = _randn((B, Hkv, T, D), dtype, device, g)
        lengths = torch.full((B,), T, dtype=torch.int32, device=device)
        scale = D ** -0.5
        es = q.element_size()
        nbytes = 2 * q.numel() * es + 2 * B * Hkv * T * D * es + lengths.numel() * 4
        return dict(q=q, k=k, v=v, lengths=lengths, scale=scale, nbytes=nbytes)


def attention_contexts(scale: str) -> list[int]:
    return {"tiny": [16, 64], "quick": [128, 512, 2048], "full": [128, 512, 2048, 4096, 8192, 16384]}[scale]


def attention_cases(scale: str = "quick") -> list[AttentionCase]:
    layouts = ATTN_TINY if scale == "tiny" else ATTN_LAYOUTS
    return [AttentionCase(name, B, T, spec) for name, spec in layouts.items() for B in (1, 8)
            for T in attention_contexts(scale)]


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
    B, H, D = q.shape
    groups = H // k.shape[1]
    q4 = q.unsqueeze(2)
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except Exception:  # pragma: no cover - older/newer transformers layout
        out = torch.nn.functional.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=groups > 1)
        return out.squeeze(2)
    module = _HFAttnModule(groups)
    out, _ = sdpa_attention_forward(module, q4, k, v, None, scaling=scale, is_causal=True)
    return out.reshape(B, H, D)  # transformers returns [B, 1, H, D]


def attention_ref(q, k, v, lengths, scale):
    return decode_attention_ref(q, k, v, lengths, scale)


def flash_attn_kvcache():
    """``flash_attn_with_kvcache`` when flash-attn is installed, else None."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    return flash_attn_with_kvcache


# ---------------------------------------------------------------------------------------------
# End-to-end models (prefill / decode / opcount)
# ---------------------------------------------------------------------------------------------
# About 100M parameters each on CPU (vocab 32000, untied embeddings), keeping each family's quirks:
# head_dim, partial / interleaved RoPE, Persimmon's fused [H,3,D] QKV, qk-norm kinds.
E2E_SMALL = {
    "arcee": dict(hidden_size=960, num_attention_heads=12, num_key_value_heads=12, head_dim=80,
                  intermediate_size=3840, num_hidden_layers=4, vocab_size=32000),
    "stablelm": dict(hidden_size=960, num_attention_heads=12, num_key_value_heads=12, intermediate_size=2560,
                     num_hidden_layers=4, vocab_size=32000, partial_rotary_factor=0.25, qk_layernorm=True),
    "persimmon": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=7,
                      vocab_size=32000, qk_layernorm=True, partial_rotary_factor=0.5),
    "helium": dict(hidden_size=768, num_attention_heads=6, num_key_value_heads=6, head_dim=128,
                   intermediate_size=2112, num_hidden_layers=7, vocab_size=32000),
}
# The real sizes (FAMILIES.md section 6), for GPUs.
E2E_REAL = {
    "arcee": dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=32, head_dim=80,
                  intermediate_size=18432, num_hidden_layers=32, vocab_size=32000),
    "stablelm": dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=32, intermediate_size=6912,
                     num_hidden_layers=32, vocab_size=50304, partial_rotary_factor=0.25, qk_layernorm=True),
    "persimmon": dict(hidden_size=4096, num_attention_heads=64, intermediate_size=16384, num_hidden_layers=36,
                      vocab_size=262144, qk_layernorm=True, partial_rotary_factor=0.5),
    "helium": dict(hidden_size=2560, num_attention_heads=20, num_key_value_heads=20, head_dim=128,
                   intermediate_size=7040, num_hidden_layers=24, vocab_size=48000),
}
E2E_TINY = {
    "arcee": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, num_hidden_layers=2, vocab_size=256),
    "stablelm": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                     num_hidden_layers=2, vocab_size=256, partial_rotary_factor=0.25, qk_layernorm=True),
    "persimmon": dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                      vocab_size=256, qk_layernorm=True, partial_rotary_factor=0.5),
    "helium": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                   intermediate_size=96, num_hidden_layers=2, vocab_size=256),
}


def e2e_sizes(scale: str, device_type: str) -> dict:
    if scale == "tiny":
        return E2E_TINY
    return E2E_REAL if device_type == "cuda" else E2E_SMALL


def make_config(family: str, sizes: dict, **overrides):
    from transformers import ArceeConfig, HeliumConfig, PersimmonConfig, StableLmConfig

    cls = {"arcee": ArceeConfig, "stablelm": StableLmConfig, "persimmon": PersimmonConfig,
           "helium": HeliumConfig}[family]
    kw = dict(sizes)
    kw.update(overrides)
    kw.setdefault("max_position_embeddings", 4096)
    config = cls(pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False, **kw)
    return config


def build_model(family: str, sizes: dict, device, dtype, seed: int = 0, **overrides):
    """A random-weight ``*ForCausalLM`` in eval mode (SDPA attention, eos disabled so generation runs
    the full number of tokens)."""
    from transformers import AutoModelForCausalLM

    config = make_config(family, sizes, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model = model.to(device).eval()
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.do_sample = False
    return model


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class E2EShape:
    batch: int
    prompt: int
    new_tokens: int

    @property
    def prefill_name(self) -> str:
        return f"B{self.batch}-P{self.prompt}"

    @property
    def decode_name(self) -> str:
        return f"B{self.batch}-P{self.prompt}-N{self.new_tokens}"


def e2e_shapes(scale: str, device_type: str) -> list[E2EShape]:
    if scale == "tiny":
        return [E2EShape(1, 8, 4)]
    if scale == "quick":
        return [E2EShape(1, 128, 16)]
    if device_type == "cuda":
        return [E2EShape(1, 512, 128), E2EShape(8, 512, 128)]
    return [E2EShape(1, 512, 64), E2EShape(8, 128, 32)]


def random_ids(batch: int, seq: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


__all__ = ["SCALES", "FAMILY_SHAPES", "KernelCase", "Bound", "kernel_cases", "AttentionCase", "attention_cases",
           "sdpa_eager_decode", "E2E_SMALL", "E2E_REAL", "E2E_TINY", "e2e_sizes", "build_model", "make_config",
           "E2EShape", "e2e_shapes", "random_ids", "num_params"]
