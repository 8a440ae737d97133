"""qkv_rope and qkv_rope_cache on every backend against their references (tests/_tolerance.py), the
references against the HF attention code they replace (exact), and the KV-cache write's contract
(positions outside the cache, strided positions, the kernels' own guard). Inputs: tests/ops/_inputs.py."""
import pytest
import torch

from _api import impl, qkv_rope, qkv_rope_cache, qkv_rope_cache_reference, qkv_rope_reference
from _inputs import (DTYPES, QKV_CONFIGS, QKV_FAMILY_CONFIGS, QKV_SMALL, QkvConfig, distinct_positions, grid,
                     kv_caches, layout, perturbed, qkv_inputs, randn, rope_tables, run_opcheck, small_qkv, targets)
from _tolerance import assert_gradients_match, assert_op_matches, reference_pair, upcast

CONFIGS = tuple(QKV_CONFIGS.values())
# (B, S, cos/sin tables per sequence "B" or broadcast over the batch "1")
TOKENS = ((1, 1, "1"), (1, 7, "1"), (3, 7, "B"), (3, 7, "1"), (1, 33, "1"))
# Odd configs run at one token, 7 tokens in 3 sequences and 33 tokens; the others at 7 tokens, in one
# sequence and in three sharing one table
ODD_CONFIGS = ("d80_gqa2", "d80_partial_per_head", "d64_head_major_3heads", "d128_interleaved_gqa4",
               "d40_interleaved_per_head_bias", "d64_rot32_interleaved_head_major_shared", "no_rope", "wide_d136")


def _tokens_for(dtype, cfg, tokens):
    if cfg.name in ODD_CONFIGS:
        return tokens in ((1, 1, "1"), (3, 7, "B"), (1, 33, "1"))
    if cfg.name in _TRITON:  # (and 33 tokens of one of them)
        long = cfg.name == "d80_gqa2_partial_per_head" and tokens == (1, 33, "1")
        return tokens == (_TRITON[cfg.name] if dtype == torch.float32 else (1, 7, "1")) or long and (
            dtype == torch.float32)
    return tokens == ((3, 7, "1") if dtype == torch.float32 else (1, 7, "1")) and dtype != torch.float16

# What Triton runs of each grid: a few configs in every dtype (3 sequences in fp32, with one
# table or one per sequence, and one of 7 tokens in the others), 33 tokens once, one token of each odd config
_TRITON = {"d80_gqa2_partial_per_head": (3, 7, "1"), "persimmon": (3, 7, "B"),
                "d128_interleaved_gqa2": (3, 7, "1"), "d40_full_rotary": (3, 7, "B")}


def _triton_subset(dtype, cfg, tokens):
    if cfg.name in _TRITON:
        return True
    return dtype == torch.bfloat16 and tokens == (1, 1, "1")


@pytest.mark.parametrize("target,dtype,cfg,tokens", grid(
    "qkv_rope", DTYPES, CONFIGS, TOKENS, where=_tokens_for, triton=_triton_subset,
    reference=lambda dtype, cfg, tokens: dtype == torch.bfloat16 and cfg.name in QKV_FAMILY_CONFIGS))
def test_qkv_rope_matches_reference(target, dtype, cfg, tokens):
    B, S, tables = tokens
    inp = qkv_inputs(cfg, B, S, dtype, target.device, cos_batch=tables == "B")
    out = qkv_rope(inp.qkv, inp.cos, inp.sin, **inp.kwargs, backend=target.backend)
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert [tuple(o.shape) for o in out] == [(B, H, S, D), (B, Hkv, S, D), (B, Hkv, S, D)]
    if target.backend != "torch":  # the reference returns views of qkv
        assert all(o.is_contiguous() for o in out)
    hi, lo = reference_pair(qkv_rope_reference, inp.qkv, inp.cos, inp.sin, **inp.kwargs)
    assert_op_matches("qkv_rope", target.backend, out, hi, lo, name=cfg.name)


