"""The shape of a condition transformer (MAR's masked one and the causal one): one frozen dataclass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TransformerSpec:
    """Width, depths and regularisation of an encoder/decoder transformer that produces one condition per token.

    Attributes:
        width: Transformer width for both encoder and decoder (the condition dimension).
        encoder_depth: Number of encoder blocks.
        decoder_depth: Number of decoder blocks.
        num_heads: Attention heads.
        mlp_ratio: Hidden size of the block MLP relative to ``width``.
        buffer_size: Leading positions filled with the class embedding (>= 1; MAR: 64).
        dropout: Dropout in attention and projections (MAR: 0.1).
        label_drop_prob: Probability of replacing the class embedding by the learned null embedding in training.
    """

    width: int = 256
    encoder_depth: int = 4
    decoder_depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    buffer_size: int = 4
    dropout: float = 0.1
    label_drop_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1 (it carries the class embedding), got {self.buffer_size}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TransformerSpec:
        """The spec from a mapping holding (at least) its fields, e.g. a generator's ``hparams``."""
        return cls(**{f.name: values[f.name] for f in fields(cls)})
