"""A causal AR transformer with a KV cache: the "AR with diffusion loss" baseline of the paper's table.

The MAR reference never released its causal variant. This is its natural reading: MAR's encoder/decoder layout (class
embedding in ``buffer_size`` leading slots, learned position embeddings, ``diffusion_pos_embed`` on the output) with
*causal* attention and a fixed generation order (raster, or one fixed random permutation). The sequence is
``[class x buffer, tok_0, ..., tok_{L-2}]`` (tokens in generation order); the output of slot ``buffer - 1 + i`` is the
condition of token ``i``, which sees the class and tokens ``< i`` only. Training is teacher forcing (one pass over the
real tokens); sampling takes one token per step, appending its keys and values to a :class:`KVCache`.

The module offers MAR's interface where the OT refinement uses it: ``forward(tokens, mask, labels)`` returns
conditions for every position (the mask is not needed: conditions are causal) and ``generation_orders`` the order
of :func:`~lightning_ar.nn.teacher_forcing.teacher_forced_conditions` (MAR's convention: leading entries are revealed
last).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import Mlp
from torch import Tensor, nn

from lightning_ar.nn.context_features import ContextSpec
from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.dit import ClassEmbedding
from lightning_ar.nn.init import normal_embeddings_, xavier_linears_
from lightning_ar.nn.sampler import cfg_at_step, context_spec_of, refine_conditions_of_step
from lightning_ar.nn.sampling_options import SamplingOptions, check_labels
from lightning_ar.nn.sampling_run import SamplingRun
from lightning_ar.nn.transformer_spec import TransformerSpec
from lightning_ar.progress import progress_bar
from lightning_ar.seeding import seeded_generator

ORDERS = ("raster", "random")


@dataclass
class KVCache:
    """Keys and values of every attention layer for the slots processed so far.

    Attributes:
        keys: Per layer, ``[B, heads, S, head_dim]``.
        values: Per layer, ``[B, heads, S, head_dim]``.
    """

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Slots cached so far."""
        return self.keys[0].shape[2] if self.keys else 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask and an optional KV cache."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``x`` ``[B, S, W]``: new slots following the ``cache.length`` cached ones (appended to the cache)."""
        q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.num_heads)
        start = 0
        if cache is not None:
            start = cache.keys[layer].shape[2] if layer < len(cache.keys) else 0
            if start:
                k, v = torch.cat([cache.keys[layer], k], dim=2), torch.cat([cache.values[layer], v], dim=2)
                cache.keys[layer], cache.values[layer] = k, v
            else:
                cache.keys.append(k)
                cache.values.append(v)
        s, total = q.shape[2], k.shape[2]
        query_slots = torch.arange(start, start + s, device=x.device)[:, None]  # (S, 1)
        allowed = torch.arange(total, device=x.device)[None, :] <= query_slots  # (S, total): no future slots
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, H, S, d)
        return self.proj_drop(self.proj(rearrange(out, "b h s d -> b s (h d)")))


