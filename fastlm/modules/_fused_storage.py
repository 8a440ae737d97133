"""One contiguous storage for weights that one GEMM consumes together (QKV, gate/up, per-head norms).

The HF Parameters stay registered under their own names but become row views into the fused
tensor, so ``state_dict`` keys and values are unchanged and the weights are held once, not twice.
``transformers.save_pretrained`` clones disjoint views before writing safetensors, so a patched
model saves a plain HF checkpoint. ``.to()``/``.half()`` replace each Parameter's data separately,
which breaks the sharing: the fused modules re-fuse after every ``_apply``.

The fused tensors must never go stale. In-place updates (``load_state_dict``, an optimizer step) write
through the views, so the fused tensor sees them. Anything that gives a Parameter other memory
(``load_state_dict(assign=True)``, ``copy.deepcopy``, tying or untying, ``p.data = ...``, one Parameter
shared by two fused modules, each of which re-points it) changes its data pointer. So each fused
module records the data pointers of its source Parameters (:func:`data_ptrs`) when it fuses, and
re-fuses when they differ: before every forward, and once per engine call (:func:`refresh_fused_weights`).
While the fused tensor is alive no other allocation can take its addresses, so equal pointers mean
the Parameter still is the view.

Under ``torch.compile`` the check is skipped (dynamo cannot trace data-pointer comparisons): the
engine checks before each call, outside its compiled step; a model compiled by the user sees
in-place updates, and a Parameter replaced after compiling is seen after ``fastlm.patch`` or
:func:`refresh_fused_weights` runs eagerly (e.g. one eager forward under ``torch.no_grad``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

_is_compiling = torch.compiler.is_compiling


def fuse_parameters(params: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``params`` (Parameters or buffers) along dim 0 and re-point each one at its slice.
    Returns the fused tensor."""
    fused = torch.cat([p.detach() for p in params], dim=0)
    offset = 0
    for p in params:
        n = p.shape[0]
        p.data = fused[offset:offset + n]
        offset += n
    return fused


def fuse_linears(linears) -> tuple:
    """The one GEMM over the rows of ``linears`` (q/k/v, gate/up; one linear: its own tensors) ->
    (weight, bias, None) for 16-bit projections, (qweight, bias, (scales, bits, group_size)) for quantized
    ones (fastlm.modules._quantized), the argument fastlm.modules._linear.project_fused takes. Several
    linears are fused with :func:`fuse_parameters`: a quantized weight's rows are quantized independently, so
    its qweight and scales fuse row-wise like a 16-bit weight."""
    first = linears[0]
    quant = first.__dict__.get("_fastlm_quant")
    biased = first.bias is not None
    if len(linears) == 1:
        bias = first.bias
        if quant is None:
            return first.weight, bias, None
        return first._buffers["qweight"], bias, (first._buffers["scales"], *quant)
    bias = fuse_parameters([m.bias for m in linears]) if biased else None
    if quant is None:
        return fuse_parameters([m.weight for m in linears]), bias, None
    qweight = fuse_parameters([m._buffers["qweight"] for m in linears])
    return qweight, bias, (fuse_parameters([m._buffers["scales"] for m in linears]), *quant)


def unfuse_linears(linears) -> None:
    """Give the weights (or qweights and scales) and biases of ``linears`` their own storage again."""
    from fastlm.modules._quantized import weight_tensors

    for tensors in zip(*(weight_tensors(m) for m in linears)):
        unfuse_parameters(list(tensors))
    if linears[0].bias is not None:
        unfuse_parameters([m.bias for m in linears])


def unfuse_parameters(params: list[nn.Parameter]) -> None:
    """Give each Parameter its own storage again (the fused tensor is freed once all are cloned)."""
    for p in params:
        p.data = p.data.clone()


def data_ptrs(tensors) -> tuple[int, ...]:
    """The data pointers of ``tensors``: the fingerprint a fused module compares to see whether its
    source Parameters still are views of its fused storage."""
    return tuple(t.data_ptr() for t in tensors)


def refresh_fused_weights(model) -> None:
    """Re-fuse every fused module of ``model`` whose source Parameters were given other memory."""
    for module in model.modules():
        refresh = getattr(module, "_fastlm_refresh", None)
        if refresh is not None:
            refresh()
