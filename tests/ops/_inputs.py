"""The op tests' one input builder: targets (backend x device), dtypes, layouts, family shapes, and the
inputs of every op.

* Targets: every backend of fastlm.ops on the device its kernels run on in this test mode (tests/_gpu.py):
  triton on CUDA tensors in the GPU test mode, else on CPU tensors under TRITON_INTERPRET=1; torch and cpp
  on CPU tensors. A backend that cannot run there is a skipped parameter whose reason is backend_status's.
  A backend without its own kernel for an op (the reference runs: tests/test_backends.py checks that) gets
  no parameters for that op. The interpreter runs every Triton program in Python (~10-40 ms each), and on
  CUDA each new specialisation is a JIT compile, so for Triton a grid keeps only the combinations its test
  selects (``triton=``): each feature at least once, the same set in both test modes.
* Layouts (:func:`layout`): contiguous, row-strided (rows of a wider buffer, at an offset), sliced (every
  other leading row), leading dims that do not collapse into one row stride, a non-contiguous last dim,
  expanded (a zero stride: elements overlap) and overlapping rows (a row stride below the row width).
* Shapes: each family's attention and MLP shapes from its real checkpoint config (head_dim, query heads
  per KV head, rotary fraction, layout, norms, hidden size), with fewer heads; odd sizes (head_dim 80 / 40 /
  136, 7 and 33 tokens, hidden 3000, tails of every block size) and zero sizes; quant_linear's weight
  formats (int8 / int4, per channel and in groups, partial packing blocks) on odd N and K.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pytest
import torch

from _api import BACKENDS, CHECKPOINTS, backend_status, dequantize_weight, impl, quantize_weight
from _gpu import DEVICE

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
             torch.int32: "int32", torch.int64: "int64"}


# ------------------------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    """One backend on one device type."""
    backend: str
    device: str

    @property
    def interpreted(self) -> bool:
        """The Triton interpreter (Triton kernels on CPU tensors): every program runs in Python."""
        return self.backend == "triton" and self.device == "cpu"

    def __str__(self) -> str:
        return self.backend if self.device == default_device(self.backend) else f"{self.backend}-{self.device}"


def default_device(backend: str) -> str:
    """Where ``backend``'s kernels run in this test mode (tests/_gpu.py)."""
    return DEVICE if backend == "triton" else "cpu"


def _target_params(op: str | None, device: str | None, kernels: bool, backends) -> list:
    params = []
    for backend in BACKENDS:
        if kernels and backend == "torch" or backends is not None and backend not in backends:
            continue
        target = Target(backend, device or default_device(backend))
        ok, why = backend_status(backend, target.device)
        if not ok:
            reason = f"backend {backend} unavailable for {target.device} tensors: {why}"
            params.append((target, [pytest.mark.skip(reason=reason)]))
            continue
        if op is not None and backend != "torch" and impl(op, backend, target.device) is impl(op, "torch",
                                                                                              target.device):
            continue  # no kernel of its own for op: the reference runs (tests/test_backends.py)
        params.append((target, []))
    return params


def targets(op: str | None = None, *, device: str | None = None, kernels: bool = False, backends=None) -> list:
    """pytest params of the targets: every backend (``kernels``: the kernel backends only; ``backends``: those
    named), on ``device`` or each backend's default device; with ``op``, only the backends with a kernel of
    their own for it."""
    return [pytest.param(t, marks=m, id=str(t)) for t, m in _target_params(op, device, kernels, backends)]


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return DTYPE_IDS[value]
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(getattr(value, "name", value))


def grid(op: str | None, *axes, where=None, triton=None, reference=None, device: str | None = None,
         kernels: bool = False, backends=None) -> list:
    """pytest params (target, *combination) over the targets (as :func:`targets` selects them) and the
    combinations of ``axes`` that ``where(*combination)`` keeps (None: all). For Triton only those
    ``triton(*combination)`` keeps too; for the torch backend, the reference itself (what a grid checks
    there is the dispatch, shapes and layouts, not accuracy), those ``reference(*combination)`` keeps."""
    params = []
    for target, marks in _target_params(op, device, kernels, backends):
        for combo in itertools.product(*axes):
            if where is not None and not where(*combo):
                continue
            if target.backend == "triton" and triton is not None and not triton(*combo):
                continue
            if target.backend == "torch" and reference is not None and not reference(*combo):
                continue
            params.append(pytest.param(target, *combo, marks=marks, id="-".join(map(_id, (target,) + combo))))
    return params


