"""prefill_attention: SDPA (or flash-attn on CUDA) with its argument checks; it has no backends (SDPA is the
kernel), so its tests are not parametrised by one. Its property test: tests/ops/test_property.py."""
import pytest
import torch

from _api import cpu_fp16_sdpa_widens, prefill_attention
from _inputs import randn

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
    """fp16 on a CPU without native fp16 dot products (this one's answer: fastlm._C.cpu_gemm16_widens) runs
    SDPA in fp32 on exact copies and rounds once; elsewhere, ATen's fp16 SDPA. Either way within the
    low-precision rule of the fp64 result."""
    import torch.nn.functional as F

    q, k, v = (randn(1, 4, 7, 80, seed=s, dtype=torch.float16) for s in range(3))  # head_dim 80, 7 tokens
    mask = None
    if mask_kind is not None:
        keep = torch.rand(1, 1, 7, 7, generator=torch.Generator().manual_seed(4)) > 0.3
        keep[..., 0] = True
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=torch.float16).masked_fill(~keep, -1e4)
    out = prefill_attention(q, k, v, mask)
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
        out = prefill_attention(q, k, v)
    finally:
        C.set_cpu_gemm16(prev)
    if mode == "widen":
        expect = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).half()
    else:
        expect = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