@pytest.mark.parametrize("target", targets("qkv_rope"))
def test_no_rotary_passes_values_through(target):
    """rotary_dim 0 with empty tables and no qk-norm: q, k, v are qkv's heads, bit for bit."""
    cfg = QkvConfig("no_rope_no_norm", 2, 1, 64, 0)
    inp = qkv_inputs(cfg, 2, 3, torch.float32, target.device, cos_batch=False)
    assert inp.cos.shape == (1, 3, 0)
    q, k, v = qkv_rope(inp.qkv, inp.cos, inp.sin, **inp.kwargs, backend=target.backend)
    heads = inp.qkv.view(2, 3, 4, 64).transpose(1, 2)  # [B, H + 2 Hkv, S, D]
    assert torch.equal(q, heads[:, :2]) and torch.equal(k, heads[:, 2:3]) and torch.equal(v, heads[:, 3:])


LAYOUT_CONFIGS = ("d80_partial_per_head", "d64_head_major_3heads", "d128_interleaved_gqa4", "d40_full_rotary",
                  "persimmon")


@pytest.mark.parametrize("target,dtype,name", grid(
    "qkv_rope", DTYPES, LAYOUT_CONFIGS,
    triton=lambda dtype, name: name == "d40_full_rotary",
    reference=lambda dtype, name: dtype == torch.bfloat16))
def test_qkv_rope_non_contiguous_inputs(target, dtype, name):
    """qkv as rows of a wider buffer, cos / sin expanded over the batch (a zero stride): bit for bit the
    result of contiguous inputs. Tables broadcast over the batch ([1, S, R]): the reference's answer. (Tables
    wider than rotary_dim: tests/ops/test_property.py draws them.)"""
    cfg = QKV_CONFIGS[name]
    B, S = (2, 3) if target.interpreted else (3, 7)
    inp = qkv_inputs(cfg, B, S, dtype, target.device, cos_batch=False)
    qkv_strided = layout(inp.qkv, "row_strided", pad=16, offset=8)[0]
    cos_b, sin_b = inp.cos.expand(B, S, cfg.rotary_dim), inp.sin.expand(B, S, cfg.rotary_dim)
    strided = qkv_rope(qkv_strided, cos_b, sin_b, **inp.kwargs, backend=target.backend)
    contiguous = qkv_rope(inp.qkv, cos_b.contiguous(), sin_b.contiguous(), **inp.kwargs, backend=target.backend)
    for label, a, b in zip("qkv", strided, contiguous):
        assert torch.equal(a, b), label
    broadcast = qkv_rope(inp.qkv, inp.cos, inp.sin, **inp.kwargs, backend=target.backend)
    hi, lo = reference_pair(qkv_rope_reference, inp.qkv, inp.cos, inp.sin, **inp.kwargs)
    assert_op_matches("qkv_rope", target.backend, broadcast, hi, lo, name=f"{name} broadcast tables")


@pytest.mark.parametrize("target,dtype,name", grid("qkv_rope", DTYPES, ("d80_partial_per_head_32", "persimmon_24"),
                                                   backends=("cpp",)))
def test_qkv_rope_large_outputs_streamed_cpp(target, dtype, name):
    """Outputs of 16 MiB and more are written through a stage with non-temporal stores (kStreamOutBytes in
    csrc/cpu/qkv_rope.cpp). The per-token math is the same either way, so the result must equal, bit for
    bit, the op run on slices of the sequence small enough for ordinary stores; the odd slice length puts
    the runs at unaligned addresses, so the partial cache lines at both ends of a run are covered."""
    cfg = {"d80_partial_per_head_32": QkvConfig(name, 32, 16, 80, 20, qk_norm="per_head"),
           "persimmon_24": QkvConfig(name, 24, 24, 64, 32, qkv_head_major=True, qk_norm="shared_bias")}[name]
    S = 1027 if dtype == torch.float32 else 2053
    assert S * cfg.width * torch.finfo(dtype).bits // 8 >= 16 << 20
    inp = qkv_inputs(cfg, 1, S, dtype, "cpu", seed=11, cos_batch=False)
    outs = qkv_rope(inp.qkv, inp.cos, inp.sin, **inp.kwargs, backend=target.backend)
    step = 257
    pieces = [qkv_rope(inp.qkv[:, i:i + step], inp.cos[:, i:i + step], inp.sin[:, i:i + step], **inp.kwargs,
                       backend=target.backend) for i in range(0, S, step)]
    for label, o, parts in zip("qkv", outs, zip(*pieces)):
        assert torch.equal(o, torch.cat(parts, dim=2)), label
    hi, lo = reference_pair(qkv_rope_reference, inp.qkv[:, :64], inp.cos[:, :64], inp.sin[:, :64], **inp.kwargs)
    assert_op_matches("qkv_rope", target.backend, tuple(o[:, :, :64] for o in outs), hi, lo, name="streamed")


