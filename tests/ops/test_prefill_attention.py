"""prefill_attention: its argument checks, SDPA (or flash-attn on CUDA) where a mask is given, and each
backend's kernel for the unmasked calls (the C++ CPU kernel) against fp64 SDPA by the low-precision rule
(tests/_tolerance.py): GQA, head dims 80 / 128 / Dv != D, 7 tokens and query blocks past 64 (an odd count
of them), S != T, not causal, a single query, the engine's [B, S, H, D] views, expanded K, zero sizes,
gradients, opcheck. Its property test: tests/ops/test_property.py."""
import pytest
import torch

from _api import cpu_fp16_sdpa_widens, prefill_attention, prefill_attention_ref
from _inputs import DTYPES, grid, randn, run_opcheck, targets
from _tolerance import assert_gradients_match, assert_op_matches

OP = "prefill_attention"

# (name, B, H, Hkv, S, T, D, Dv, is_causal)
PREFILL_CASES = [
    ("gqa_d80_7_tokens", 1, 4, 2, 7, 7, 80, 80, True),
    ("arcee_gqa5_two_blocks", 1, 5, 1, 128, 128, 128, 128, True),
    ("mha_three_blocks", 2, 3, 3, 130, 130, 64, 64, True),  # an odd count of query blocks: the middle one
    ("fewer_queries_than_keys", 1, 3, 3, 5, 9, 16, 24, True),  # top-left causal, Dv != D
    ("more_queries_than_keys", 1, 2, 1, 70, 5, 32, 32, True),
    ("not_causal", 1, 2, 2, 7, 11, 24, 24, False),
    ("one_query", 2, 2, 2, 1, 6, 16, 16, True),  # S = 1 sees every key
]
CASE_IDS = [c[0] for c in PREFILL_CASES]


def prefill_inputs(case, dtype, device, layout):
    _, B, H, Hkv, S, T, D, Dv, _ = case
    if layout == "bshd":  # the engine's views: [B, S, H, D] memory transposed
        q = randn(B, S, H, D, device=device, seed=1, dtype=dtype).transpose(1, 2)
        k = randn(B, T, Hkv, D, device=device, seed=2, dtype=dtype).transpose(1, 2)
        v = randn(B, T, Hkv, Dv, device=device, seed=3, dtype=dtype).transpose(1, 2)
    elif layout == "expanded_kv":  # one K/V row block shared by every batch row (stride 0)
        q = randn(B, H, S, D, device=device, seed=1, dtype=dtype)
        k = randn(1, Hkv, T, D, device=device, seed=2, dtype=dtype).expand(B, Hkv, T, D)
        v = randn(1, Hkv, T, Dv, device=device, seed=3, dtype=dtype).expand(B, Hkv, T, Dv)
    else:
        q, k, v = (randn(B, h, n, d, device=device, seed=s, dtype=dtype)
                   for s, (h, n, d) in enumerate(((H, S, D), (Hkv, T, D), (Hkv, T, Dv)), 1))
    return q, k, v


@pytest.mark.parametrize("target,dtype,case,layout", grid(OP, DTYPES, PREFILL_CASES,
                                                          ("contiguous", "bshd", "expanded_kv")))
def test_kernel_matches_sdpa(target, dtype, case, layout):
    q, k, v = prefill_inputs(case, dtype, target.device, layout)
    causal, scale = case[-1], 0.3
    out = prefill_attention(q, k, v, is_causal=causal, scale=scale, backend=target.backend)
    ref_hi = prefill_attention_ref(q.double(), k.double(), v.double(), causal and q.shape[2] > 1, scale)
    ref_lo = prefill_attention(q, k, v, is_causal=causal, scale=scale, backend="torch")
    assert out.shape == ref_lo.shape
    assert_op_matches(OP, target.backend, out, ref_hi, ref_lo)


@pytest.mark.parametrize("target", targets(OP))
@pytest.mark.parametrize("shape", [(0, 2, 3, 8), (1, 2, 0, 8), (1, 0, 3, 8), (1, 2, 3, 0)], ids=str)
def test_zero_sizes(target, shape):
    q = randn(*shape, device=target.device)
    k = v = randn(shape[0], 1, 4, shape[3], device=target.device, seed=1)
    out = prefill_attention(q, k, v, backend=target.backend)
    expect = prefill_attention(q, k, v, backend="torch")
    assert out.shape == expect.shape
    torch.testing.assert_close(out, expect, equal_nan=True)


@pytest.mark.parametrize("target", targets(OP))
def test_gradients_are_sdpas(target):
    inputs = [randn(1, 4, 7, 16, device=target.device, seed=s) for s in range(3)]
    assert_gradients_match(lambda backend, q, k, v: prefill_attention(q, k[:, :2], v[:, :2], backend=backend)
                           .square().sum(), inputs, target.backend, all_inputs=True)


@pytest.mark.parametrize("target", targets(OP, kernels=True))
def test_opcheck(target):
    run_opcheck(OP, target)