class CausalBlock(nn.Module):
    """Pre-norm transformer block (as timm's ``Block``) with :class:`CausalSelfAttention`."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = CausalSelfAttention(width, num_heads, dropout)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), drop=dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``[B, S, W]`` -> ``[B, S, W]``."""
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """Causal encoder/decoder producing one condition per token from the class and the previous tokens.

    Args:
        token_dim: Dimension of one token.
        seq_len: Tokens per image.
        num_classes: Number of class labels (the null class is a separate learned vector).
        spec: Width, depths, ``buffer_size`` and regularisation (:class:`TransformerSpec`; its defaults when ``None``).
        order: ``raster`` or ``random`` (one permutation fixed by ``order_seed``, saved as a buffer).
        order_seed: Seed of the ``random`` order.
    """

    def __init__(self, token_dim: int, seq_len: int, num_classes: int, spec: TransformerSpec | None = None,
                 order: str = "raster", order_seed: int = 0) -> None:
        super().__init__()
        spec = spec or TransformerSpec()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        width, buffer_size, heads = spec.width, spec.buffer_size, spec.num_heads
        ratio, dropout = spec.mlp_ratio, spec.dropout
        self.seq_len, self.buffer_size, self.num_classes = seq_len, buffer_size, num_classes
        self.classes = ClassEmbedding(num_classes, width, spec.label_drop_prob)
        perm = torch.randperm(seq_len, generator=seeded_generator(order_seed))
        self.register_buffer("order", perm if order == "random" else torch.arange(seq_len))
        self.z_proj = nn.Linear(token_dim, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=1e-6)
        self.encoder_pos_embed = nn.Parameter(torch.zeros(1, buffer_size + seq_len - 1, width))
        self.encoder_blocks = nn.ModuleList(CausalBlock(width, heads, ratio, dropout)
                                            for _ in range(spec.encoder_depth))
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = nn.Linear(width, width)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, buffer_size + seq_len - 1, width))
        self.decoder_blocks = nn.ModuleList(CausalBlock(width, heads, ratio, dropout)
                                            for _ in range(spec.decoder_depth))
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
        self.width = width  # dimension of the produced conditions
        self.reset_parameters()

    @property
    def label_drop_prob(self) -> float:
        return self.classes.label_drop_prob

    def reset_parameters(self) -> None:
        """MAR's initialisation: normal(0.02) embeddings, Xavier linears."""
        normal_embeddings_(self.encoder_pos_embed, self.decoder_pos_embed, self.diffusion_pos_embed)
        xavier_linears_(self)

    def class_embedding(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """``[B, width]``; the null class where ``drop`` is ``True`` or ``labels == -1``."""
        return self.classes(labels, drop)

    def label_drop(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """Bool ``[B]`` of labels dropped to the null class in training (``None`` in eval)."""
        return self.classes.label_drop(labels, generator)

    def generation_orders(self, batch_size: int, device: torch.device | str = "cpu",
                          generator: torch.Generator | None = None) -> Tensor:
        """``[B, L]`` the fixed order in MAR's convention (leading entries revealed last): ``order`` reversed
        (``generator`` is not used: the order is fixed)."""
        return self.order.flip(0).to(device)[None].expand(batch_size, -1)

    def slots(self, class_emb: Tensor | None, ordered_tokens: Tensor, start: int) -> Tensor:
        """Embed ``[B, n, Dt]`` tokens (generation order) as slots ``start..``; ``start=0`` also puts the buffer first.

        Returns:
            ``[B, S, W]`` encoder inputs (``S = buffer + n`` when ``start == 0``, else ``n``).
        """
        x = self.z_proj(ordered_tokens)  # (B, n, W)
        if start == 0:
            buffer = class_emb[:, None, :].expand(-1, self.buffer_size, -1).to(x.dtype)  # (B, buf, W)
            x = torch.cat([buffer, x], dim=1)  # (B, buf+n, W)
        return self.z_proj_ln(x + self.encoder_pos_embed[:, start : start + x.shape[1]])

    def run(self, x: Tensor, start: int, cache: KVCache | None = None) -> Tensor:
        """Encoder and decoder over slots ``start..start+S-1`` ``[B, S, W]`` -> decoder outputs ``[B, S, W]``."""
        for i, block in enumerate(self.encoder_blocks):
            x = block(x, cache, i)
        x = self.decoder_embed(self.encoder_norm(x)) + self.decoder_pos_embed[:, start : start + x.shape[1]]
        depth = len(self.encoder_blocks)
        for i, block in enumerate(self.decoder_blocks):
            x = block(x, cache, depth + i)
        return self.decoder_norm(x)

    def conditions_ordered(self, ordered_tokens: Tensor, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """Teacher forcing: conditions ``[B, L, W]`` of all tokens, in generation order, in one causal pass.

        Args:
            ordered_tokens: ``[B, L, Dt]`` tokens in generation order (the last one is not needed as input).
            labels: ``[B]`` labels (``-1`` = null).
            drop: Optional ``[B]`` bool label drop.
        """
        x = self.slots(self.class_embedding(labels, drop), ordered_tokens[:, : self.seq_len - 1], 0)  # (B, buf+L-1, W)
        z = self.run(x, 0)[:, self.buffer_size - 1 :]  # (B, L, W)
        return z + self.diffusion_pos_embed[:, self.order]

    def forward(self, tokens: Tensor, mask: Tensor | None, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """Conditions for every position ``[B, L, W]`` (position order, as MAR's transformer returns them).

        Args:
            tokens: ``[B, L, Dt]`` tokens in position (raster) order.
            mask: Ignored (accepted for MAR's interface): the condition of a token depends only on the class and
                the tokens before it in the generation order.
            labels: ``[B]`` class labels (``-1`` = null).
            drop: Optional ``[B]`` bool label drop.
        """
        z = self.conditions_ordered(tokens[:, self.order], labels, drop)  # (B, L, W) generation order
        return torch.empty_like(z).index_copy_(1, self.order, z)  # (B, L, W) position order

    def start(self, labels: Tensor, cache: KVCache) -> Tensor:
        """Fill ``cache`` with the class buffer; return the condition ``[B, W]`` of the first token."""
        x = self.slots(self.class_embedding(labels), labels.new_zeros(labels.shape[0], 0, self.z_proj.in_features,
                                                                       dtype=self.z_proj.weight.dtype), 0)
        return self.run(x, 0, cache)[:, -1] + self.diffusion_pos_embed[0, self.order[0]]

    def step(self, token: Tensor, index: int, cache: KVCache) -> Tensor:
        """Append token ``index`` ``[B, Dt]`` (generation order) to ``cache``; return the condition of token
        ``index + 1`` ``[B, W]``."""
        start = self.buffer_size + index
        x = self.slots(None, token[:, None], start)  # (B, 1, W)
        return self.run(x, start, cache)[:, -1] + self.diffusion_pos_embed[0, self.order[index + 1]]

    def conditions_uncached(self, ordered_prefix: Tensor, labels: Tensor) -> Tensor:
        """The condition ``[B, W]`` of token ``n`` from the ``n`` tokens ``[B, n, Dt]`` before it (full recompute)."""
        n = ordered_prefix.shape[1]
        x = self.slots(self.class_embedding(labels), ordered_prefix, 0)  # (B, buf+n, W)
        return self.run(x, 0)[:, -1] + self.diffusion_pos_embed[0, self.order[n]]


@torch.no_grad()
def _causal_context(spec: ContextSpec | None, order: Tensor, ordered: Tensor, i: int) -> Tensor | None:
    """Context features ``[B, Fc]`` of step ``i``'s token (position ``order[i]``) from the ``i`` tokens generated
    before it (``ordered`` ``[B, L, T]`` in generation order), or ``None`` without a ``spec``."""
    if spec is None:
        return None
    b, seq_len = ordered.shape[:2]
    tokens = torch.zeros_like(ordered).index_copy_(1, order[:i], ordered[:, :i])  # (B, L, T) in position order
    revealed = torch.zeros(b, seq_len, dtype=torch.bool, device=ordered.device)
    revealed[:, order[:i]] = True
    return spec(tokens, revealed, order[i].expand(b, 1))


def sample_causal_tokens(
    model: CausalTransformer,
    head: DiffusionLoss,
    labels: Tensor,
    options: SamplingOptions,
    run: SamplingRun | None = None,
    *,
    use_cache: bool = True,
) -> Tensor:
    """Generate token sequences one token per AR step in the model's fixed order.

    Args:
        model: The causal transformer (in eval mode).
        head: The per-token diffusion head.
        labels: ``[B]`` class labels.
        options: Guidance and its schedule (``cfg == 1``: no null branch) and the head's sampler, steps and
            temperature; ``num_iter`` must be ``None`` or the number of tokens (one token per step).
        run: The call's generator (on ``labels``' device, for all noise), trace (one record per AR step, one token per
            sample each), refiner (applied to the conditions of each step) and progress bar.
        use_cache: Reuse keys and values (``False`` recomputes the prefix every step: same tokens, slower).

    Returns:
        ``[B, L, token_dim]`` tokens in position (raster) order.
    """
    seq_len = model.seq_len
    check_labels(labels, model.num_classes)
    run = run or SamplingRun()
    generator, trace, refiner = run.generator, run.trace, run.refiner
    spec = context_spec_of(refiner)
    if options.num_iter not in (None, seq_len):
        raise ValueError(f"num_iter must be {seq_len} (one token per step) for this model, got {options.num_iter}")
    options.check_for(seq_len, head.num_train_timesteps)
    cfg, cfg_schedule = options.cfg, options.cfg_schedule
    guided = cfg != 1.0
    both = torch.cat([labels, torch.full_like(labels, -1)]) if guided else labels  # (B or 2B,)
    ordered = torch.zeros(labels.shape[0], seq_len, head.token_dim, device=labels.device)  # generation order
    cache = KVCache() if use_cache else None
    if trace is not None:
        trace.labels = trace._store(labels)
    for i in progress_bar(range(seq_len), desc="AR steps", disable=not run.progress, leave=False):
        if not use_cache:
            z_all = model.conditions_uncached(ordered[:, :i].repeat(2 if guided else 1, 1, 1), both)
        elif i == 0:
            z_all = model.start(both, cache)
        else:
            z_all = model.step(ordered[:, i - 1].repeat(2 if guided else 1, 1), i - 1, cache)
        z_raw, z_null = z_all.chunk(2) if guided else (z_all, None)  # (B, W) each
        z, z_null, seconds = refine_conditions_of_step(refiner, z_raw, z_null, labels,
                                                       model.order[i].expand(labels.shape[0]), i,
                                                       timed=trace is not None,
                                                       context=_causal_context(spec, model.order, ordered, i))
        cfg_i = cfg_at_step(cfg, cfg_schedule, seq_len - 1 - i, seq_len)
        ordered[:, i] = head.sample(z, z_null, options, cfg=cfg_i, generator=generator)
        if trace is not None:
            trace.record(
                i, seq_len - 1 - i, cfg_i, seconds, positions=model.order[i].expand(labels.shape[0], 1),
                conditions=z[:, None], tokens=ordered[:, i, None],
                raw_conditions=z_raw[:, None] if refiner is not None else None,
                null_conditions=z_null[:, None] if z_null is not None else None,
            )
    return torch.empty_like(ordered).index_copy_(1, model.order, ordered)
