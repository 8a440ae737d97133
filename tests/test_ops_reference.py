"""The plain-PyTorch references against the HF modules they replace (exact in every dtype: same math)."""
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.arcee.modeling_arcee import ArceeRMSNorm
from transformers.models.arcee.modeling_arcee import apply_rotary_pos_emb as neox_rope
from transformers.models.helium.modeling_helium import HeliumRMSNorm
from transformers.models.helium.modeling_helium import apply_rotary_pos_emb as interleaved_rope
from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead

from fastlm import ops
from fastlm.ops.activations import relu2_ref, swiglu_ref
from fastlm.ops.attention import decode_attention_ref
from fastlm.ops.layer_norm import add_layer_norm_ref
from fastlm.ops.qkv import qkv_rope_cache_ref, qkv_rope_ref
from fastlm.ops.rms_norm import add_rms_norm_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _perturbed(module, scale=0.3):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_cls,weight_in_fp32", [(ArceeRMSNorm, False), (HeliumRMSNorm, True)])
def test_add_rms_norm_matches_hf(dtype, norm_cls, weight_in_fp32):
    norm = _perturbed(norm_cls(3000, eps=1e-5)).to(dtype)
    x, res = torch.randn(2, 7, 3000, dtype=dtype), torch.randn(2, 7, 3000, dtype=dtype)
    y, h = add_rms_norm_ref(x, res, norm.weight, 1e-5, weight_in_fp32)
    torch.testing.assert_close(h, res + x, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(res + x), rtol=0, atol=0)
    y0, h0 = add_rms_norm_ref(x, None, norm.weight, 1e-5, weight_in_fp32)
    assert h0 is x
    torch.testing.assert_close(y0, norm(x), rtol=0, atol=0)


