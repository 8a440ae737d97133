"""Tiny random-weight models of each family and config variant, shared by every model-level test.

Norm weights and biases are perturbed away from their 1/0 init (or the norms would go untested),
and every config option the README's family table lists is covered by a variant here. Build with :func:`build_model`.
"""
from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, ArceeConfig, HeliumConfig, PersimmonConfig, StableLmConfig)

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

VARIANTS = {
    # StableLM-3B's head layout: head_dim 80, rotary_dim 20, per-head qk-norm, parallel residual, qkv bias.
    "stablelm_hd80_qknorm_parallel": lambda: StableLmConfig(
        **_COMMON, hidden_size=320, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
        partial_rotary_factor=0.25, qk_layernorm=True, use_parallel_residual=True, use_qkv_bias=True),
    "stablelm_default": lambda: StableLmConfig(
        **_COMMON, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4),
    "persimmon_qknorm": lambda: PersimmonConfig(
        **_COMMON, hidden_size=64, intermediate_size=128, num_attention_heads=4, qk_layernorm=True),
    "persimmon_no_qknorm": lambda: PersimmonConfig(
        **_COMMON, hidden_size=64, intermediate_size=128, num_attention_heads=4, qk_layernorm=False),
    "helium_gqa": lambda: HeliumConfig(
        **_COMMON, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16),
    "arcee_gqa_bias_yarn": lambda: ArceeConfig(
        **_COMMON, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
}

# One variant per family, for tests that need breadth across families but not every variant.
ONE_PER_FAMILY = ["arcee_gqa_bias_yarn", "stablelm_hd80_qknorm_parallel", "persimmon_qknorm", "helium_gqa"]


def make_config(variant: str, **overrides):
    config = VARIANTS[variant]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_model(variant_or_config, dtype=torch.float32, seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny model in eval mode with perturbed norm weights/biases (deterministic in ``seed``)."""
    config = make_config(variant_or_config) if isinstance(variant_or_config, str) else variant_or_config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norm weights (1-init) and biases (0-init)
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
            elif name.endswith(".bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.to(dtype).eval()


def random_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def left_padded_batch(lengths, seed: int = 0):
    """input_ids and attention_mask for a left-padded batch with the given prompt lengths."""
    T = max(lengths)
    ids = random_ids(len(lengths), T, seed)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, : T - n] = 0
        mask[b, T - n:] = 1
    return ids, mask