# -------------------------------------------------------------------------------------- values, layouts

def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0, shift=0.0) -> torch.Tensor:
    """Seeded normal values (drawn on the CPU, the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype=dtype, device=device)


LAYOUTS = ("contiguous", "row_strided", "sliced", "strided_rows", "leading_transposed", "last_dim_strided",
           "expanded", "overlapping_rows")


def layout(t: torch.Tensor, name: str, pad: int = 5, offset: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): ``t``'s values in the layout ``name``, and the storage the view lies in.

    Every layout holds ``t``'s values except ``expanded`` (``t[:1]``'s, repeated along dim 0) and
    ``overlapping_rows`` (rows that share their ends): take a reference's inputs from the view itself.
    """
    shape = tuple(t.shape)
    if name == "contiguous" or t.dim() == 0:
        return t, t
    if name == "row_strided":  # rows of a wider buffer, starting at an offset
        buf = torch.zeros(shape[:-1] + (shape[-1] + pad,), dtype=t.dtype, device=t.device)
        view = buf[..., offset: offset + shape[-1]]
        view.copy_(t)
        return view, buf
    if name == "sliced":  # every other entry of the first dim (a doubled leading stride)
        buf = torch.zeros((2 * shape[0],) + shape[1:], dtype=t.dtype, device=t.device)
        view = buf[1::2]
        view.copy_(t)
        return view, buf
    if name == "strided_rows":  # every other row of a wider buffer, at an offset: both strides
        buf = torch.zeros((2 * shape[0],) + shape[1:-1] + (shape[-1] + pad,), dtype=t.dtype, device=t.device)
        view = buf[1::2, ..., offset: offset + shape[-1]]
        view.copy_(t)
        return view, buf
    if name == "leading_transposed":  # leading dims that do not collapse into one row stride
        if t.dim() < 3:
            raise ValueError(f"leading_transposed needs 3 dims or more, got {shape}")
        buf = t.transpose(0, 1).contiguous()
        return buf.transpose(0, 1), buf
    if name == "last_dim_strided":  # the last dim not contiguous: no row view of the memory exists
        if t.dim() < 2:
            raise ValueError(f"last_dim_strided needs 2 dims or more, got {shape}")
        buf = t.transpose(-1, -2).contiguous()
        return buf.transpose(-1, -2), buf
    if name == "expanded":  # dim 0 with a zero stride: its elements alias
        buf = t[:1].clone()
        return buf.expand(shape), buf
    if name == "overlapping_rows":  # 2-d: each row's second half is the next row's first half
        rows, n = t.reshape(-1, shape[-1]).shape
        step = max(1, n // 2)
        buf = t.reshape(-1)[: (rows - 1) * step + n].clone() if rows else t.reshape(-1).clone()
        return buf.as_strided((rows, n), (step, 1)), buf
    raise ValueError(f"unknown layout {name!r}")


def rows_for_streaming(n: int, bytes_per_element: int) -> tuple[int, int]:
    """Rows of width n whose outputs reach the C++ kernels' kStreamOutBytes (16 MiB, csrc/cpu/vec_util.h),
    and a slice length whose outputs stay far below it."""
    return -(-(16 << 20) // (n * bytes_per_element)) + 5, 97


def perturbed(module, scale=0.3):
    """``module`` with seeded noise added to its parameters (HF initialises norms to ones / zeros)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def same_layout_clone(t):
    """A copy of ``t`` with the same sizes, strides and storage offset (overlap included)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return t
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage().clone(), t.storage_offset(), t.size(), t.stride())


# ------------------------------------------------------------------------------------- family shapes

@dataclass(frozen=True)
class Family:
    """A family's layer shapes from its real checkpoint config (tests/ops/_api.py: CHECKPOINTS) and the
    options its adapter sets (fastlm/families): what fastlm.patch runs for it."""
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    norm: str                 # "rms" or "layer"
    eps: float
    activation: str           # "swiglu" or "relu2"
    rms_weight_in_fp32: bool = False
    interleaved: bool = False
    qkv_head_major: bool = False  # Persimmon's fused [H, 3, D] qkv layout
    qk_norm: str | None = None


def _family(name: str, **options) -> Family:
    c = CHECKPOINTS[name][1]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    rotary = int(head_dim * c.get("partial_rotary_factor", 1.0))
    return Family(name, c["hidden_size"], c["intermediate_size"], heads, c.get("num_key_value_heads", heads),
                  head_dim, rotary - rotary % 2, "rms" if "rms_norm_eps" in c else "layer",
                  c.get("rms_norm_eps", c.get("layer_norm_eps")), "relu2" if c["hidden_act"] == "relu2" else "swiglu",
                  **options)


FAMILIES = {
    "arcee": _family("arcee"),  # ArceeRMSNorm: weight * normed.to(dtype)
    "stablelm": _family("stablelm"),
    "persimmon": _family("persimmon", qkv_head_major=True, qk_norm="shared_bias"),  # qk_layernorm: nn.LayerNorm(D)
    "helium": _family("helium", rms_weight_in_fp32=True, interleaved=True),  # HeliumRMSNorm, GPT-J rotary
}


# ------------------------------------------------------------------------------------------ the norms

@dataclass(frozen=True)
class NormCase:
    name: str
    shape: tuple


def norm_cases(kind: str) -> tuple:
    """add + norm inputs: the hidden sizes of the families with this norm ("rms" or "layer"), and odd ones."""
    hidden = sorted({f.hidden for f in FAMILIES.values() if f.norm == kind})
    return tuple(NormCase(f"hidden_{n}", (1, 7, n)) for n in hidden) + (
        NormCase("decode_3000", (1, 1, 3000)),  # one token, hidden 3000 (not a multiple of any block)
        NormCase("prefill_3000", (3, 7, 3000)),
        NormCase("prefill_2560", (3, 7, 2560)),
        NormCase("2d_3000", (3, 3000)),
        NormCase("rows66_80", (2, 33, 80)),      # many short rows: width 80
        NormCase("rows6_64", (2, 3, 64)),
        NormCase("wide_1000", (1, 1000)),
        NormCase("no_rows", (2, 0, 80)),         # zero rows
    )


def norm_inputs(shape, dtype, device, *, residual=True, bias=False, weight_dtype=None, seed=0, shift=0.0):
    """(x, residual or None, weight, bias or None) for add + norm over the last dim; ``shift`` offsets x's
    mean (the centred variance and its merges are then exercised)."""
    n = shape[-1]
    x = randn(*shape, dtype=dtype, device=device, seed=seed, scale=2.0 if shift else 1.0, shift=shift)
    r = randn(*shape, dtype=dtype, device=device, seed=seed + 1, scale=3.0) if residual else None
    w = randn(n, dtype=weight_dtype or dtype, device=device, seed=seed + 2, scale=0.5, shift=1.0)
    b = randn(n, dtype=weight_dtype or dtype, device=device, seed=seed + 3) if bias else None
    return x, r, w, b


# (x's layout, residual's layout): each a view into a wider or reordered buffer, read in place
NORM_LAYOUT_PAIRS = (("row_strided", "row_strided"), ("sliced", "row_strided"),
                     ("leading_transposed", "leading_transposed"), ("expanded", "contiguous"), ("contiguous", "sliced"))


def norm_layout_triton(dtype, layouts) -> bool:
    """What Triton runs of the layout grid: sliced x and strided residual rows in fp32 and bf16."""
    return dtype != torch.float16 and layouts == NORM_LAYOUT_PAIRS[1]


def strided_norm_inputs(target, dtype, layouts, *, bias=False, shift=0.0):
    """norm_inputs (3 sequences of 7 tokens, hidden 3000; 2 of 3 on the interpreter) with x and residual in
    ``layouts``."""
    shape = (2, 3, 3000) if target.interpreted else (3, 7, 3000)
    x, r, w, b = norm_inputs(shape, dtype, target.device, bias=bias, seed=8, shift=shift)
    x, r = layout(x, layouts[0])[0], layout(r, layouts[1])[0]
    assert not (x.is_contiguous() and r.is_contiguous())
    return x, r, w, b


# ----------------------------------------------------------------------------------------- qkv + rope

@dataclass(frozen=True)
class QkvConfig:
    """The static arguments of qkv_rope. ``qk_norm``: None, "shared" (weight [D]), "shared_bias",
    "per_head" ([heads, D]) or "per_head_bias"."""
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    interleaved: bool = False
    qkv_head_major: bool = False
    qk_norm: str | None = None

    def dims(self) -> dict:
        return dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                    rotary_dim=self.rotary_dim, interleaved=self.interleaved,
                    qkv_head_major=self.qkv_head_major)

    @property
    def width(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


def family_qkv(f: Family, kv_heads: int | None = None, qk_norm: str | None = "family") -> QkvConfig:
    """The family's attention with fewer heads: its head_dim, query heads per KV head, rotary_dim, layout."""
    group = f.heads // f.kv_heads
    kv = kv_heads or (1 if group > 1 else 2)
    norm = f.qk_norm if qk_norm == "family" else qk_norm
    name = f.name if qk_norm == "family" else f"{f.name}_qk_{norm}"
    return QkvConfig(name, group * kv, kv, f.head_dim, f.rotary_dim, f.interleaved, f.qkv_head_major, norm)


QKV_FAMILY_CONFIGS = {c.name: c for c in (
    *(family_qkv(f) for f in FAMILIES.values()),
    family_qkv(FAMILIES["stablelm"], qk_norm="per_head"),  # the adapters' qk-norm option (StableLM-2-12B)
)}
QKV_CONFIGS = {**QKV_FAMILY_CONFIGS, **{c.name: c for c in (
    QkvConfig("d80_gqa2", 4, 2, 80, 80),
    QkvConfig("d80_partial_per_head", 4, 4, 80, 20, qk_norm="per_head"),
    QkvConfig("d80_gqa2_partial_per_head", 4, 2, 80, 20, qk_norm="per_head"),
    QkvConfig("d64_head_major_3heads", 3, 3, 64, 32, qkv_head_major=True, qk_norm="shared_bias"),
    QkvConfig("d128_interleaved_gqa4", 4, 1, 128, 128, interleaved=True),
    QkvConfig("d128_interleaved_gqa2", 2, 1, 128, 128, interleaved=True),
    QkvConfig("d40_interleaved_per_head_bias", 4, 2, 40, 20, interleaved=True, qk_norm="per_head_bias"),
    QkvConfig("d40_full_rotary", 3, 3, 40, 40),
    QkvConfig("d64_rot32_interleaved_head_major_shared", 2, 2, 64, 32, interleaved=True, qkv_head_major=True,
              qk_norm="shared"),
    QkvConfig("no_rope", 2, 1, 64, 0, qk_norm="shared_bias"),
    # head_dim over the register-resident qk-norm's limit (8 registers): the buffer-sweeping path
    QkvConfig("wide_d136", 2, 1, 136, 68, qk_norm="per_head_bias"),
)}}


def rope_tables(positions: torch.Tensor, rotary_dim: int, dtype, theta: float = 10000.0):
    """HF's cos / sin tables [*positions.shape, rotary_dim]: each frequency twice, cat(freqs, freqs)."""
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=positions.device).float() / max(rotary_dim, 1))
    freqs = positions[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class QkvInputs:
    qkv: torch.Tensor        # [B, S, W]
    cos: torch.Tensor        # [B or 1, S, R]
    sin: torch.Tensor
    norms: dict              # q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias (tensors or None)
    positions: torch.Tensor  # [B, S]: the tokens' positions (the tables' rows)
    config: QkvConfig
    kwargs: dict = field(init=False)

    def __post_init__(self):
        self.kwargs = dict(self.config.dims(), **self.norms)


def qkv_inputs(cfg: QkvConfig, B: int, S: int, dtype, device, *, seed=0, cos_batch: bool = True,
               scale=2.0) -> QkvInputs:
    """Random qkv [B, S, W] and norm parameters, HF's tables for positions s + 3 b (per sequence, or [1, S, R]
    broadcast over the batch when not ``cos_batch``)."""
    qkv = randn(B, S, cfg.width, dtype=dtype, device=device, seed=seed, scale=scale)
    pos = torch.arange(S, device=device)[None].expand(B, S) + 3 * torch.arange(B, device=device)[:, None]
    cos, sin = rope_tables(pos if cos_batch else pos[:1], cfg.rotary_dim, dtype)
    norms = dict(q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None)
    if cfg.qk_norm is not None:
        for i, (p, heads) in enumerate((("q", cfg.num_heads), ("k", cfg.num_kv_heads))):
            shape = (cfg.head_dim,) if cfg.qk_norm.startswith("shared") else (heads, cfg.head_dim)
            norms[f"{p}_norm_weight"] = randn(*shape, dtype=dtype, device=device, seed=seed + 10 + i, scale=0.3,
                                              shift=1.0)
            if cfg.qk_norm.endswith("bias"):
                norms[f"{p}_norm_bias"] = randn(*shape, dtype=dtype, device=device, seed=seed + 20 + i, scale=0.2)
    return QkvInputs(qkv, cos, sin, norms, pos, cfg)


def kv_caches(B, Hkv, t_max, D, dtype, device, seed=30):
    return (randn(B, Hkv, t_max, D, dtype=dtype, device=device, seed=seed),
            randn(B, Hkv, t_max, D, dtype=dtype, device=device, seed=seed + 1))


# a small GQA config for argument and contract tests: B = 2, S = 3, Tmax = 6
QKV_SMALL = QkvConfig("small", 4, 2, 16, 16)


def small_qkv(t_max: int = 6, device="cpu"):
    """(QkvInputs, (k_cache, v_cache)) of QKV_SMALL in fp32: B = 2, S = 3, tables [1, S, 16]."""
    inp = qkv_inputs(QKV_SMALL, 2, 3, torch.float32, device, cos_batch=False, scale=1.0)
    return inp, kv_caches(2, QKV_SMALL.num_kv_heads, t_max, QKV_SMALL.head_dim, torch.float32, device)


def distinct_positions(B, S, t_max, dtype=torch.int64, device="cpu", seed=5) -> torch.Tensor:
    """[B, S] cache positions, distinct within each sequence, in [0, Tmax)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(t_max, generator=g)[:S] for _ in range(B)]).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------- decode attention

@dataclass(frozen=True)
class DecodeCase:
    """q [B, H, D] over caches [B, Hkv, Tmax, D] with per-sequence ``lengths``; past each length K holds
    ``k_poison`` and V NaN (a reused cache: never part of the answer)."""
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    t_max: int
    lengths: tuple
    k_poison: float = float("nan")
    lengths_dtype: torch.dtype = torch.int32


def _decode_cases() -> tuple:
    cases = [  # the Triton kernel's boundaries: split-K chunks of 256 slots, BLOCK_D / BLOCK_T, padded groups
        DecodeCase("gqa2_ragged_chunks", 4, 2, 64, 600, (1, 300, 600), 1e4),  # 1 slot, across a chunk, Tmax
        DecodeCase("gqa5_d80_one_chunk", 5, 1, 80, 40, (33, 7), 1e4),  # G=5 (padded rows), masked columns
        DecodeCase("d160_second_chunk", 2, 2, 160, 300, (257,), 1e4),  # BLOCK_D 256, one slot into chunk 2
        DecodeCase("context_1", 2, 1, 16, 1, (1,), 1e4),
        DecodeCase("context_4k", 2, 1, 16, 4096, (4096, 2500), 1e4),  # 16 chunks, 10 empty for the second row
    ]
    for (h, hkv, d), ctx, b in itertools.product(((4, 4, 64), (8, 2, 80), (6, 3, 40)), (1, 17, 300), (1, 3)):
        lengths = (ctx, max(1, ctx // 2), 1)[:b]
        cases.append(DecodeCase(f"H{h}_Hkv{hkv}_D{d}_ctx{ctx}_B{b}", h, hkv, d, ctx + 5, lengths,
                                lengths_dtype=torch.int32 if b == 1 else torch.int64))
    # the C++ kernel's register-tiled blocks (csrc/cpu/attention.cpp): an odd number of SIMD registers a
    # row read in place (MHA, head_dim 80: 5 on AVX-512, 10 on AVX2) and a 16-bit cache widened per block
    # for several heads (head_dim 96), key counts off the 16-key tiles and the 128-key blocks
    cases.append(DecodeCase("mha_d80_tiled", 3, 3, 80, 305, (300, 131)))
    cases.append(DecodeCase("gqa3_d96_tiled", 6, 2, 96, 260, (257, 16)))
    fam = FAMILIES["arcee"]  # the real group size and head_dim (one KV head)
    cases.append(DecodeCase("arcee", fam.heads // fam.kv_heads, 1, fam.head_dim, 70, (64, 9)))
    cases.append(DecodeCase("no_sequences", 4, 2, 16, 8, ()))  # B = 0
    return tuple(cases)


DECODE_CASES = _decode_cases()


def decode_inputs(case: DecodeCase, dtype, device, seed=40):
    """(q, k_cache, v_cache, lengths, clean k_cache, clean v_cache): the clean caches hold zeros past each
    length (what an SDPA reference may read)."""
    B = len(case.lengths)
    q = randn(B, case.heads, case.head_dim, dtype=dtype, device=device, seed=seed)
    kc = randn(B, case.kv_heads, case.t_max, case.head_dim, dtype=dtype, device=device, seed=seed + 1, scale=2.0)
    vc = randn(B, case.kv_heads, case.t_max, case.head_dim, dtype=dtype, device=device, seed=seed + 2)
    lengths = torch.tensor(case.lengths, dtype=case.lengths_dtype, device=device)
    valid = torch.arange(case.t_max, device=device)[None, None, :, None] < lengths.view(B, 1, 1, 1)
    clean_k, clean_v = torch.where(valid, kc, 0), torch.where(valid, vc, 0)
    kc = torch.where(valid, kc, torch.full_like(kc, case.k_poison))
    vc = torch.where(valid, vc, torch.full_like(vc, float("nan")))
    return q, kc, vc, lengths, clean_k, clean_v


def strided_lengths(lengths: torch.Tensor, stride: int, fill: int) -> torch.Tensor:
    """``lengths`` as a view with ``stride`` whose neighbours hold ``fill`` (out of range)."""
    wide = torch.full((lengths.shape[0], stride), fill, dtype=lengths.dtype, device=lengths.device)
    wide[:, 0] = lengths
    view = wide[:, 0]
    assert view.stride(0) == stride
    return view


def sdpa_decode(q, k_cache, v_cache, lengths, scale):
    """Independent reference: SDPA (GQA through enable_gqa) with a length mask, in q's dtype math."""
    B, H, _ = q.shape
    T = k_cache.shape[2]
    mask = (torch.arange(T, device=q.device)[None, :] < lengths.view(B, 1))[:, None, None, :]  # [B, 1, 1, T]
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, attn_mask=mask,
                                                           scale=scale, enable_gqa=k_cache.shape[1] != H)
    return out.squeeze(2)