def _head_dim_1040(backend, S, norm):
    cfg = QkvConfig("d1040", 1, 1, 1040, 520, qk_norm="per_head" if norm else None)
    inp = qkv_inputs(cfg, 1, S, torch.float32, "cpu", cos_batch=False, scale=1.0)
    expect = qkv_rope(inp.qkv, inp.cos, inp.sin, **inp.kwargs, backend="torch")
    for got, ref in zip(qkv_rope(inp.qkv, inp.cos, inp.sin, **inp.kwargs, backend=backend), expect):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("target", targets("qkv_rope", kernels=True, device="cpu"))
def test_head_dim_past_the_cpu_kernels_stack_scratch(target):
    """head_dim 1040, over the C++ kernel's 1024-wide stack scratch (it used to refuse it with a
    RuntimeError while the reference ran): the reference's answer, with qk-norm."""
    _head_dim_1040(target.backend, 3, norm=True)


@pytest.mark.parametrize("target", targets("qkv_rope", backends=("cpp",)))
def test_head_dim_past_the_stack_scratch_streamed_cpp(target):
    """The same through the C++ kernel's streamed-output path (>= 16 MiB out: 1400 tokens of 3 * 1040 fp32)."""
    _head_dim_1040(target.backend, 1400, norm=False)


# ------------------------------------------------------------------------------------ qkv_rope_cache

# (B, S, Tmax)
CACHE_TOKENS = ((1, 1, 40), (3, 7, 40), (3, 2, 12), (1, 3, 5))
CACHE_ODD_CONFIGS = ("d80_gqa2", "d80_partial_per_head", "d64_head_major_3heads", "d128_interleaved_gqa4",
                     "d40_interleaved_per_head_bias")


def _cache_tokens_for(dtype, cfg, tokens, pos_dtype):
    """The odd configs at one token and at 7 tokens of 3 sequences, int32 and int64 positions; the
    Triton subset's configs at a short cache; the others at 7 tokens of 3 sequences."""
    if cfg.name in CACHE_ODD_CONFIGS:
        return tokens in ((1, 1, 40), (3, 7, 40))
    if pos_dtype != torch.int32:
        return False
    if cfg.name in _TRITON:
        return tokens == ((1, 3, 5) if dtype == torch.bfloat16 else (3, 2, 12))
    return tokens == (3, 7, 40) and dtype == torch.bfloat16


def _cache_triton_subset(dtype, cfg, tokens, pos_dtype):
    if cfg.name in _TRITON:
        return True
    return dtype == torch.bfloat16 and tokens == (1, 1, 40) and pos_dtype == torch.int64


@pytest.mark.parametrize("target,dtype,cfg,tokens,pos_dtype", grid(
    "qkv_rope_cache", DTYPES, CONFIGS, CACHE_TOKENS, (torch.int32, torch.int64), where=_cache_tokens_for,
    triton=_cache_triton_subset,
    reference=lambda dtype, cfg, tokens, pos_dtype: dtype == torch.bfloat16 and cfg.name in QKV_FAMILY_CONFIGS))