PREFILL_BAD = [  # (exception, message, q, k, v, mask, kwargs)
    (ValueError, "q must be \\[B, H, S, D\\]", randn(4, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), None, {}),
    (ValueError, "k must be \\[B, Hkv, T, D\\] with B=1", randn(1, 4, 3, 8), randn(2, 2, 3, 8), randn(2, 2, 3, 8),
     None, {}),
    (ValueError, "Hkv > 0 dividing H=4", randn(1, 4, 3, 8), randn(1, 3, 3, 8), randn(1, 3, 3, 8), None, {}),
    (ValueError, "k must have q's head dim D=8", randn(1, 4, 3, 8), randn(1, 2, 3, 16), randn(1, 2, 3, 8), None, {}),
    (ValueError, "v must be \\[B, Hkv, T, Dv\\]", randn(1, 4, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 5, 8), None, {}),
    (TypeError, "k has dtype torch.float16 but q has dtype torch.float32", randn(1, 4, 3, 8),
     randn(1, 2, 3, 8, dtype=torch.float16), randn(1, 2, 3, 8), None, {}),
    (ValueError, "v is on meta but q is on cpu", randn(1, 4, 3, 8), randn(1, 2, 3, 8),
     torch.empty(1, 2, 3, 8, device="meta"), None, {}),
    (ValueError, "attn_mask must broadcast to \\[B, H, S, T\\] = \\[1, 4, 3, 5\\]", randn(1, 4, 3, 8),
     randn(1, 2, 5, 8), randn(1, 2, 5, 8), torch.ones(1, 1, 3, 4, dtype=torch.bool), {}),
    (TypeError, "attn_mask must be bool or q's dtype", randn(1, 4, 3, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8),
     torch.ones(3, 5, dtype=torch.int64), {}),
    (TypeError, "q must be float32", torch.ones(1, 4, 3, 8, dtype=torch.int32), randn(1, 2, 3, 8),
     randn(1, 2, 3, 8), None, {}),
    (TypeError, "v must be a torch.Tensor", randn(1, 4, 3, 8), randn(1, 2, 3, 8), None, None, {}),
    (ValueError, "scale must be finite", randn(1, 4, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), None,
     {"scale": float("nan")}),
]


@pytest.mark.parametrize("case", range(len(PREFILL_BAD)))
def test_checks_its_arguments(case):
    exc, message, q, k, v, mask, kwargs = PREFILL_BAD[case]
    with pytest.raises(exc, match=message):
        prefill_attention(q, k, v, mask, **kwargs)


def test_accepts_gqa_masks_and_scales():
    q, k, v = randn(2, 4, 3, 8), randn(2, 2, 5, 8, seed=1), randn(2, 2, 5, 8, seed=2)
    mask = torch.rand(2, 1, 3, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    out = prefill_attention(q, k, v, mask, scale=0.2)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_fp16_on_cpu_follows_the_gemm_path(mask_kind):
    """SDPA's path (masked calls; every call with the torch backend): fp16 on a CPU without native fp16 dot
    products (this one's answer: fastlm._C.cpu_gemm16_widens) runs SDPA in fp32 on exact copies and rounds
    once; elsewhere, ATen's fp16 SDPA. Either way within the low-precision rule of the fp64 result."""
    import torch.nn.functional as F

    q, k, v = (randn(1, 4, 7, 80, seed=s, dtype=torch.float16) for s in range(3))  # head_dim 80, 7 tokens
    mask = None
    if mask_kind is not None:
        keep = torch.rand(1, 1, 7, 7, generator=torch.Generator().manual_seed(4)) > 0.3
        keep[..., 0] = True
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=torch.float16).masked_fill(~keep, -1e4)
    out = prefill_attention(q, k, v, mask, backend="torch")  # SDPA's path (unmasked calls have kernels)
    m32 = mask.float() if mask is not None and mask.dtype != torch.bool else mask
    wide = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m32,
                                          is_causal=mask is None).half()
    native = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    torch.testing.assert_close(out, wide if cpu_fp16_sdpa_widens() else native, rtol=0, atol=0)
    m64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m64, is_causal=mask is None)
    assert (out.double() - exact).abs().max() <= 2 * (native.double() - exact).abs().max() + 1e-3


@pytest.mark.parametrize("mode", ["widen", "aten"])
def test_fp16_on_cpu_follows_the_gemm_mode_set_at_run_time(mode):
    """fastlm._C.set_cpu_gemm16 moves prefill attention's fp16 choice with the projections' (one choice)."""
    import torch.nn.functional as F

    C = pytest.importorskip("fastlm._C", reason="the 16-bit GEMM mode lives in the C++ extension")
    q, k, v = (randn(1, 2, 7, 80, seed=s, dtype=torch.float16) for s in range(3))
    prev = C.set_cpu_gemm16(mode)
    try:
        out = prefill_attention(q, k, v, backend="torch")  # SDPA's path
    finally:
        C.set_cpu_gemm16(prev)
    if mode == "widen":
        expect = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).half()
    else:
        expect = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
