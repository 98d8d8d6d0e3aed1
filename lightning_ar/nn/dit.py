"""A DiT-style denoiser over all tokens at once: the conditional diffusion model (CDM) baseline of the paper's table.

A CDM conditions the whole denoising trajectory on one *static* condition (the class), where an AR model with a
diffusion loss produces a condition per token from the tokens generated so far (SPEC 2.2). Here the class embedding
is that condition: every token of an image receives the same vector ``z``, summed with the timestep embedding into
the AdaLN-Zero modulation of each transformer block (Peebles & Xie, DiT). The transformer's per-token output then
conditions an AdaLN MLP output head built like MAR's, which predicts the noise and the learned-range variance.

:class:`SequenceDiffusion` wraps this into a :class:`~lightning_ar.nn.diffusion_loss.DiffusionLoss`, so the CDM
shares the diffusers cosine schedule, the samplers (DDPM/DDIM/DPM-Solver++), classifier-free guidance and the
score-norm instrument: its ``net(x, t, z)`` takes flattened, sample-major rows ``[B*L, .]`` like the per-token head.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.models.vision_transformer import Attention, Mlp
from torch import Tensor, nn

from lightning_ar.nn.diffusion_head import AdaLNResBlock, FinalLayer, TimestepEmbedder
from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.init import xavier_linears_


class ClassEmbedding(nn.Module):
    """Class embeddings with a learned null class for classifier-free guidance.

    Args:
        num_classes: Number of class labels.
        width: Embedding dimension.
        label_drop_prob: Probability of replacing a label by the null class in training.
    """

    def __init__(self, num_classes: int, width: int, label_drop_prob: float = 0.1) -> None:
        super().__init__()
        self.num_classes, self.label_drop_prob = num_classes, label_drop_prob
        self.class_emb = nn.Embedding(num_classes, width)
        self.null_class_emb = nn.Parameter(torch.zeros(1, width))
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.null_class_emb, std=0.02)

    def forward(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """``[B]`` labels (``-1`` = null) and optional ``[B]`` bool drop -> ``[B, width]`` embeddings."""
        null = labels < 0 if drop is None else (labels < 0) | drop
        emb = self.class_emb(labels.clamp(min=0))  # (B, W)
        return torch.where(null[:, None], self.null_class_emb.to(emb.dtype), emb)

    def label_drop(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """Bool ``[B]`` of labels to replace by the null class (``None`` in eval mode or with probability 0)."""
        if not self.training or self.label_drop_prob <= 0:
            return None
        return torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.label_drop_prob


class DiTBlock(nn.Module):
    """Transformer block with AdaLN-Zero: ``(shift, scale, gate)`` for attention and MLP from a per-token condition."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads, qkv_bias=True, attn_drop=dropout, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"), drop=dropout)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x``, ``c``: ``[B, L, W]`` -> ``[B, L, W]``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)  # 6 x (B, L, W)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TokenOutputHead(nn.Module):
    """MAR's AdaLN MLP head as the DiT's output layer: per token, noisy token + conditioning vector -> noise (+ var).

    Its conditioning vector is ``proj(h + c)``, the transformer output ``h`` plus the DiT's own conditioning vector
    ``c`` (timestep + class), so the timestep is embedded once, by the DiT.
    """

    def __init__(self, token_dim: int, width: int, head_width: int, head_depth: int, learn_sigma: bool) -> None:
        super().__init__()
        self.cond_proj = nn.Linear(width, head_width)
        self.input_proj = nn.Linear(token_dim, head_width)
        self.blocks = nn.ModuleList(AdaLNResBlock(head_width) for _ in range(head_depth))
        self.final = FinalLayer(head_width, token_dim * (2 if learn_sigma else 1))
        xavier_linears_(self)
        for layer in [b.modulation[-1] for b in self.blocks] + [self.final.modulation[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, hc: Tensor) -> Tensor:
        """``x`` ``[N, token_dim]``, ``hc`` ``[N, width]`` -> ``[N, out]``."""
        c = self.cond_proj(hc)  # (N, Wh)
        h = self.input_proj(x)  # (N, Wh)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)


class DiTDenoiser(nn.Module):
    """DiT transformer over all tokens followed by MAR's per-token AdaLN MLP head.

    Offers the per-token denoiser's interface (``time_embed``, ``cond_embed``, ``forward_embedded``, ``forward``) on
    flattened, sample-major rows ``[B*seq_len, .]``.

    Args:
        token_dim: Dimension of one token.
        seq_len: Tokens per image.
        width: Transformer width (= dimension of the condition ``z``).
        depth: Number of DiT blocks.
        num_heads: Attention heads.
        mlp_ratio: Block MLP ratio.
        dropout: Attention/projection dropout.
        head_width: Width of the output AdaLN MLP.
        head_depth: Residual blocks of the output AdaLN MLP.
        learn_sigma: Predict the learned-range variance too (``2 * token_dim`` outputs).
    """

    def __init__(self, token_dim: int, seq_len: int, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, head_width: int = 256, head_depth: int = 3, learn_sigma: bool = True) -> None:
        super().__init__()
        self.token_dim, self.seq_len = token_dim, seq_len
        self.input_proj = nn.Linear(token_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Identity()  # the condition is the class embedding itself (DiT's y embedding)
        self.blocks = nn.ModuleList(DiTBlock(width, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = TokenOutputHead(token_dim, width, head_width, head_depth, learn_sigma)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)

    def _seq(self, a: Tensor) -> Tensor:
        if a.shape[0] % self.seq_len:
            raise ValueError(f"rows ({a.shape[0]}) must be a multiple of the sequence length {self.seq_len}")
        return rearrange(a, "(b l) w -> b l w", l=self.seq_len)

    def forward_embedded(self, x: Tensor, c: Tensor) -> Tensor:
        """Denoiser output from the conditioning vectors ``c = time_embed(t) + cond_embed(z)``.

        Args:
            x: ``[N, token_dim]`` noisy tokens, ``N = B * seq_len`` (sample-major).
            c: ``[N, width]`` conditioning vectors (or ``[1, width]``, broadcast).

        Returns:
            ``[N, 2*token_dim]`` (noise, variance interpolation) or ``[N, token_dim]``.
        """
        c = c.expand(x.shape[0], -1)  # (N, W)
        h = self.input_proj(self._seq(x)) + self.pos_embed  # (B, L, W)
        cs = self._seq(c).to(h.dtype)  # (B, L, W)
        for block in self.blocks:
            h = block(h, cs)  # (B, L, W)
        h = rearrange(self.norm(h), "b l w -> (b l) w")  # (N, W)
        return self.head(x, h + c)  # (N, 2Dt)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """``x`` ``[N, token_dim]``, ``t`` ``[N]`` (equal within an image), ``z`` ``[N, width]`` -> ``[N, out]``."""
        return self.forward_embedded(x, self.time_embed(t) + self.cond_embed(z))


class SequenceDiffusion(DiffusionLoss):
    """:class:`DiffusionLoss` whose denoiser is a :class:`DiTDenoiser` over whole token sequences.

    Same schedule, samplers and guidance as the per-token loss; rows of ``sample``'s ``z`` and of ``net``'s inputs
    are sample-major ``[B * seq_len, .]``. Training uses :meth:`sequence_loss` (one timestep per image).

    Args:
        token_dim: Dimension of one token.
        seq_len: Tokens per image.
        width: Transformer width (= condition dimension).
        depth: DiT blocks.
        num_heads: Attention heads.
        mlp_ratio: Block MLP ratio.
        dropout: Attention/projection dropout.
        head_width: Width of the output AdaLN MLP.
        head_depth: Residual blocks of the output AdaLN MLP.
        num_train_timesteps: Diffusion training steps.
        timestep_spacing: Spacing of the sampling timesteps (see :class:`DiffusionLoss`).
    """

    def __init__(self, token_dim: int, seq_len: int, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, head_width: int = 256, head_depth: int = 3,
                 num_train_timesteps: int = 1000, timestep_spacing: str = "leading") -> None:
        super().__init__(token_dim, width, head_width, head_depth, num_train_timesteps,
                         timestep_spacing=timestep_spacing)
        self.seq_len = seq_len
        self.net = DiTDenoiser(token_dim, seq_len, width, depth, num_heads, mlp_ratio, dropout, head_width,
                               head_depth, self.learn_sigma)

    def sequence_loss(self, tokens: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-image loss: noise MSE plus the variance's VB term, one timestep and noise draw per image.

        Args:
            tokens: ``[B, L, token_dim]`` clean tokens.
            z: ``[B, L, width]`` conditions.
            generator: RNG for timesteps and noise.

        Returns:
            ``[B]`` loss per image (mean over its tokens).
        """
        t, noise = self.draw_sequence_noise(tokens.shape, tokens.device, tokens.dtype, generator)
        return self.sequence_loss_given_noise(tokens, z, t, noise)

    def draw_sequence_noise(self, shape: torch.Size | tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The randomness of :meth:`sequence_loss` for tokens of ``shape`` ``(B, L, token_dim)``: one timestep per
        image ``[B]`` and noise ``[B*L, token_dim]``, drawn in this order."""
        b, seq_len, dim = shape
        t = torch.randint(0, self.num_train_timesteps, (b,), device=device, generator=generator)
        noise = torch.randn((b * seq_len, dim), device=device, dtype=dtype, generator=generator)
        return t, noise

    def sequence_loss_given_noise(self, tokens: Tensor, z: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-image loss ``[B]`` of ``tokens`` ``[B, L, token_dim]`` under ``z`` ``[B, L, width]`` at timesteps ``t``
        ``[B]`` and ``noise`` ``[B*L, token_dim]`` (:meth:`sequence_loss` without its draws)."""
        b, seq_len, dim = tokens.shape
        t = t.repeat_interleave(seq_len)  # (B*L,)
        x0 = tokens.reshape(b * seq_len, dim)  # (B*L, Dt)
        ab = self.alphas_cumprod[t][:, None]  # (B*L, 1)
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise
        out = self.net(x_t, t, z.reshape(b * seq_len, -1)).float()  # (B*L, 2Dt)
        loss = ((out[:, :dim] - noise) ** 2).mean(dim=-1)  # (B*L,)
        if self.learn_sigma:
            loss = loss + self._vb_bits(out, x0, x_t, t)
        return loss.view(b, seq_len).mean(dim=1)