def test_qkv_rope_cache_matches_reference(target, dtype, cfg, tokens, pos_dtype):
    """q and the k rows written against the reference; v rows are copied, bit for bit; no other slot changes."""
    B, S, t_max = tokens
    inp = qkv_inputs(cfg, B, S, dtype, target.device, seed=3)
    pos = distinct_positions(B, S, t_max, pos_dtype, target.device)
    kc0, vc0 = kv_caches(B, cfg.num_kv_heads, t_max, cfg.head_dim, dtype, target.device)
    kc, vc = kc0.clone(), vc0.clone()
    q = qkv_rope_cache(inp.qkv, inp.cos, inp.sin, kc, vc, pos, **inp.kwargs, backend=target.backend)
    k_lo, v_lo = kc0.clone(), vc0.clone()
    q_lo = qkv_rope_cache_reference(inp.qkv, inp.cos, inp.sin, k_lo, v_lo, pos, **inp.kwargs)
    k_hi, v_hi = kc0.float(), vc0.float()
    q_hi = qkv_rope_cache_reference(upcast(inp.qkv), upcast(inp.cos), upcast(inp.sin), k_hi, v_hi, pos,
                                    **{k: upcast(v) for k, v in inp.kwargs.items()})
    assert q.shape == (B, cfg.num_heads, S, cfg.head_dim)
    assert_op_matches("qkv_rope_cache", target.backend, q, q_hi, q_lo, name=f"{cfg.name}:q")
    assert_op_matches("qkv_rope_cache", target.backend, kc, k_hi, k_lo, name=f"{cfg.name}:k_cache")
    assert torch.equal(vc, v_lo), "v is copied into the cache unchanged"
    written = torch.zeros(B, t_max, dtype=torch.bool, device=target.device)
    written[torch.arange(B, device=target.device)[:, None], pos.long()] = True
    untouched = ~written[:, None, :, None].expand_as(kc)
    assert torch.equal(kc[untouched], kc0[untouched]) and torch.equal(vc[untouched], vc0[untouched])


@pytest.mark.parametrize("target", targets("qkv_rope_cache", device="cpu"))
@pytest.mark.parametrize("t_max,bad", [(0, 0), (6, -1), (6, 6), (6, 1 << 40)])
def test_cache_positions_outside_the_cache_raise_and_write_nothing(target, t_max, bad):
    """On CPU every backend checks the positions before writing: a zero-length cache once segfaulted the C++
    backend, and the reference wrote slot -1 (the last)."""
    inp, (kc, vc) = small_qkv(t_max)
    pos = torch.tensor([[0, 1, 2], [3, bad, 4]]) if t_max else torch.full((2, 3), bad)
    kc0, vc0 = kc.clone(), vc.clone()
    with pytest.raises(ValueError, match=r"cache_positions\[.*\] = .* is outside the cache.*\[0, Tmax\) = \[0, "
                                         f"{t_max}\\)"):
        qkv_rope_cache(inp.qkv, inp.cos, inp.sin, kc, vc, pos, **inp.kwargs, backend=target.backend)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@pytest.mark.parametrize("target", targets("qkv_rope_cache", backends=("cpp",)))
def test_cpp_op_checks_positions_itself(target):
    """The C++ entry point, called directly (as the fused modules do), raises the public op's error."""
    inp, _ = small_qkv()
    kc = torch.zeros(2, 2, 4, 16)
    args = (inp.qkv, inp.cos, inp.sin, None, None, None, None, kc, kc.clone(), torch.tensor([[0, 1, 4], [0, 1, 2]]),
            4, 2, 16, 16, False, False, 1e-5)
    with pytest.raises(ValueError, match="outside the cache"):
        impl("qkv_rope_cache", target.backend, "cpu")(*args)


@pytest.mark.parametrize("target", targets("qkv_rope_cache", device="cpu"))
def test_cache_positions_int32_and_strided(target):
    inp, (kc, vc) = small_qkv()
    pos = torch.tensor([[5, 9, 0, 9, 2, 9], [1, 9, 4, 9, 3, 9]], dtype=torch.int32)[:, ::2]  # [B, S], stride 2
    ref_k, ref_v = kc.clone(), vc.clone()
    q_ref = qkv_rope_cache(inp.qkv, inp.cos, inp.sin, ref_k, ref_v, pos.contiguous().long(), **inp.kwargs,
                           backend="torch")
    q = qkv_rope_cache(inp.qkv, inp.cos, inp.sin, kc, vc, pos, **inp.kwargs, backend=target.backend)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(kc, ref_k)
    torch.testing.assert_close(vc, ref_v)


