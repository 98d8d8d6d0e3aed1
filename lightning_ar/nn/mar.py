"""The MAE-style masked autoregressive transformer of MAR (Li et al., 2024) that turns visible tokens into conditions.

The encoder sees ``buffer_size`` leading positions filled with the class embedding plus the *visible* tokens only; the
decoder sees every position, with a learned mask token at the masked ones. Three learned position embeddings are
used (encoder, decoder, and ``diffusion_pos_embed`` added to the decoder output). The output, one vector ``z`` per
token, is the *condition* of the per-token diffusion head.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lightning_ar.nn.init import normal_embeddings_, xavier_linears_
from lightning_ar.nn.masking import random_orders
from lightning_ar.nn.transformer_spec import TransformerSpec


def patchify(latents: Tensor, patch_size: int) -> Tensor:
    """Split latents into a raster sequence of flattened patches.

    Args:
        latents: ``[B, C, H, W]`` with ``H`` and ``W`` divisible by ``patch_size``.

    Returns:
        ``[B, (H/p)*(W/p), p*p*C]`` tokens.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    if latents.shape[-1] % patch_size or latents.shape[-2] % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the latent height and width {tuple(latents.shape[-2:])}")
    return rearrange(latents, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(tokens: Tensor, patch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, L, p*p*C]`` tokens to ``[B, C, H, W]`` latents."""
    h, w = height // patch_size, width // patch_size
    if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] != patch_size * patch_size * channels:
        raise ValueError(
            f"tokens must be [B, {h * w}, {patch_size * patch_size * channels}] for latents "
            f"({channels}, {height}, {width}) and patch_size={patch_size}, got shape {tuple(tokens.shape)}"
        )
    return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=patch_size, q=patch_size)


def masked_positions(mask: Tensor, count: int) -> Tensor:
    """``[B, count]`` positions where ``mask`` ``[B, L]`` is ``True``, ascending (every row has ``count`` of them).

    What boolean indexing ``x[mask]`` selects, as indices of a static shape: ``x.gather(1, ...)`` then reads the same
    values in the same order without a device sync or a data-dependent shape (a compiled graph sees fixed sizes).
    """
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # True positions first, in order
    return order[:, :count]


def _rows(index: Tensor, width: int) -> Tensor:
    """``[B, n]`` row indices expanded to ``[B, n, width]`` for ``gather``/``scatter`` along dimension 1."""
    return index[..., None].expand(-1, -1, width)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ``[B, n]`` of each sample of ``x`` ``[B, L, D]``: ``[B, n, D]``."""
    return x.gather(1, _rows(index, x.shape[-1]))


def _blocks(width: int, depth: int, num_heads: int, mlp_ratio: float, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        Block(width, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout) for _ in range(depth)
    )


class MaskedAutoregressiveTransformer(nn.Module):
    """MAE-style encoder/decoder producing one condition vector per token.

    Args:
        token_dim: Dimension of one token (``patch_size**2 * latent channels``).
        seq_len: Number of tokens per image.
        num_classes: Number of class labels; index ``num_classes`` is never used (the null class is a separate vector).
        spec: Width, depths, ``buffer_size`` and regularisation (:class:`TransformerSpec`; its defaults when ``None``).
    """

    def __init__(self, token_dim: int, seq_len: int, num_classes: int, spec: TransformerSpec | None = None) -> None:
        super().__init__()
        spec = spec or TransformerSpec()
        width, buffer_size, heads = spec.width, spec.buffer_size, spec.num_heads
        ratio, dropout = spec.mlp_ratio, spec.dropout
        self.seq_len, self.buffer_size, self.num_classes = seq_len, buffer_size, num_classes
        self.label_drop_prob = spec.label_drop_prob
        self.class_emb = nn.Embedding(num_classes, width)
        self.null_class_emb = nn.Parameter(torch.zeros(1, width))
        self.z_proj = nn.Linear(token_dim, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=1e-6)
        self.encoder_pos_embed = nn.Parameter(torch.zeros(1, buffer_size + seq_len, width))
        self.encoder_blocks = _blocks(width, spec.encoder_depth, heads, ratio, dropout)
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, buffer_size + seq_len, width))
        self.decoder_blocks = _blocks(width, spec.decoder_depth, heads, ratio, dropout)
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
        self.width = width  # dimension of the produced conditions
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's initialisation: normal(0.02) for embeddings and tokens, Xavier for linears, unit LayerNorms."""
        normal_embeddings_(self.class_emb.weight, self.null_class_emb, self.mask_token, self.encoder_pos_embed,
                           self.decoder_pos_embed, self.diffusion_pos_embed)
        xavier_linears_(self)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def class_embedding(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """Class embeddings ``[B, width]``; rows where ``drop`` is ``True`` (or ``labels == -1``) get the null one."""
        null = labels < 0
        if drop is not None:
            null = null | drop
        emb = self.class_emb(labels.clamp(min=0))
        return torch.where(null[:, None], self.null_class_emb.to(emb.dtype), emb)

    def label_drop(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """Bool ``[B]`` of labels to replace by the null class in training (``None`` in eval or with prob 0)."""
        if not self.training or self.label_drop_prob <= 0:
            return None
        return torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.label_drop_prob

    def encode(self, tokens: Tensor, mask: Tensor, class_emb: Tensor, num_masked: int) -> Tensor:
        """Encoder over buffer + visible tokens.

        Args:
            tokens: ``[B, L, token_dim]``.
            mask: ``[B, L]`` bool, ``True`` where masked; every row must mask the same number of tokens.
            class_emb: ``[B, width]``.
            num_masked: The masked count of every row.

        Returns:
            ``[B, buffer + visible, width]``.
        """
        b = tokens.shape[0]
        x = self.z_proj(tokens)  # (B, L, W)
        buffer = class_emb[:, None, :].expand(b, self.buffer_size, -1)  # (B, buf, W)
        x = torch.cat([buffer.to(x.dtype), x], dim=1) + self.encoder_pos_embed  # (B, buf+L, W)
        x = self.z_proj_ln(x)
        x = gather_rows(x, self._kept(mask, num_masked))  # (B, buf+visible, W)
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def decode(self, x: Tensor, mask: Tensor, num_masked: int) -> Tensor:
        """Decoder over all positions; returns conditions ``[B, L, width]`` (buffer removed)."""
        b = mask.shape[0]
        x = self.decoder_embed(x)  # (B, buf+visible, W)
        full = self.mask_token.to(x.dtype).expand(b, self.buffer_size + mask.shape[1], -1)  # (B, buf+L, W)
        x = full.scatter(1, _rows(self._kept(mask, num_masked), x.shape[-1]), x)  # visible rows back in place
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.buffer_size :]  # (B, L, W)
        return x + self.diffusion_pos_embed

    def generation_orders(self, batch_size: int, device: torch.device | str = "cpu",
                          generator: torch.Generator | None = None) -> Tensor:
        """``[B, L]`` orders of generation (MAR's convention: leading entries revealed last): a random one per
        sample (:func:`~lightning_ar.nn.masking.random_orders`)."""
        return random_orders(batch_size, self.seq_len, generator, device)

    def forward(self, tokens: Tensor, mask: Tensor, labels: Tensor, drop: Tensor | None = None, *,
                num_masked: int | None = None) -> Tensor:
        """Conditions for every position.

        Args:
            tokens: ``[B, L, token_dim]`` token values (masked positions are ignored).
            mask: ``[B, L]`` bool, ``True`` at masked positions, the same count in every row.
            labels: ``[B]`` class indices in ``[0, num_classes)``; ``-1`` selects the null (unconditional) class.
            drop: optional ``[B]`` bool, rows whose label is replaced by the null class (CFG training).
            num_masked: The masked count of every row when the caller knows it (no check, no device sync: the
                shapes follow from it, so a compiled transformer sees static shapes); ``None``: read from ``mask``.

        Returns:
            ``[B, L, width]`` conditions ``z``.
        """
        if num_masked is None:
            counts = mask.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError("every row of `mask` must mask the same number of tokens")
            num_masked = int(counts[0]) if len(counts) else 0
        return self.decode(self.encode(tokens, mask, self.class_embedding(labels, drop), num_masked), mask, num_masked)

    def _kept(self, mask: Tensor, num_masked: int) -> Tensor:
        """``[B, buf + L - num_masked]`` indices of the buffer and visible positions in ``[0, buf + L)``, ascending."""
        hidden = torch.cat([mask.new_zeros(mask.shape[0], self.buffer_size), mask], dim=1)  # (B, buf+L)
        return masked_positions(~hidden, hidden.shape[1] - num_masked)