# ---------------------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class ActivationCase:
    """An MLP epilogue input [..., width]: swiglu reads [gate | up] (width 2I)."""
    name: str
    shape: tuple


def _activation_cases() -> tuple:
    """Each family's MLP width (swiglu: [gate | up], 2I) at one token, and odd ones."""
    widths = {f"{f.name}_{f.activation}": (2 if f.activation == "swiglu" else 1) * f.intermediate
              for f in FAMILIES.values()}
    return tuple(ActivationCase(name, (1, 1, n)) for name, n in widths.items()) + (
        ActivationCase("decode_6000", (1, 1, 2 * 3000)),
        ActivationCase("prefill_2000", (3, 7, 2 * 1000)),
        ActivationCase("prefill_1500", (3, 7, 1500)),
        ActivationCase("rows33_80", (33, 2 * 40)),
        ActivationCase("two_blocks_swiglu", (3, 7, 2 * 1100)),  # I = 1100: two column blocks, a masked tail
        ActivationCase("rows10_relu2", (2, 5, 1500)),
        ActivationCase("rows5_80", (5, 2 * 40)),
        ActivationCase("one_row_6000", (2, 1, 2 * 3000)),
        ActivationCase("one_row_3000", (2, 1, 3000)),
        ActivationCase("1d_4", (4,)),
        ActivationCase("1d_37", (37,)),
        ActivationCase("no_rows", (0, 8)),
    )