@pytest.mark.parametrize("target", targets("qkv_rope_cache", backends=("triton",), device="cpu"))
def test_triton_kernel_drops_rows_outside_the_cache(target, monkeypatch):
    """On CUDA nothing checks the positions (a host sync): the kernel itself must not write out of
    bounds. Here the CPU check is switched off and each cache sits inside a guard buffer."""
    import fastlm.kernels.qkv_rope as kq

    monkeypatch.setattr(kq, "check_positions", lambda *a: None)
    inp, _ = small_qkv()
    t_max = 6
    kbuf, vbuf = torch.full((2, 2, t_max + 2, 16), 7.0), torch.full((2, 2, t_max + 2, 16), 7.0)
    kc, vc = kbuf[:, :, 1:-1], vbuf[:, :, 1:-1]  # one guard slot either side of each cache
    pos = torch.tensor([[0, -1, 2], [t_max, 3, 1 << 33]])
    qkv_rope_cache(inp.qkv, inp.cos, inp.sin, kc, vc, pos, **inp.kwargs, backend=target.backend)
    _, k, v = qkv_rope(inp.qkv, inp.cos, inp.sin, **inp.kwargs, backend="torch")  # [B, Hkv, S, D]
    written = {(0, 0): 0, (0, 2): 2, (1, 3): 1}  # (b, slot) -> token s, for the in-range positions
    for b in range(2):
        for t in range(-1, t_max + 1):
            if (b, t) in written:
                torch.testing.assert_close(kc[b, :, t], k[b, :, written[b, t]])
                torch.testing.assert_close(vc[b, :, t], v[b, :, written[b, t]])
            else:  # untouched, guard slots (t = -1, Tmax) included
                assert (kbuf[b, :, t + 1] == 7.0).all() and (vbuf[b, :, t + 1] == 7.0).all(), (b, t)


# ------------------------------------------------------------------------------ gradients, opcheck

@pytest.mark.parametrize("target", targets("qkv_rope", kernels=True, device="cpu"))
def test_gradients_equal_the_references(target):
    inp, (kc, vc) = small_qkv()
    dims = QKV_SMALL.dims()
    qn, kn = randn(16, seed=5), randn(16, seed=6)

    def qkv_loss(b, qkv_, qn_, kn_):
        q, k, v = qkv_rope(qkv_, inp.cos, inp.sin, **dims, q_norm_weight=qn_, k_norm_weight=kn_, backend=b)
        return q.square().sum() + (k * v).sum()

    def cache_loss(b, qkv_, qn_, kn_):
        k_cache, v_cache = kc.clone(), vc.clone()
        q = qkv_rope_cache(qkv_, inp.cos, inp.sin, k_cache, v_cache, torch.tensor([[0, 1, 2], [3, 4, 5]]), **dims,
                           q_norm_weight=qn_, k_norm_weight=kn_, backend=b)
        return q.square().sum() + (k_cache * v_cache).sum()

    for loss in (qkv_loss, cache_loss):
        assert_gradients_match(loss, (inp.qkv, qn, kn), target.backend, all_inputs=True)


@pytest.mark.parametrize("target", targets(None, kernels=True))
@pytest.mark.parametrize("op", ["qkv_rope", "qkv_rope_cache"])
def test_opcheck(target, op):
    run_opcheck(op, target)


# ---------------------------------------------------------------------------- the references vs HF

def _hf_split(qkv, H, Hkv, D):
    B, S, _ = qkv.shape
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    return (q.view(B, S, H, D).transpose(1, 2), k.view(B, S, Hkv, D).transpose(1, 2),
            v.view(B, S, Hkv, D).transpose(1, 2))


def _tables(B, S, rotary_dim, dtype, theta=10000.0):
    pos = torch.arange(S).float()[None].expand(B, S) + 5 * torch.arange(B).float()[:, None]
    return rope_tables(pos, rotary_dim, dtype, theta)


BY_DTYPE = {"ids": lambda d: str(d).split(".")[-1]}


