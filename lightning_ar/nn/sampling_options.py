"""``SamplingOptions``: how a generator samples, one frozen dataclass validated once and passed down to the samplers.

The generators expose each field as a flat option (``--model.cfg``, ``--model.num_iter``, ...) and build their
defaults from them; ``generate(labels, cfg=3.0)`` overrides fields for one call. The head's ``timestep_spacing`` is
not here: it fixes the head's scheduler when the head is built.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

Sampler = Literal["ddpm", "ddim", "dpm++"]
CfgSchedule = Literal["linear", "constant"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
CFG_SCHEDULES: tuple[str, ...] = get_args(CfgSchedule)


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings of one ``generate`` call; construction raises ``ValueError`` naming a field that is wrong.

    Args:
        num_iter: AR steps, an integer ``>= 1`` (at most the number of tokens: :meth:`check_for`). ``None``: a model
            without a choice (one token per step, or no AR steps) fills it in.
        cfg: Classifier-free guidance scale, finite (``1`` = off: no null branch is computed).
        cfg_schedule: ``linear`` (MAR's ramp over the revealed fraction) or ``constant``.
        temperature: Noise temperature of the head's sampler, finite and ``> 0``.
        num_sampling_steps: Denoising steps of the head per AR step, an integer ``>= 1`` (at most the head's training
            timesteps: :meth:`check_for`).
        sampler: The head's sampler: ``ddpm`` (respaced), ``ddim`` or ``dpm++``.
        compile_sampler: Run each DDPM denoising step of the head (denoiser, guidance and update: one pure function
            of tensors) through ``torch.compile`` with a dynamic row count, so one graph serves every AR step's
            token count (and a second the noiseless last step). Samples equal the eager sampler's within float
            rounding (``tests/nn/test_compiled_sampler.py`` states the tolerance); the transformer stays eager.
            ``ddpm`` only (``ddim``/``dpm++`` step through diffusers' schedulers).
    """

    num_iter: int | None = 8
    cfg: float = 1.0
    cfg_schedule: CfgSchedule = "linear"
    temperature: float = 1.0
    num_sampling_steps: int = 100
    sampler: Sampler = "ddpm"
    compile_sampler: bool = False

    def __post_init__(self) -> None:
        if self.num_iter is not None and (not _is_int(self.num_iter) or self.num_iter < 1):
            raise ValueError(f"num_iter must be an integer >= 1, got {self.num_iter!r}")
        if not _is_real(self.cfg) or not math.isfinite(self.cfg):
            raise ValueError(f"cfg must be a finite number, got {self.cfg!r}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or not self.temperature > 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not _is_int(self.num_sampling_steps) or self.num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be an integer >= 1, got {self.num_sampling_steps!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.compile_sampler, bool):
            raise ValueError(f"compile_sampler must be true or false, got {self.compile_sampler!r}")
        if self.compile_sampler and self.sampler != "ddpm":
            raise ValueError(f"compile_sampler compiles the ddpm step only; got sampler {self.sampler!r} (set "
                             "compile_sampler false or sampler ddpm)")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Any) -> SamplingOptions:
        """The options named in ``values`` (e.g. a module's ``hparams``); other keys are ignored."""
        return cls(**{name: values[name] for name in cls.names() if name in values})

    def replace(self, **overrides: Any) -> SamplingOptions:
        """A copy with the given fields changed; ``None`` leaves a field as it is.

        Raises:
            TypeError: a name that is not a sampling option.
        """
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; the options are {list(self.names())}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def check_for(self, seq_len: int, num_train_timesteps: int) -> None:
        """Raise ``ValueError`` unless ``num_iter <= seq_len`` and ``num_sampling_steps <= num_train_timesteps``."""
        if self.num_iter is not None and self.num_iter > seq_len:
            raise ValueError(f"num_iter must be an integer in [1, {seq_len}] (the number of tokens), "
                             f"got {self.num_iter}")
        if self.num_sampling_steps > num_train_timesteps:
            raise ValueError(f"num_sampling_steps must be in [1, {num_train_timesteps}], "
                             f"got {self.num_sampling_steps}")


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``labels`` is a non-empty 1-D integer tensor ``[B]`` with values in
    ``[0, num_classes)``."""
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        dtype = labels.dtype if isinstance(labels, Tensor) else None
        raise ValueError(f"labels must be a 1-D integer tensor [B], got dtype {dtype} shape {shape}")
    if labels.numel() == 0:
        raise ValueError("labels must hold at least one label, got an empty tensor")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), got {labels.tolist()}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