ACTIVATION_CASES = _activation_cases()


def activation_input(shape, dtype, device, seed=2, scale=3.0):
    return randn(*shape, dtype=dtype, device=device, seed=seed, scale=scale)


# --------------------------------------------------------------------------------------------- linear

LINEAR_ROWS = ((1, 1), (1, 3), (2, 2), (7,), (1, 16), (17,))  # the C++ kernel up to 16 rows, ATen beyond
LINEAR_NK = ((3000, 80), (5, 3000), (37, 129))  # odd N (tail rows), odd K (tail chunks)


def linear_inputs(rows, N, K, dtype, device, *, bias, residual, seed=None):
    seed = N + K + len(rows) if seed is None else seed
    x = randn(*rows, K, dtype=dtype, device=device, seed=seed)
    w = randn(N, K, dtype=dtype, device=device, seed=seed + 1, scale=1 / math.sqrt(K))
    b = randn(N, dtype=dtype, device=device, seed=seed + 2) if bias else None
    r = randn(*rows, N, dtype=dtype, device=device, seed=seed + 3) if residual else None
    return x, w, b, r


# --------------------------------------------------------------------------------------- quant_linear

# (bits, group_size): None is one group per output channel (G = K); groups of 40 end in a partial block of
# the int4 packing (fastlm/ops/quantized.py); K not a multiple of 32 leaves per-channel rows a tail
QUANT_FORMATS = ((8, None), (8, 32), (8, 40), (4, 32), (4, 64), (4, None), (4, 40))
# (N, K): odd N (tail rows of a block); the first three for the C++ kernel (K = 224: 7 groups of 32, an odd
# count, which the bf16 int4 kernel takes two at a time), the last two small enough for the interpreter (it
# runs one program at a time)
QUANT_SHAPES = ((1003, 80), (37, 960), (37, 224), (37, 80), (21, 960))
# rows of x per call and whether it has (bias, residual): M = 16 is the C++ decode kernel's last row count,
# 17 and 64 its prefill path
QUANT_CALLS = ((0, False, False), (1, True, True), (2, False, True), (7, False, False), (16, True, False),
               (17, False, True), (64, True, True))
