"""A compact, independent LDM (latent-diffusion / taming) KL autoencoder, written from the architecture, used only as
the ground truth the diffusers conversion is compared against. Parameter names follow the LDM layout
(``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1``, ``decoder.up.{i}.upsample``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """``x + conv2(swish(norm2(conv1(swish(norm1(x))))))``, with a 1x1 ``nin_shortcut`` when widths differ."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections, ``x + proj_out(attn)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (layer(y).flatten(2) for layer in (self.q, self.k, self.v))  # (b, c, hw)
        weights = torch.einsum("bci,bcj->bij", q, k).mul(c**-0.5).softmax(dim=-1)  # (b, hw_q, hw_k)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """``block[j]`` each followed by ``attn[j]`` when the level has attention, then an optional resampler."""

    def __init__(self, cin: int, cout: int, n: int, attn: bool, resample: type[nn.Module] | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(n))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n if attn else 0))
        if resample is not None:
            setattr(self, name, resample(cout))
        self.resample_name = name if resample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            x = self.attn[j](x) if len(self.attn) else x
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], n: int, z: int, attn_levels: set[int]) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(([ch] + widths)[i], w, n, i in attn_levels, None if i == last else Downsample, "downsample")
            for i, w in enumerate(widths))
        self.mid, self.norm_out = Mid(widths[-1]), norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], n: int, z: int, attn_levels: set[int]) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # up[i] runs deepest-first; its input is the width of level i + 1 (or the deepest width for the last level)
        self.up = nn.ModuleList(
            Level((widths + [widths[-1]])[i + 1], w, n + 1, i in attn_levels, None if i == 0 else Upsample, "upsample")
            for i, w in enumerate(widths))
        self.norm_out, self.conv_out = norm(widths[0]), nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMAutoencoderKL(nn.Module):
    """``encode``: images ``[B, 3, H, W]`` to moments ``[B, 2z, H/f, W/f]``; ``decode``: ``[B, z, h, w]`` to images."""

    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z: int = 16, encoder_attn: set[int] | None = None, decoder_attn: set[int] | None = None) -> None:
        super().__init__()
        encoder_attn = {len(ch_mult) - 1} if encoder_attn is None else encoder_attn
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z, encoder_attn)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z, decoder_attn or set())
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)

    def encode(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (GroupNorm affines included) random, well-scaled values, so no mapping hides behind
    a default of 1 or 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model