def test_rms_cast_orders_differ_in_bf16():
    """The flag matters: the two cast orders give different bf16 results (else the test above proves little)."""
    w = torch.randn(3000).to(torch.bfloat16)
    x = torch.randn(4, 3000, dtype=torch.bfloat16)
    a, _ = add_rms_norm_ref(x, None, w, 1e-5, False)
    b, _ = add_rms_norm_ref(x, None, w, 1e-5, True)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_add_layer_norm_matches_hf(dtype, bias):
    norm = _perturbed(torch.nn.LayerNorm(3000, eps=1e-5, bias=bias)).to(dtype)
    x, res = torch.randn(7, 3000, dtype=dtype), torch.randn(7, 3000, dtype=dtype)
    y, h = add_layer_norm_ref(x, res, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(h, res + x, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(res + x), rtol=0, atol=0)


def _tables(B, S, rotary_dim, dtype, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    pos = torch.arange(S).float().unsqueeze(0).expand(B, S) + torch.arange(B).float().unsqueeze(1) * 5
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_split_full_neox_matches_arcee(dtype):
    B, S, H, Hkv, D = 2, 7, 4, 2, 80
    qkv = torch.randn(B, S, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = _tables(B, S, D, dtype)
    q, k, v = qkv_rope_ref(qkv, cos, sin, None, None, None, None, H, Hkv, D, D, False, False, 1e-5)
    hq, hk, hv = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    hq, hk, hv = (t.view(B, S, -1, D).transpose(1, 2) for t in (hq, hk, hv))
    eq, ek = neox_rope(hq, hk, cos, sin)
    for a, b in ((q, eq), (k, ek), (v, hv)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_interleaved_matches_helium(dtype):
    B, S, H, Hkv, D = 1, 7, 4, 2, 128
    qkv = torch.randn(B, S, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = _tables(B, S, D, dtype, theta=1e5)
    q, k, _ = qkv_rope_ref(qkv, cos, sin, None, None, None, None, H, Hkv, D, D, True, False, 1e-5)
    hq, hk, _ = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    eq, ek = interleaved_rope(hq.view(B, S, H, D).transpose(1, 2), hk.view(B, S, Hkv, D).transpose(1, 2), cos, sin)
    torch.testing.assert_close(q, eq, rtol=0, atol=0)
    torch.testing.assert_close(k, ek, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_per_head_norm_partial_matches_stablelm(dtype):
    B, S, H, Hkv, D, r = 2, 7, 4, 2, 80, 20
    qkv = torch.randn(B, S, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = _tables(B, S, r, dtype)
    qn = _perturbed(StableLmLayerNormPerHead(D, H)).to(dtype)
    kn = _perturbed(StableLmLayerNormPerHead(D, Hkv)).to(dtype)
    qw = torch.stack([n.weight for n in qn.norms])
    kw = torch.stack([n.weight for n in kn.norms])
    q, k, v = qkv_rope_ref(qkv, cos, sin, qw, None, kw, None, H, Hkv, D, r, False, False, 1e-5)
    hq, hk, hv = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    hq = qn(hq.view(B, S, H, D).transpose(1, 2))
    hk = kn(hk.view(B, S, Hkv, D).transpose(1, 2))
    rq, rk = neox_rope(hq[..., :r], hk[..., :r], cos, sin)
    eq, ek = torch.cat((rq, hq[..., r:]), -1), torch.cat((rk, hk[..., r:]), -1)
    torch.testing.assert_close(q, eq, rtol=0, atol=0)
    torch.testing.assert_close(k, ek, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_qkv_head_major_shared_norm_matches_persimmon(dtype):
    B, S, H, D, r = 2, 7, 4, 64, 32
    qkv = torch.randn(B, S, 3 * H * D, dtype=dtype)
    cos, sin = _tables(B, S, r, dtype)
    qn = _perturbed(torch.nn.LayerNorm(D)).to(dtype)
    kn = _perturbed(torch.nn.LayerNorm(D)).to(dtype)
    q, k, v = qkv_rope_ref(qkv, cos, sin, qn.weight, qn.bias, kn.weight, kn.bias, H, H, D, r, False, True, 1e-5)
    t = qkv.view(B, S, H, 3, D)
    hq, hk, hv = qn(t[..., 0, :]).transpose(1, 2), kn(t[..., 1, :]).transpose(1, 2), t[..., 2, :].transpose(1, 2)
    rq, rk = neox_rope(hq[..., :r], hk[..., :r], cos, sin)
    torch.testing.assert_close(q, torch.cat((rq, hq[..., r:]), -1), rtol=0, atol=0)
    torch.testing.assert_close(k, torch.cat((rk, hk[..., r:]), -1), rtol=0, atol=0)
    torch.testing.assert_close(v, hv, rtol=0, atol=0)


def test_qkv_rope_cache_writes_at_positions():
    B, S, H, Hkv, D, T = 2, 3, 4, 2, 16, 10
    qkv = torch.randn(B, S, (H + 2 * Hkv) * D)
    cos, sin = _tables(B, S, D, torch.float32)
    kc, vc = torch.zeros(B, Hkv, T, D), torch.zeros(B, Hkv, T, D)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    q = qkv_rope_cache_ref(qkv, cos, sin, None, None, None, None, kc, vc, pos, H, Hkv, D, D, False, False, 1e-5)
    q2, k2, v2 = qkv_rope_ref(qkv, cos, sin, None, None, None, None, H, Hkv, D, D, False, False, 1e-5)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(kc[0, :, :3], k2[0])
    torch.testing.assert_close(vc[1, :, 5:8], v2[1])
    assert kc[0, :, 3:].abs().sum() == 0 and kc[1, :, :5].abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_epilogues_match_hf(dtype):
    x = torch.randn(7, 2 * 3000, dtype=dtype)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(swiglu_ref(x), ACT2FN["silu"](gate) * up, rtol=0, atol=0)
    torch.testing.assert_close(relu2_ref(x), ACT2FN["relu2"](x), rtol=0, atol=0)


@pytest.mark.parametrize("Hkv", [1, 2, 8])
@pytest.mark.parametrize("T", [1, 17, 300])
def test_decode_attention_ref_matches_sdpa(Hkv, T):
    B, H, D, Tmax = 3, 8, 80, 320
    q = torch.randn(B, H, D)
    kc, vc = torch.randn(B, Hkv, Tmax, D), torch.randn(B, Hkv, Tmax, D)
    lengths = torch.tensor([T, max(1, T // 2), max(1, T - 1)])
    out = decode_attention_ref(q, kc, vc, lengths, D ** -0.5)
    for b in range(B):
        n = int(lengths[b])
        expect = F.scaled_dot_product_attention(q[b:b + 1, :, None], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n],
                                                enable_gqa=True)[:, :, 0]
        torch.testing.assert_close(out[b:b + 1], expect, rtol=1e-5, atol=1e-5)


# ---- argument checks: every bad input gets an error that names the problem -------------------------------
def test_op_argument_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.add_rms_norm(x, None, torch.ones(32), 1e-5, backend="torch")
    with pytest.raises(TypeError, match="residual has dtype"):
        ops.add_rms_norm(x, x.double(), torch.ones(64), 1e-5, backend="torch")
    with pytest.raises(TypeError, match="x must be float32"):
        ops.add_layer_norm(x.long(), None, torch.ones(64), None, 1e-5, backend="torch")
    with pytest.raises(ValueError, match="last dim must be even"):
        ops.swiglu(torch.randn(2, 5), backend="torch")
    qkv = torch.randn(1, 2, (4 + 2 * 2) * 16)
    cos = sin = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="qkv's last dim"):
        ops.qkv_rope(qkv, cos, sin, num_heads=4, num_kv_heads=1, head_dim=16, rotary_dim=16, backend="torch")
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        ops.qkv_rope(qkv, cos, sin, num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=7, backend="torch")
    with pytest.raises(ValueError, match="cos must be"):
        ops.qkv_rope(qkv, cos[:, :1], sin, num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=16, backend="torch")
    with pytest.raises(ValueError, match="head-major"):
        ops.qkv_rope(torch.randn(1, 2, 3 * 4 * 16), cos, sin, num_heads=4, num_kv_heads=2, head_dim=16,
                     rotary_dim=16, qkv_head_major=True, backend="torch")
    with pytest.raises(TypeError, match="lengths must be int32 or int64"):  # a dtype: TypeError, as elsewhere
        ops.decode_attention(torch.randn(2, 4, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16),
                             torch.tensor([1.0, 2.0]), 0.25, backend="torch")
    with pytest.raises(ValueError, match="k_cache must be"):
        ops.decode_attention(torch.randn(2, 4, 16), torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16),
                             torch.tensor([1, 2]), 0.25, backend="torch")