QUANT_ZERO_SIZES = ((0, 8, 64), (3, 0, 64), (3, 8, 0), (20, 8, 0), (0, 0, 0))  # (M, N, K)


def quant_weight(N: int, K: int, bits: int, group_size: int, device="cpu", seed=0):
    """(qweight, scales) of a seeded [N, K] weight of scale 1 / sqrt(K), quantized on the CPU."""
    w = randn(N, K, seed=seed, scale=1 / math.sqrt(max(K, 1)))
    return tuple(t.to(device) for t in quantize_weight(w, bits, group_size))


def quant_inputs(M, N, K, bits, group_size, dtype, device, *, bias, residual, seed=0):
    """quant_linear's positional arguments: x [M, K], qweight and scales of [N, K], bias [N], residual [M, N]."""
    qweight, scales = quant_weight(N, K, bits, group_size, device, seed=N + K + bits)
    x = randn(M, K, dtype=dtype, device=device, seed=seed + M)
    b = randn(N, dtype=dtype, device=device, seed=seed + M + 1) if bias else None
    r = randn(M, N, dtype=dtype, device=device, seed=seed + M + 2) if residual else None
    return x, qweight, scales, b, r, bits, group_size


def quant_linear_fp64(x, qweight, scales, bias, residual, bits, group_size):
    """Independent reference: the dequantized weight (exact in fp64: q * scale) and fp64 products."""
    out = x.double() @ dequantize_weight(qweight, scales, bits, group_size, torch.float64).t()
    for extra in (bias, residual):
        if extra is not None:
            out = out + extra.double()
    return out


