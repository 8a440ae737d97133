"""Weight-only quantized projections: ``fastlm.patch(model, quantize="int8" | "int4")``.

Each quantized ``nn.Linear`` becomes a :class:`QuantizedLinear` (a class swap, fastlm.modules._swap): its
``weight`` Parameter is deleted (the 16-bit copy is freed) and two buffers hold it instead, in the format of
fastlm.ops.quantized: ``qweight`` (int8 [N, K], or int4 packed into uint8 [N, K // 2]) and ``scales``
(fp32 [N, K // G]); its bias stays a Parameter. So ``state_dict`` holds ``<linear>.qweight`` and
``<linear>.scales`` where HF holds ``<linear>.weight``, every other key unchanged. The fused modules fuse the
q/k/v (and gate/up) buffers into one storage exactly as they fuse 16-bit weights (fastlm.modules._fused_storage):
the buffers become row views of it, which is valid because every row is quantized on its own.

Loading a ``state_dict`` into a quantized model (:meth:`QuantizedLinear._load_from_state_dict`):

* ``<linear>.qweight`` / ``<linear>.scales`` (a quantized model's own ``state_dict``) load as they are;
* a 16-bit ``<linear>.weight`` is re-quantized at load (cast to the model's dtype first, so the result is
  what loading into the 16-bit model and then ``patch(quantize=...)`` gives);
* both for one projection, a qweight of the other bit width, or a weight of the wrong shape: an error.

A quantized model keeps working with autograd on (HF's own forward; ``quant_linear``'s reference is
differentiable in the input), but its quantized weights are buffers: not trained. ``.to(dtype)`` changes the
activations' dtype only: ``qweight`` is an integer tensor, and ``scales`` stay fp32 (:meth:`QuantizedLinear._apply`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastlm.modules._linear import project_linear
from fastlm._checks import FLOAT_DTYPES
from fastlm.ops.quantized import QWEIGHT_DTYPE, quant_linear, quantize_weight, resolve_group_size

QUANTIZE_CHOICES = (None, "int8", "int4")


@dataclass(frozen=True)
class QuantFormat:
    """One weight format of fastlm.ops.quantized: ``bits`` 8 or 4, ``group_size`` None for the op's
    default (``DEFAULT_GROUP_SIZE[bits]``), PER_CHANNEL for one scale per output channel (G = K)."""

    bits: int
    group_size: int | None = None

    @property
    def name(self) -> str:
        if self.group_size is None:
            return f"int{self.bits}"
        return f"int{self.bits}-" + ("channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}")

    def group_size_for(self, K: int) -> int:
        """The group size of a [N, K] weight (ValueError naming group_size where it cannot be used)."""
        return resolve_group_size(self.bits, K, K if self.group_size == PER_CHANNEL else self.group_size)


PER_CHANNEL = 0  # QuantFormat.group_size: one scale per output channel, whatever K


@dataclass(frozen=True)
class QuantSpec:
    """What ``patch(quantize=...)`` quantizes: every attention and MLP projection to ``projections``, and an
    untied ``lm_head`` to ``lm_head`` (None: kept 16-bit). A tied lm_head is always kept: it is the
    embedding table, which the embedding lookup needs whole."""

    projections: QuantFormat
    lm_head: QuantFormat | None

    @property
    def name(self) -> str:
        head = "16-bit" if self.lm_head is None else self.lm_head.name
        preset = next((k for k, v in PRESETS.items() if v == self), None)
        return preset or f"{self.projections.name}+lm_head:{head}"


# The presets. lm_head (when untied) at int8 per channel for both, the way llama.cpp's Q4_0 keeps its output
# matrix at a higher precision than the rest: measured on fastlm/demo (python -m fastlm.bench.quality;
# README.md's quantization section has the table), an int4 lm_head costs more perplexity than all the int4
# layers together, an int8 one next to nothing, and it is 1 byte a weight beside a 16-bit copy's 2.
PRESETS = {
    "int8": QuantSpec(QuantFormat(8), lm_head=QuantFormat(8)),
    "int4": QuantSpec(QuantFormat(4), lm_head=QuantFormat(8)),
}

_FORMAT_NAME = re.compile(r"^int(8|4)(?:-g(\d+)|-(channel))?$")


def parse_quantize(quantize) -> QuantSpec | None:
    """``quantize`` (None, "int8", "int4" or a QuantSpec) -> a QuantSpec or None; one ValueError naming
    ``quantize`` otherwise."""
    if quantize is None or isinstance(quantize, QuantSpec):
        return quantize
    if isinstance(quantize, str) and quantize in PRESETS:
        return PRESETS[quantize]
    raise ValueError(f"quantize must be None, 'int8' or 'int4' (or a fastlm.modules.QuantSpec), got {quantize!r}")


def parse_format(name: str) -> QuantFormat:
    """"int8", "int4", "int8-g32", "int4-g64", "int8-channel", ... -> QuantFormat (ValueError naming the text
    otherwise)."""
    m = _FORMAT_NAME.match(name)
    if m is None:
        raise ValueError(f"a weight format is int8 or int4, optionally with -g<group size> or -channel, got {name!r}")
    group_size = PER_CHANNEL if m.group(3) else None if m.group(2) is None else int(m.group(2))
    return QuantFormat(int(m.group(1)), group_size)


def is_quantized(linear) -> bool:
    return "_fastlm_quant" in linear.__dict__


def weight_tensors(linear) -> list[torch.Tensor]:
    """The tensors holding a projection's weight: [weight], or [qweight, scales] once quantized."""
    if "_fastlm_quant" in linear.__dict__:
        return [linear._buffers["qweight"], linear._buffers["scales"]]
    return [linear.weight]