@pytest.mark.parametrize("dtype", DTYPES, **BY_DTYPE)
def test_reference_split_full_neox_matches_arcee(dtype):
    from transformers.models.arcee.modeling_arcee import apply_rotary_pos_emb as neox_rope

    B, S, H, Hkv, D = 2, 7, 4, 2, 80
    qkv = randn(B, S, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = _tables(B, S, D, dtype)
    q, k, v = qkv_rope_reference(qkv, cos, sin, num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary_dim=D)
    hq, hk, hv = _hf_split(qkv, H, Hkv, D)
    eq, ek = neox_rope(hq, hk, cos, sin)
    for a, b in ((q, eq), (k, ek), (v, hv)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, **BY_DTYPE)
def test_reference_interleaved_matches_helium(dtype):
    from transformers.models.helium.modeling_helium import apply_rotary_pos_emb as interleaved_rope

    B, S, H, Hkv, D = 1, 7, 4, 2, 128
    qkv = randn(B, S, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = _tables(B, S, D, dtype, theta=1e5)
    q, k, _ = qkv_rope_reference(qkv, cos, sin, num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary_dim=D,
                                 interleaved=True)
    hq, hk, _ = _hf_split(qkv, H, Hkv, D)
    eq, ek = interleaved_rope(hq, hk, cos, sin)
    torch.testing.assert_close(q, eq, rtol=0, atol=0)
    torch.testing.assert_close(k, ek, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, **BY_DTYPE)
def test_reference_per_head_norm_partial_matches_stablelm(dtype):
    from transformers.models.arcee.modeling_arcee import apply_rotary_pos_emb as neox_rope
    from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead

    B, S, H, Hkv, D, r = 2, 7, 4, 2, 80, 20
    qkv = randn(B, S, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = _tables(B, S, r, dtype)
    qn, kn = perturbed(StableLmLayerNormPerHead(D, H)).to(dtype), perturbed(StableLmLayerNormPerHead(D, Hkv)).to(dtype)
    qw, kw = torch.stack([n.weight for n in qn.norms]), torch.stack([n.weight for n in kn.norms])
    q, k, v = qkv_rope_reference(qkv, cos, sin, num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary_dim=r,
                                 q_norm_weight=qw, k_norm_weight=kw)
    hq, hk, _ = _hf_split(qkv, H, Hkv, D)
    hq, hk = qn(hq), kn(hk)
    rq, rk = neox_rope(hq[..., :r], hk[..., :r], cos, sin)
    torch.testing.assert_close(q, torch.cat((rq, hq[..., r:]), -1), rtol=0, atol=0)
    torch.testing.assert_close(k, torch.cat((rk, hk[..., r:]), -1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, **BY_DTYPE)
def test_reference_head_major_shared_norm_matches_persimmon(dtype):
    from transformers.models.arcee.modeling_arcee import apply_rotary_pos_emb as neox_rope

    B, S, H, D, r = 2, 7, 4, 64, 32
    qkv = randn(B, S, 3 * H * D, dtype=dtype)
    cos, sin = _tables(B, S, r, dtype)
    qn, kn = perturbed(torch.nn.LayerNorm(D)).to(dtype), perturbed(torch.nn.LayerNorm(D)).to(dtype)
    q, k, v = qkv_rope_reference(qkv, cos, sin, num_heads=H, num_kv_heads=H, head_dim=D, rotary_dim=r,
                                 q_norm_weight=qn.weight, q_norm_bias=qn.bias, k_norm_weight=kn.weight,
                                 k_norm_bias=kn.bias, qkv_head_major=True)
    t = qkv.view(B, S, H, 3, D)
    hq, hk, hv = qn(t[..., 0, :]).transpose(1, 2), kn(t[..., 1, :]).transpose(1, 2), t[..., 2, :].transpose(1, 2)
    rq, rk = neox_rope(hq[..., :r], hk[..., :r], cos, sin)
    torch.testing.assert_close(q, torch.cat((rq, hq[..., r:]), -1), rtol=0, atol=0)
    torch.testing.assert_close(k, torch.cat((rk, hk[..., r:]), -1), rtol=0, atol=0)
    torch.testing.assert_close(v, hv, rtol=0, atol=0)


def test_reference_cache_writes_at_positions():
    cfg = QkvConfig("cache16", 4, 2, 16, 16)
    inp = qkv_inputs(cfg, 2, 3, torch.float32, "cpu", scale=1.0)
    kc, vc = torch.zeros(2, 2, 10, 16), torch.zeros(2, 2, 10, 16)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    q = qkv_rope_cache_reference(inp.qkv, inp.cos, inp.sin, kc, vc, pos, **inp.kwargs)
    q2, k2, v2 = qkv_rope_reference(inp.qkv, inp.cos, inp.sin, **inp.kwargs)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(kc[0, :, :3], k2[0])
    torch.testing.assert_close(vc[1, :, 5:8], v2[1])
    assert kc[0, :, 3:].abs().sum() == 0 and kc[1, :, :5].abs().sum() == 0
