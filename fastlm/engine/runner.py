"""The engine's own layer loop over a patched model: prefill into the static cache, and the decode step.

Per layer, the fused modules' own layer body (fastlm.modules.decoder.layer_body, which HF's forward
runs too) with the engine's attention block:

    q = ops.qkv_rope_cache(attn.project_qkv(h), cos, sin, k_cache, v_cache, positions)  # k/v -> cache
    a = out_proj(attention(q, cache))                   # prefill_attention | decode_attention

The decode step (``decode_step``) has static shapes and keeps all of its state in device tensors that
it updates in place (``DecodeState``), so one call is one replay of a CUDA graph and compiles with
``torch.compile(fullgraph=True)``: no Python ints that change between steps, no host syncs.

At the start of each call the engine binds the eager step (:meth:`ModelRunner.bind`): every layer's norms,
projections, epilogue and cache views become closures over the tensors and kernels looked up once, so a step
is the kernels' calls and little else (on CPU, the per-step ``nn.Module`` lookups, dispatch and fused-weight
checks cost about as much as a small model's attention). A compiled step runs the modules' own path instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlm import ops
from fastlm.ops._registry import dispatch, dispatch_eager
from fastlm.engine.cache import StaticKVCache
from fastlm.engine.rope import RopeTables
from fastlm.engine.sampling import SamplingConfig, sample
from fastlm.modules._linear import bind_linear, project_linear
from fastlm.modules.decoder import layer_body
from fastlm.patching import patch_record

# Finish reasons, as stored in DecodeState.reason.
RUNNING, EOS, CACHE_FULL = 0, 1, 2
MAX_STOP_IDS = 8  # EOS ids live in a fixed-size device buffer (padded with NO_TOKEN), so no graph bakes them
NO_TOKEN = -1     # emitted for sequences that are already finished


@dataclass
class DecodeState:
    """Static per-row decode state (rows = batch capacity; a call uses the leading rows)."""

    tokens: torch.Tensor     # [B] int64: the last token, fed at the next step
    positions: torch.Tensor  # [B] int64: its position = the number of tokens already in the cache
    done: torch.Tensor       # [B] bool
    reason: torch.Tensor     # [B] int64: RUNNING / EOS / CACHE_FULL
    out: torch.Tensor        # [B] int64: the token the last step emitted (NO_TOKEN when finished)
    counter: torch.Tensor    # [1] int64: sampling counter (step number)
    seed: torch.Tensor       # [1] int64
    limit: torch.Tensor      # [1] int64: this call's capacity in tokens (<= cache max_len)
    stop_ids: torch.Tensor   # [MAX_STOP_IDS] int64
    temperature: torch.Tensor  # [1] fp32: this call's sampling temperature (no graph bakes it in)
    top_p: torch.Tensor        # [1] fp32

    @classmethod
    def allocate(cls, batch: int, device) -> "DecodeState":
        z = lambda n, dt=torch.int64: torch.zeros(n, dtype=dt, device=device)  # noqa: E731
        return cls(tokens=z(batch), positions=z(batch), done=z(batch, torch.bool), reason=z(batch),
                   out=z(batch), counter=z(1), seed=z(1), limit=z(1),
                   stop_ids=torch.full((MAX_STOP_IDS,), NO_TOKEN, dtype=torch.int64, device=device),
                   temperature=torch.ones(1, device=device), top_p=torch.ones(1, device=device))


class _LayerView:
    """What layer_body reads of a fused decoder layer, as plain attributes, with the MLP's ``forward``
    bound: the engine runs no module hooks (it calls the layers' pieces directly), and ``nn.Module``'s
    ``__call__`` and attribute lookup cost microseconds per layer per token at decode."""

    __slots__ = ("input_layernorm", "post_attention_layernorm", "mlp", "fused_parallel_residual")

    def __init__(self, layer):
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp.forward
        self.fused_parallel_residual = layer.fused_parallel_residual


class _BoundNorm:
    __slots__ = ("add_forward",)

    def __init__(self, add_forward):
        self.add_forward = add_forward


class _BoundLayer:
    """One layer's decode step bound for one call (:meth:`ModelRunner.bind`): what layer_body reads, as
    closures over the weights and kernels looked up once, and the attention block's pieces: the QKV
    projection, its epilogue into this call's cache rows, the rows themselves and the output projection."""

    __slots__ = ("input_layernorm", "post_attention_layernorm", "mlp", "fused_parallel_residual", "project_qkv",
                 "epilogue", "k_cache", "v_cache", "scale", "project_out")


def _bind_epilogue(kernel, norms: tuple, k_cache, v_cache, static: tuple):
    """qkv_rope_cache's call with everything but the step's tensors bound: (qkv, cos, sin, positions) -> q."""
    qw, qb, kw, kb = norms
    heads, kv_heads, head_dim, rotary_dim, interleaved, head_major, eps = static
    return lambda qkv, cos, sin, positions: kernel(qkv, cos, sin, qw, qb, kw, kb, k_cache, v_cache, positions, heads,
                                                   kv_heads, head_dim, rotary_dim, interleaved, head_major, eps)


class ModelRunner:
    """Holds a patched model's pieces, its static KV cache, RoPE tables and decode state."""

    def __init__(self, model, batch: int, max_len: int):
        base = model.base_model
        record = patch_record(model)
        if record is None:
            raise ValueError("ModelRunner needs a model patched with fastlm.patch()")
        self.model, self.base = model, base
        self.layers = list(base.layers)
        self.embed = base.embed_tokens
        self.final_norm = getattr(base, record.final_norm)
        self.lm_head = model.lm_head
        spec = self.layers[0].self_attn.fused_spec()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.backend = record.backend
        weight = self.embed.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.batch, self.max_len = batch, max_len
        # Per-layer pieces looked up here are modules and static ints only: prefill and the module path read the
        # weights from the modules at each use, and bind() (each call's eager step) looks them up per call.
        self._decode_attention = dispatch("decode_attention", self.backend, self.device)
        self.attn = [layer.self_attn for layer in self.layers]
        self.bodies = [_LayerView(layer) for layer in self.layers]
        self.out_proj = [attn.output_projection() for attn in self.attn]
        self.scaling = [float(layer.self_attn.scaling) for layer in self.layers]
        self.cache = StaticKVCache(len(self.layers), batch, self.num_kv_heads, max_len, self.head_dim,
                                   self.dtype, self.device)
        self.rope = RopeTables(base.rotary_emb, max_len, self.dtype, self.device)
        self.state = DecodeState.allocate(batch, self.device)
        self._bound: tuple | None = None  # (rows, layers, decode_attention, logits) of the call bind() set up

    def bind(self, rows: int, eager: bool) -> None:
        """Set up the decode step of a call on rows [0, rows): each layer's weights, kernels and cache views looked
        up once, not at every step (a few hundred microseconds a token on CPU: ``nn.Module`` attribute lookups,
        dispatch and the fused-weight checks). The caller refreshes the fused weights first and binds again at
        each call, so a weight changed between calls is seen (fastlm.modules._fused_storage). ``eager``: the step
        is never traced by torch.compile (a compiled step runs :meth:`unbind`'s module path, which dynamo guards)."""
        device, backend = self.device, self.backend
        pick = dispatch_eager if eager else dispatch
        layers = []
        for i, layer in enumerate(self.layers):
            attn, bound = self.attn[i], _BoundLayer()
            bound.input_layernorm = _BoundNorm(layer.input_layernorm.bound_add_forward(device, self.dtype))
            post = layer.post_attention_layernorm  # None with a parallel residual (StableLM)
            bound.post_attention_layernorm = post and _BoundNorm(post.bound_add_forward(device, self.dtype))
            bound.mlp = layer.mlp.bound_forward(device, eager)
            bound.fused_parallel_residual = layer.fused_parallel_residual
            bound.project_qkv = attn.bound_project_qkv(device, eager)
            bound.k_cache, bound.v_cache = self.cache.layer(i, rows)
            epilogue_backend, norms, static = attn.epilogue()
            bound.epilogue = _bind_epilogue(pick("qkv_rope_cache", epilogue_backend, device), norms, bound.k_cache,
                                            bound.v_cache, static)
            bound.scale = self.scaling[i]
            bound.project_out = bind_linear(self.out_proj[i], backend, device, eager)
            layers.append(bound)
        final_norm = self.final_norm.bound_add_forward(device, self.dtype)
        lm_head = bind_linear(self.lm_head, backend, device, eager)
        self._bound = (rows, layers, pick("decode_attention", backend, device),
                       lambda x: lm_head(final_norm(x, None)[0]))

    def unbind(self) -> None:
        """Back to the module path: every step reads the weights from the modules (a compiled step)."""
        self._bound = None

    def _epilogue(self, i, qkv, cos, sin, k_cache, v_cache, cache_pos):
        """Layer i's QKV epilogue into the cache: the backend's implementation called directly (dispatch),
        without the public op's checks. -> q [B, H, S, D]."""
        backend, norms, static = self.attn[i].epilogue()
        return dispatch("qkv_rope_cache", backend, self.device)(qkv, cos, sin, *norms, k_cache, v_cache,
                                                                cache_pos, *static)

    # ---- the layer body (fastlm.modules.decoder.layer_body, shared with HF's forward) --------------
    def _layer(self, i: int, x: torch.Tensor, attend) -> torch.Tensor:
        attn, out_proj, backend = self.attn[i], self.out_proj[i], self.backend
        return layer_body(self.bodies[i], x,
                          lambda h: project_linear(attend(i, attn.project_qkv(h)), out_proj, backend))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, hidden] (last positions only) -> logits [B, V]."""
        return project_linear(self.final_norm.add_forward(x, None)[0], self.lm_head, self.backend)

    # ---- prefill -------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Right-padded prompts [B, S] with ``lengths`` [B] -> logits of each last real token [B, V].

        Writes cache slots [start, start + S) of rows [0, B); ``lengths`` count from slot 0. A plain
        causal mask is exact for right padding: a real query i only sees keys <= i, which are all real;
        pad rows' outputs are never used. ``start`` > 0 continues a cached prefix (a session's earlier
        turns): query i then sees keys [0, start + i], a causal mask aligned to the bottom right."""
        B, S = input_ids.shape
        T = start + S
        cos, sin = self.rope.prefill(S, start)
        cache_pos = torch.arange(start, T, device=self.device).unsqueeze(0).expand(B, S)
        mask = None
        if start:
            keys = torch.arange(T, device=self.device)
            mask = (keys.unsqueeze(0) <= (keys[start:] if S else keys[:0]).unsqueeze(1)).view(1, 1, S, T)

        def attend(i, qkv):
            k_cache, v_cache = self.cache.layer(i, B)
            q = self._epilogue(i, qkv, cos, sin, k_cache, v_cache, cache_pos)
            out = ops.prefill_attention(q, k_cache[:, :, :T], v_cache[:, :, :T], mask, is_causal=mask is None,
                                        scale=self.scaling[i], backend=self.backend)
            return out.transpose(1, 2).reshape(B, S, -1)

        x = self.embed(input_ids)
        for i in range(len(self.layers)):
            x = self._layer(i, x, attend)
        last = x[torch.arange(B, device=self.device), lengths - 1 - start]  # [B, hidden]
        return self._logits(last)

    # ---- decode step ---------------------------------------------------------------------
    def decode_step(self, batch: int, config: SamplingConfig) -> None:
        """One token for rows [0, batch): reads and updates ``self.state`` in place. Static shapes,
        no host sync: the body of a CUDA graph and of ``torch.compile(fullgraph=True)``."""
        st = self.state
        tokens, positions, done = st.tokens[:batch], st.positions[:batch], st.done[:batch]
        reason, out = st.reason[:batch], st.out[:batch]
        # Capacity: a running sequence whose next slot is past this call's limit stops here. (In-place
        # masked fills and logical ops: each op is microseconds at decode, more than its work.)
        full = positions.ge(st.limit).logical_and_(done.logical_not())
        reason.masked_fill_(full, CACHE_FULL)
        done.logical_or_(full)
        # Memory safety whatever the host does: never index past the allocation.
        pos = positions.clamp(max=self.max_len - 1)
        lengths = pos + 1
        cos, sin = self.rope.decode(pos)
        cache_pos = pos.unsqueeze(1)

        x = self.embed(tokens.unsqueeze(1))
        bound = self._bound
        if bound is not None and bound[0] == batch:  # this call's pieces (bind)
            _, layers, decode_attention, logits_of = bound
            for layer in layers:
                def block(h, p=layer):  # the attention block, output projection included
                    q = p.epilogue(p.project_qkv(h), cos, sin, cache_pos)  # k/v -> the cache
                    o = decode_attention(q.squeeze(2), p.k_cache, p.v_cache, lengths, p.scale)
                    return p.project_out(o.reshape(batch, 1, -1))
                x = layer_body(layer, x, block)
            logits = logits_of(x[:, 0])
        else:
            def attend(i, qkv):
                k_cache, v_cache = self.cache.layer(i, batch)
                q = self._epilogue(i, qkv, cos, sin, k_cache, v_cache, cache_pos)
                o = self._decode_attention(q.squeeze(2), k_cache, v_cache, lengths, self.scaling[i])
                return o.reshape(batch, 1, -1)

            for i in range(len(self.layers)):
                x = self._layer(i, x, attend)
            logits = self._logits(x[:, 0])
        nxt = sample(logits, config, st.seed, st.counter, st.temperature, st.top_p, backend=self.backend)  # [B]
        active = done.logical_not()
        is_stop = torch.isin(nxt, st.stop_ids).logical_and_(active)  # stop_ids' NO_TOKEN padding never matches
        out.copy_(nxt).masked_fill_(done, NO_TOKEN)
        tokens.copy_(torch.where(active, nxt, tokens))
        reason.masked_fill_(is_stop, EOS)
        done.logical_or_(is_stop)
        positions.add_(active)
        st.counter.add_(1)