def compute_dtype(linear) -> torch.dtype:
    """The dtype a projection's inputs and outputs have: its weight's, or the one its 16-bit weight would have
    now for a quantized one (followed through ``.to()``, :meth:`QuantizedLinear._apply`)."""
    return linear.__dict__.get("_fastlm_dtype") or linear.weight.dtype


def check_quantizable(name: str, linear, fmt: QuantFormat, quantize) -> None:
    """One ValueError naming ``quantize`` (and the projection) where ``linear`` cannot take ``fmt``."""
    if not isinstance(linear, nn.Linear) or "weight" not in linear._parameters:
        raise ValueError(f"quantize={quantize!r}: {name} is a {type(linear).__name__} without a weight "
                         "Parameter; fastlm quantizes torch.nn.Linear projections only")
    weight = linear.weight
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize={quantize!r} needs float32, bfloat16 or float16 weights, but {name}.weight is "
                         f"{weight.dtype}")
    if weight.is_meta:
        raise ValueError(f"quantize={quantize!r} needs the weights loaded, but {name}.weight is on the meta device")
    try:
        fmt.group_size_for(weight.shape[1])
    except ValueError as exc:
        raise ValueError(f"quantize={quantize!r} ({fmt.name}) cannot quantize {name} [{weight.shape[0]}, "
                         f"{weight.shape[1]}]: {exc}") from None