# -------------------------------------------------------------------------------------------- opcheck

def run_opcheck(op: str, target: Target) -> None:
    """torch.library.opcheck of the op ``target.backend`` registers for ``op`` (a kernel of its own, not the
    reference), on each of :func:`opcheck_args`."""
    from _api import registered_op

    assert impl(op, target.backend, target.device) is not impl(op, "torch", target.device)
    for args in opcheck_args(op, target.device):
        torch.library.opcheck(registered_op(target.backend, op), args)


def opcheck_args(op: str, device) -> list[tuple]:
    """Arguments for torch.library.opcheck of each backend's registered ``op`` (fp32 and bf16, with and
    without the optional tensors)."""
    f32, bf = torch.float32, torch.bfloat16
    x, r = randn(1, 3, 64, device=device, seed=1), randn(1, 3, 64, device=device, seed=2)  # 3 rows: the interpreter
    w, b = randn(64, device=device, seed=3), randn(64, device=device, seed=4)
    if op == "add_rms_norm":
        return [(x, r, w, 1e-5, False), (x.to(bf), None, w.to(bf), 1e-5, True)]
    if op == "add_layer_norm":
        return [(x, r, w, b, 1e-5), (x, None, w, None, 1e-5)]
    if op in ("qkv_rope", "qkv_rope_cache"):
        out = []
        per_head = QkvConfig("d40_gqa2_partial_per_head", 2, 1, 40, 20, qk_norm="per_head")
        second = (QKV_CONFIGS["d64_head_major_3heads"], f32) if op == "qkv_rope" else \
            (QKV_CONFIGS["d40_interleaved_per_head_bias"], bf)
        for cfg, dtype in ((per_head, f32), second):
            inp = qkv_inputs(cfg, 2, 2, dtype, device, cos_batch=False)  # 4 tokens: the interpreter
            n = inp.norms
            static = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim, cfg.interleaved,
                      cfg.qkv_head_major, 1e-5)
            norms = (n["q_norm_weight"], n["q_norm_bias"], n["k_norm_weight"], n["k_norm_bias"])
            if op == "qkv_rope":
                out.append((inp.qkv, inp.cos, inp.sin, *norms, *static))
            else:  # int64 and int32 positions
                kc, vc = (torch.zeros(2, cfg.num_kv_heads, 8, cfg.head_dim, dtype=dtype, device=device) for _ in "kv")
                pos = torch.tensor([[0, 1], [3, 7]], dtype=torch.int64 if cfg is per_head else torch.int32,
                                   device=device)
                out.append((inp.qkv, inp.cos, inp.sin, *norms, kc, vc, pos, *static))
        return out
    if op in ("swiglu", "swiglu_"):
        return [(x,)]
    if op == "relu2":
        return [(x.to(bf),), (randn(1, 3, 33, device=device, seed=6),)]
    if op == "relu2_":
        return [(x.to(bf),), (x[:, :, :40],)]
    if op == "linear":
        return [(x, randn(24, 64, device=device, seed=7), None, None),
                (x[:1, :1].to(bf), randn(24, 64, dtype=bf, device=device, seed=8),
                 randn(24, dtype=bf, device=device, seed=9), randn(1, 1, 24, dtype=bf, device=device, seed=10))]
    if op == "quant_linear":  # int4 in groups (16-bit x, no bias), int8 per channel (17 rows, bias, residual)
        return [(x[0].to(bf), *quant_weight(24, 64, 4, 32, device), None, None, 4, 32),
                (randn(17, 64, device=device, seed=11), *quant_weight(24, 64, 8, 64, device),
                 randn(24, device=device, seed=12), randn(17, 24, device=device, seed=13), 8, 64)]
    if op == "decode_attention":
        return [(randn(2, 4, 32, device=device), randn(2, 2, 9, 32, device=device, seed=1),
                 randn(2, 2, 9, 32, device=device, seed=2), torch.tensor([9, 4], device=device), 0.2),
                (randn(2, 2, 40, device=device, seed=3), randn(2, 1, 8, 40, device=device, seed=4),
                 randn(2, 1, 8, 40, device=device, seed=5), torch.tensor([3, 8], device=device), 40 ** -0.5)]
    if op == "prefill_attention":  # GQA causal in the engine's [B, S, H, D] layout; MHA not causal, D != Dv
        q, k, v = (randn(1, 5, h, 32, device=device, seed=s).transpose(1, 2) for s, h in ((6, 4), (7, 2), (8, 2)))
        return [(q, k, v, True, 0.2),
                (randn(2, 2, 3, 16, device=device, seed=9).to(bf), randn(2, 2, 6, 16, device=device, seed=10).to(bf),
                 randn(2, 2, 6, 24, device=device, seed=11).to(bf), False, 0.25)]
    if op == "counter_uniform":
        key = (torch.tensor([5], device=device), torch.tensor([2], device=device))
        return [(*key, 2, 33), (*key, 0, 4)]
    raise ValueError(f"no opcheck arguments for {op!r}")


# ---------------------------------------------------------------------- random specs (property test)

SPECIALS = (float("nan"), float("inf"), -float("inf"))


@dataclass
class Spec:
    """How to build one tensor argument (tests/ops/test_property.py draws these)."""
    shape: tuple
    dtype: torch.dtype
    layout: str = "contiguous"
    device: str = "cpu"
    specials: int = 0  # NaN / inf entries to inject
    scale: float = 1.0
    seed: int = 0


def build(spec: Spec) -> torch.Tensor:
    shape, dtype = tuple(spec.shape), spec.dtype
    if spec.device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    g = torch.Generator().manual_seed(spec.seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g) * spec.scale
        if spec.specials and t.numel():
            flat = t.view(-1)
            for i in range(spec.specials):
                flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = SPECIALS[i % len(SPECIALS)]
        t = t.to(dtype)
    else:
        t = torch.randint(-3, 4, shape, generator=g).to(dtype)
    name = spec.layout
    if name == "leading_transposed" and t.dim() < 3 or name == "last_dim_strided" and t.dim() < 2:
        name = "contiguous"
    return layout(t, name)[0]
