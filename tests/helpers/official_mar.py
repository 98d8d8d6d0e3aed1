"""Official MAR (LTH14/mar) state-dict layouts written from its module structure, and random weights in them."""

from __future__ import annotations

import torch

TINY_LAYOUT = dict(width=32, depth=2, head_width=24, head_depth=2, token_dim=64, seq_len=64, buffer=4, classes=10)


def _block_shapes(prefix: str, w: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.norm1.weight": (w,), f"{prefix}.norm1.bias": (w,),
        f"{prefix}.attn.qkv.weight": (3 * w, w), f"{prefix}.attn.qkv.bias": (3 * w,),
        f"{prefix}.attn.proj.weight": (w, w), f"{prefix}.attn.proj.bias": (w,),
        f"{prefix}.norm2.weight": (w,), f"{prefix}.norm2.bias": (w,),
        f"{prefix}.mlp.fc1.weight": (4 * w, w), f"{prefix}.mlp.fc1.bias": (4 * w,),
        f"{prefix}.mlp.fc2.weight": (w, 4 * w), f"{prefix}.mlp.fc2.bias": (w,),
    }


def _head_shapes(h: int, depth: int, w: int, token_dim: int) -> dict[str, tuple[int, ...]]:
    p = "diffloss.net."
    shapes = {
        p + "time_embed.mlp.0.weight": (h, 256), p + "time_embed.mlp.0.bias": (h,),
        p + "time_embed.mlp.2.weight": (h, h), p + "time_embed.mlp.2.bias": (h,),
        p + "cond_embed.weight": (h, w), p + "cond_embed.bias": (h,),
        p + "input_proj.weight": (h, token_dim), p + "input_proj.bias": (h,),
        p + "final_layer.linear.weight": (2 * token_dim, h), p + "final_layer.linear.bias": (2 * token_dim,),
        p + "final_layer.adaLN_modulation.1.weight": (2 * h, h), p + "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    for i in range(depth):
        b = f"{p}res_blocks.{i}."
        shapes.update({
            b + "in_ln.weight": (h,), b + "in_ln.bias": (h,), b + "mlp.0.weight": (h, h), b + "mlp.0.bias": (h,),
            b + "mlp.2.weight": (h, h), b + "mlp.2.bias": (h,),
            b + "adaLN_modulation.1.weight": (3 * h, h), b + "adaLN_modulation.1.bias": (3 * h,),
        })
    return shapes


def official_layout(width: int, depth: int, head_width: int, head_depth: int, token_dim: int, seq_len: int,
                    buffer: int, classes: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of MAR's state dict, written from its module structure."""
    w = width
    shapes = {
        "fake_latent": (1, w), "encoder_pos_embed_learned": (1, seq_len + buffer, w), "mask_token": (1, 1, w),
        "decoder_pos_embed_learned": (1, seq_len + buffer, w), "diffusion_pos_embed_learned": (1, seq_len, w),
        "class_emb.weight": (classes, w), "z_proj.weight": (w, token_dim), "z_proj.bias": (w,),
        "z_proj_ln.weight": (w,), "z_proj_ln.bias": (w,), "encoder_norm.weight": (w,), "encoder_norm.bias": (w,),
        "decoder_embed.weight": (w, w), "decoder_embed.bias": (w,), "decoder_norm.weight": (w,),
        "decoder_norm.bias": (w,),
    }
    for i in range(depth):
        shapes.update(_block_shapes(f"encoder_blocks.{i}", w))
        shapes.update(_block_shapes(f"decoder_blocks.{i}", w))
    shapes.update(_head_shapes(head_width, head_depth, w, token_dim))
    return shapes


def random_official(seed: int = 0, **layout: int) -> dict[str, torch.Tensor]:
    """A random official-layout state dict (norm weights around 1, everything else small and nonzero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in official_layout(**{**TINY_LAYOUT, **layout}).items():
        base = 1.0 if ("norm" in name or "_ln" in name) and name.endswith("weight") else 0.0
        out[name] = base + 0.2 * torch.randn(shape, generator=g)
    return out