class QuantizedLinear:
    """Mixin over an ``nn.Linear`` whose weight is quantized (see the module docstring)."""

    _fastlm_quant: tuple[int, int]  # (bits, group_size): the trailing arguments of the quant_linear op
    _fastlm_dtype: torch.dtype
    _fastlm_backend: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # the reference: differentiable in x and bias
            bits, group_size = self._fastlm_quant
            return quant_linear(x, self.qweight, self.scales, self.bias, bits=bits, group_size=group_size,
                                backend="torch")
        return project_linear(x, self, self._fastlm_backend)

    def extra_repr(self) -> str:
        bits, group_size = self.__dict__["_fastlm_quant"]
        groups = "per output channel" if group_size == self.in_features else f"groups of {group_size}"
        return f"{super().extra_repr()}, quantized=int{bits} ({groups})"

    def _apply(self, fn, recurse=True):
        scales = self._buffers["scales"]
        result = super()._apply(fn, recurse)
        moved = self._buffers["scales"]
        if moved.dtype != torch.float32:  # a dtype cast (.half(), .to(bf16)) is for the activations only
            self._buffers["scales"] = scales.to(device=moved.device)
        # The dtype the 16-bit weight would have been given: what fn makes of an empty tensor of the old one.
        self.__dict__["_fastlm_dtype"] = fn(torch.empty(0, dtype=self._fastlm_dtype, device=moved.device)).dtype
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        bits, group_size = self.__dict__["_fastlm_quant"]
        key, qkey, skey = prefix + "weight", prefix + "qweight", prefix + "scales"
        if key in state_dict:
            weight = state_dict.pop(key)
            expected = (self.out_features, self.in_features)
            if qkey in state_dict or skey in state_dict:
                error_msgs.append(f"{prefix[:-1]}: the state_dict has both a 16-bit {key} and its quantized "
                                  f"{qkey} / {skey}: give one of them")
            elif not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
                shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                error_msgs.append(f"{key}: expected a weight of shape {expected} to quantize, got {shape}")
            else:  # re-quantize, from the values the 16-bit model would have held
                weight = weight.to(dtype=self._fastlm_dtype, device=self._buffers["scales"].device)
                state_dict[qkey], state_dict[skey] = (t.detach() for t in quantize_weight(weight, bits, group_size))
        qweight = state_dict.get(qkey)
        if isinstance(qweight, torch.Tensor) and qweight.dtype != QWEIGHT_DTYPE[bits]:
            error_msgs.append(f"{qkey} is {qweight.dtype}, but this projection is quantized to int{bits} "
                              f"({QWEIGHT_DTYPE[bits]}): it comes from a model quantized otherwise")
            state_dict.pop(qkey)
            state_dict.pop(skey, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def quantize_linear(linear: nn.Linear, fmt: QuantFormat, backend: str) -> None:
    """Quantize ``linear``'s weight in place (checked by :func:`check_quantizable`) and free the 16-bit one."""
    from fastlm.modules._swap import swap_in

    weight = linear.weight
    group_size = fmt.group_size_for(weight.shape[1])
    qweight, scales = quantize_weight(weight.detach(), fmt.bits, group_size)
    dtype = weight.dtype
    del weight
    del linear.weight  # the last reference, once the fused module drops its fused copy
    # detach(): a view's _base (int4's qweight is a reshape) would keep its storage alive after the fused module
    # re-points the buffer at its fused storage (fastlm.modules._fused_storage.fuse_parameters)
    linear.register_buffer("qweight", qweight.detach())
    linear.register_buffer("scales", scales.detach())
    swap_in(linear, QuantizedLinear, quant=(fmt.bits, group_size), dtype=dtype, backend=backend)


def quantization_plan(model: nn.Module, spec: QuantSpec, quantize) -> list[tuple[str, nn.Linear, QuantFormat]]:
    """-> [(name, linear, format)] of what ``patch(model, quantize=...)`` quantizes: every ``nn.Linear`` of
    each decoder layer's attention and MLP (q/k/v/o or query_key_value/dense; gate/up/down or
    dense_h_to_4h/dense_4h_to_h), and ``lm_head`` when ``spec.lm_head`` is set and it is not tied to the
    embedding. Every one is checked (:func:`check_quantizable`) before anything changes."""
    names = {id(m): n for n, m in model.named_modules()}
    plan = []
    for layer in model.base_model.layers:
        for part in (layer.self_attn, layer.mlp):
            plan += [(names[id(m)], m, spec.projections) for m in part.modules() if isinstance(m, nn.Linear)]
    head = getattr(model, "lm_head", None)
    if spec.lm_head is not None and isinstance(head, nn.Linear):
        embed = model.get_input_embeddings().weight
        if head.weight is not embed and head.weight.data_ptr() != embed.data_ptr():  # tied: it is the embedding
            plan.append((names[id(head)], head, spec.lm_head))
    for name, linear, fmt in plan:
        check_quantizable(name, linear, fmt, quantize)
    return plan


def apply_quantization(plan, backend: str) -> tuple[str, ...]:
    """Quantize every projection of ``plan`` (from :func:`quantization_plan`), one at a time (the peak is one
    matrix's fp32 copy). -> their names. Then (once the fused modules are built: fusing frees the per-linear
    buffers) :func:`release_freed_memory`."""
    for _, linear, fmt in plan:
        quantize_linear(linear, fmt, backend)
    return tuple(name for name, _, _ in plan)


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) of this process's file-backed memory mappings (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode and a path: a file
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def release_freed_memory(model: nn.Module) -> None:
    """Make the freed 16-bit weights leave the resident set.

    * transformers loads a safetensors checkpoint whose dtype needs no conversion as views of one private
      mmap of the file, unmapped only when every tensor viewing it is gone. Quantizing reads (so maps in) every
      page, and the tensors kept 16-bit (embedding, norms, biases) would keep the whole file resident: they are
      copied out of file mappings here, so the mapping goes with the last quantized weight.
    * glibc keeps freed blocks below its mmap threshold (up to 32 MiB: a 16-bit projection of a 1-2B model)
      in its heap, where they still count in the resident set; ``malloc_trim`` returns them to the system (a
      no-op where there is no glibc)."""
    import bisect
    import ctypes
    import ctypes.util
    import gc

    mappings = _file_mappings()
    starts = [start for start, _ in mappings]
    for t in (*model.parameters(), *model.buffers()):
        i = bisect.bisect_right(starts, t.data_ptr()) - 1
        if t.device.type == "cpu" and i >= 0 and t.data_ptr() < mappings[i][1]:
            t.data = t.data.clone()
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
