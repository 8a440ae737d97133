"""Fused attention: one QKV GEMM, the fused epilogue (split, qk-norm, partial RoPE), HF's attention.

Keeps HF's call signature and cache protocol: k/v go through ``cache.update`` (Dynamic or Static
cache alike; the argument is ``past_key_values`` before transformers 5.24, and both are taken) and
the core attention is whatever ``config._attn_implementation`` names (SDPA, eager, flash), with the
mask HF built. So ``generate()``, left padding and ``output_attentions`` keep
working; the fused path replaces the 3 GEMMs (1 for Persimmon) + ~10 elementwise ops before them.

Per-instance state (set by the family adapter, never in ``state_dict``):
``_fastlm_qkv_fused``: (weight [(H + 2*Hkv) * D, hidden], bias, quantized) of the fused projection
(fastlm.modules._fused_storage.fuse_linears), the storage the HF q/k/v Parameters (or, quantized, their
qweight / scales buffers) are views of (Persimmon's ``query_key_value`` is used as is); ``_fastlm_spec``: the
epilogue's static arguments; ``_fastlm_epilogue``: what :meth:`FusedAttention.epilogue` returns;
``_fastlm_source_ptrs``: the fingerprint that tells when to re-fuse (fastlm.modules._fused_storage).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastlm.modules._fused_storage import (_is_compiling, data_ptrs, fuse_linears, fuse_parameters, unfuse_linears,
                                           unfuse_parameters)
from fastlm.modules._linear import bind_fused, project_fused, project_linear
from fastlm.modules._quantized import compute_dtype, weight_tensors
from fastlm.modules._swap import swap_in
from fastlm.ops._registry import dispatch


@dataclass
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    interleaved: bool
    qkv_head_major: bool
    qk_norm_eps: float = 1e-5
    qkv_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # one name: already fused (Persimmon)
    out_name: str = "o_proj"
    # "none", "shared" (one nn.LayerNorm for all heads) or "per_head" (StableLmLayerNormPerHead)
    qk_norm: str = "none"
    eager_fn: object = field(default=None, repr=False)  # the family's eager_attention_forward


class FusedAttention:
    """Mixin over an HF attention instance (see fastlm.modules._swap)."""

    _fastlm_spec: AttentionSpec
    _fastlm_backend: str

    # ---- weights -------------------------------------------------------------------------
    def _fastlm_qkv_linears(self) -> list[nn.Linear]:
        return [getattr(self, n) for n in self._fastlm_spec.qkv_names]

    def _fastlm_sources(self) -> list[torch.Tensor]:
        """Every HF Parameter the fused projection and epilogue read (their data pointers are the
        fingerprint of the fused copies, see fastlm.modules._fused_storage)."""
        spec = self._fastlm_spec
        out = []
        for linear in self._fastlm_qkv_linears():
            out += weight_tensors(linear)
            if linear.bias is not None:
                out.append(linear.bias)
        if spec.qk_norm == "shared":
            for norm in (self.q_layernorm, self.k_layernorm):
                out += [p for p in (norm.weight, norm.bias) if p is not None]
        elif spec.qk_norm == "per_head":
            out += [n._parameters["weight"] for n in self.q_layernorm.norms]
            out += [n._parameters["weight"] for n in self.k_layernorm.norms]
        return out

    def _fastlm_fuse(self) -> None:
        spec = self._fastlm_spec
        linears = self._fastlm_qkv_linears()
        # Through __dict__: nn.Module.__setattr__ would register a Parameter here as a new state_dict key.
        self.__dict__["_fastlm_qkv_fused"] = fuse_linears(linears)
        qn = kn = (None, None)
        if spec.qk_norm == "shared":
            qn = (self.q_layernorm.weight, self.q_layernorm.bias)
            kn = (self.k_layernorm.weight, self.k_layernorm.bias)
        elif spec.qk_norm == "per_head":  # [heads, D] views over the per-head LayerNorm weights
            qw = [n.weight for n in self.q_layernorm.norms]
            kw = [n.weight for n in self.k_layernorm.norms]
            qn = (fuse_parameters(qw).view(len(qw), -1), None)
            kn = (fuse_parameters(kw).view(len(kw), -1), None)
        norms = (*qn, *kn)
        # Norm weights kept in fp32 beside a 16-bit model (keep_in_fp32_modules, some checkpoints): HF's
        # LayerNorm then normalises in fp32 with the fp32 weights and rounds once; the kernels take the
        # model dtype only, so such layers run the reference epilogue, which does exactly what HF does.
        dtype = compute_dtype(linears[0])
        mixed = any(t is not None and t.dtype != dtype for t in norms)
        # The epilogue: (backend, norms, static ints), its trailing positional arguments in the order of
        # the op contract (qkv_rope_ref).
        self.__dict__["_fastlm_epilogue"] = (
            "torch" if mixed else self._fastlm_backend, norms,
            (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rotary_dim, spec.interleaved,
             spec.qkv_head_major, float(spec.qk_norm_eps)))
        self.__dict__["_fastlm_source_ptrs"] = data_ptrs(self._fastlm_sources())

    def _fastlm_refresh(self) -> None:
        """Re-fuse if any source Parameter no longer is what was fused (replaced, copied, re-pointed)."""
        if _is_compiling():  # see fastlm.modules._fused_storage
            return
        if data_ptrs(self._fastlm_sources()) != self.__dict__["_fastlm_source_ptrs"]:
            self._fastlm_fuse()

    def fused_spec(self) -> AttentionSpec:
        """The head layout and epilogue settings this module was patched with."""
        return self.__dict__["_fastlm_spec"]

    def output_projection(self) -> nn.Linear:
        """The attention's output projection (``o_proj``; Persimmon's ``dense``)."""
        return getattr(self, self.__dict__["_fastlm_spec"].out_name)

    def epilogue(self) -> tuple[str, tuple, tuple]:
        """(backend, norm tensors, static ints) of this layer's QKV epilogue (``qkv_rope[_cache]``), as
        of the last fuse or refresh."""
        return self.__dict__["_fastlm_epilogue"]

    def _fastlm_unfuse(self) -> None:
        linears = self._fastlm_qkv_linears()
        if len(linears) > 1:
            unfuse_linears(linears)
        if self._fastlm_spec.qk_norm == "per_head":
            unfuse_parameters([n.weight for n in self.q_layernorm.norms])
            unfuse_parameters([n.weight for n in self.k_layernorm.norms])

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._fastlm_fuse()  # .to()/.half() gave every Parameter new data: share one storage again
        return result

    # ---- forward -------------------------------------------------------------------------
    def project_qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The fused QKV GEMM: [B, S, hidden] -> [B, S, (H + 2*Hkv) * D]."""
        return project_fused(hidden_states, self.__dict__["_fastlm_qkv_fused"], self._fastlm_backend)

    def bound_project_qkv(self, device: torch.device, eager: bool = False):
        """:meth:`project_qkv` with its weights and kernel looked up now (see fastlm.modules._linear.bind_fused)."""
        return bind_fused(self.__dict__["_fastlm_qkv_fused"], self._fastlm_backend, device, eager)

    def forward(self, hidden_states, *args, **kwargs):
        if torch.is_grad_enabled():
            return super().forward(hidden_states, *args, **kwargs)
        if args:  # HF layers call with keywords; bind positionals by the HF signature to be safe
            bound = inspect.signature(super().forward).bind(hidden_states, *args, **kwargs)
            kwargs = {**bound.arguments, **bound.arguments.pop("kwargs", {})}
            kwargs.pop("hidden_states")
        position_embeddings = kwargs.pop("position_embeddings", None)
        attention_mask = kwargs.pop("attention_mask", None)
        # transformers >= 5.24 passes the cache as `cache`; earlier 5.x as `past_key_values`
        past_key_values = kwargs.pop("cache", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        if past_key_values is None:
            past_key_values = legacy_cache
        for unused in ("use_cache", "output_attentions"):
            kwargs.pop(unused, None)
        if position_embeddings is None:
            raise ValueError(f"{type(self).__name__} needs position_embeddings (cos, sin) from the model's rotary_emb")
        spec = self._fastlm_spec
        B, S, _ = hidden_states.shape
        cos, sin = position_embeddings
        self._fastlm_refresh()
        qkv = self.project_qkv(hidden_states)
        backend, norms, static = self.__dict__["_fastlm_epilogue"]
        q, k, v = dispatch("qkv_rope", backend, qkv.device)(qkv, cos, sin, *norms, *static)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, spec.eager_fn)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(B, S, -1)
        return project_linear(out, getattr(self, spec.out_name), self._fastlm_backend), weights



def patch_attention(module, spec, backend: str) -> None:
    swap_in(module, FusedAttention, spec=spec, backend=backend)
