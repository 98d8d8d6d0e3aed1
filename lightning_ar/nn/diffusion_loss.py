"""MAR's per-token diffusion loss and sampler, on the noise schedules and samplers of ``diffusers``.

Training follows Improved DDPM as used by MAR: cosine schedule (``squaredcos_cap_v2``) with 1000 steps, epsilon
prediction plus a learned-range variance trained by the variational-bound term (on a stopped-gradient mean).
Sampling runs DDPM with respacing (temperature scales the injected noise, as in MAR), or the deterministic DDIM or
DPM-Solver++ samplers of diffusers (temperature then scales the initial noise). Classifier-free guidance combines the
noise predictions of a conditional and a null batch of conditions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor, nn

from lightning_ar.nn.diffusion_head import AdaLNMLPDenoiser
from lightning_ar.nn.param_cache import cached_on_params
from lightning_ar.nn.sampling_options import SAMPLERS, SamplingOptions

SamplerName = Literal["ddpm", "ddim", "dpm++"]
# diffusers' spacings of the sampling timesteps; "linspace" is MAR's respacing (space_timesteps(1000, "100")).
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-likelihood of ``x`` in ``[-1, 1]`` under a Gaussian discretised to 256 bins (IDDPM's decoder)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@dataclass(frozen=True)
class DDPMStepCoefficients:
    """Scalars ``[]`` (float32, on the schedule's device) of one respaced DDPM step from ``t`` to ``prev``.

    ``pred_x0 = (x - sqrt_one_minus_ab * eps) / sqrt_ab``; ``mean = (coef_x0 * pred_x0 + coef_xt * x) / one_minus_ab``;
    the learned-range log-variance interpolates between ``min_log`` (posterior) and ``max_log`` (``log beta``).
    """

    sqrt_one_minus_ab: Tensor
    sqrt_ab: Tensor
    coef_x0: Tensor
    coef_xt: Tensor
    one_minus_ab: Tensor
    min_log: Tensor
    max_log: Tensor

    @classmethod
    def between(cls, alphas_cumprod: Tensor, t: int, prev: int) -> DDPMStepCoefficients:
        """The coefficients from training timestep ``t`` to ``prev`` (``-1``: to the clean token)."""
        ab = alphas_cumprod[t]
        ab_prev = alphas_cumprod[prev] if prev >= 0 else ab.new_ones(())
        beta = 1.0 - ab / ab_prev
        min_log = torch.log((beta * (1.0 - ab_prev) / (1.0 - ab)).clamp(min=1e-20))
        return cls((1.0 - ab).sqrt(), ab.sqrt(), ab_prev.sqrt() * beta, (1.0 - beta).sqrt() * (1.0 - ab_prev),
                   1.0 - ab, min_log, torch.log(beta))


class DiffusionLoss(nn.Module):
    """Per-token diffusion loss and sampler around an :class:`AdaLNMLPDenoiser`.

    Args:
        token_dim: Dimension of one token.
        cond_dim: Dimension of the conditions ``z``.
        width: Hidden width of the denoiser MLP.
        depth: Number of AdaLN residual blocks.
        num_train_timesteps: Diffusion steps used in training (MAR: 1000).
        beta_schedule: diffusers beta schedule name (MAR's cosine schedule is ``squaredcos_cap_v2``).
        learn_sigma: Learn the variance (learned-range interpolation with the VB term), as MAR does.
        timestep_spacing: Where the sampling timesteps lie (diffusers' ``timestep_spacing``): ``leading``
            (``990, 980, ..., 0`` for 100 of 1000 steps), ``linspace`` (``999, 989, ..., 0``: MAR's respacing, used
            for imported MAR weights) or ``trailing`` (``999, 989, ..., 9``).

    Attributes:
        sampler_compile_options: Keyword arguments of ``torch.compile`` for ``compile_sampler`` (over
            ``dynamic=True``; default: torch's inductor); set before the first compiled sampling call.
    """

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int = 256,
        depth: int = 3,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        learn_sigma: bool = True,
        timestep_spacing: str = "leading",
    ) -> None:
        super().__init__()
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        self.token_dim, self.learn_sigma = token_dim, learn_sigma
        self.sampler_compile_options: dict[str, Any] = {}
        self.net = AdaLNMLPDenoiser(token_dim, cond_dim, width, depth, learn_sigma)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            variance_type="learned_range" if learn_sigma else "fixed_small",
            clip_sample=False,
            prediction_type="epsilon",
            timestep_spacing=timestep_spacing,
        )
        self._register_schedule(self.scheduler.alphas_cumprod.double())

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def _register_schedule(self, alphas_cumprod: Tensor) -> None:
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / prev
        post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        buffers = {
            "alphas_cumprod": alphas_cumprod,
            "betas": betas,
            "post_log_var": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "post_coef_x0": betas * prev.sqrt() / (1.0 - alphas_cumprod),
            "post_coef_xt": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _learned_log_var(self, v: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def forward(self, target: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-token training loss (noise MSE plus, with learned variance, the VB term in bits per dimension).

        Args:
            target: ``[N, token_dim]`` clean tokens.
            z: ``[N, cond_dim]`` conditions.
            generator: RNG for timesteps and noise.

        Returns:
            ``[N]`` loss per token.
        """
        t, noise = self.draw_noise(target.shape[0], target.device, target.dtype, generator)
        return self.loss_given_noise(target, z, t, noise)

    def draw_noise(self, n: int, device: torch.device, dtype: torch.dtype,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The training randomness of :meth:`forward` for ``n`` tokens: timesteps ``[n]`` and noise ``[n, token_dim]``
        (drawn in this order from ``generator``), so the rest of the loss is a pure function a compiler can trace."""
        t = torch.randint(0, self.num_train_timesteps, (n,), device=device, generator=generator)
        noise = torch.randn((n, self.token_dim), device=device, dtype=dtype, generator=generator)
        return t, noise

    def loss_given_noise(self, target: Tensor, z: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-token loss ``[N]`` (:meth:`forward` without its draws) at the given timesteps ``t`` ``[N]`` and
        ``noise`` ``[N, token_dim]``.

        Args:
            target: ``[M, token_dim]`` clean tokens.
            z: ``[M, cond_dim]`` their conditions.
            t: ``[N]`` timesteps, ``N = R * M``: each token is repeated ``R`` times (``torch.repeat`` order, as
                MAR's ``diffusion_batch_mul``) with fresh noise and timestep; the conditions are embedded before
                the repeat (:meth:`AdaLNMLPDenoiser.embed_repeated`).
            noise: ``[N, token_dim]``.

        Returns:
            ``[N]``.
        """
        c = self.net.embed_repeated(t, z, self.num_train_timesteps)  # (N, W); checks that N = R * M
        target = target.repeat(t.shape[0] // target.shape[0], 1)  # (N, D)
        ab = self.alphas_cumprod[t][:, None]  # (N, 1)
        x_t = ab.sqrt() * target + (1.0 - ab).sqrt() * noise  # (N, D)
        out = self.net.forward_embedded(x_t, c).float()  # (N, 2D)
        eps = out[:, : self.token_dim]
        loss = ((eps - noise) ** 2).mean(dim=-1)
        if self.learn_sigma:
            loss = loss + self._vb_bits(out, target, x_t, t)
        return loss

    def _vb_bits(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Variational-bound term ``[N]`` (bits/dim) training the variance only (the mean gradient is stopped)."""
        eps, v = out[:, : self.token_dim].detach(), out[:, self.token_dim :]
        ab = self.alphas_cumprod[t][:, None]
        pred_x0 = (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()
        coef_x0, coef_xt = self.post_coef_x0[t][:, None], self.post_coef_xt[t][:, None]
        model_mean = coef_x0 * pred_x0 + coef_xt * x_t
        true_mean = coef_x0 * x0 + coef_xt * x_t
        min_log, max_log = self.post_log_var[t][:, None], torch.log(self.betas[t])[:, None]
        model_log_var = self._learned_log_var(v, min_log, max_log)
        kl = normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=-1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def _denoise(self, x: Tensor, t_emb: Tensor, cond: Tensor,
                 cfg: float | Tensor) -> tuple[Tensor, Tensor | None]:
        """Noise ``[N, D]`` and variance interpolation for one step.

        ``cond`` is the embedded condition ``net.cond_embed(z)``: ``[N, W]``, or ``[2N, W]`` (conditional rows then
        null rows) for classifier-free guidance; the guided variance is the conditional branch's. ``t_emb``
        ``[1, W]`` is the step's timestep embedding, broadcast (every row shares it).
        """
        n = x.shape[0]
        guided = cond.shape[0] == 2 * n
        x_in = torch.cat([x, x]) if guided else x  # (N or 2N, D)
        out = self.net.forward_embedded(x_in, cond + t_emb).float()  # (N or 2N, 2D)
        eps, v = out[:, : self.token_dim], (out[:, self.token_dim :] if self.learn_sigma else None)
        if guided:
            eps = eps[n:] + cfg * (eps[:n] - eps[n:])
            v = v[:n] if v is not None else None
        return eps, v

    def _ddpm_plan(self, timesteps: tuple[int, ...]) -> list[DDPMStepCoefficients]:
        """The respaced DDPM coefficients of each step of ``timesteps`` (to the next one; the last to clean), from
        the training schedule; kept while the schedule buffers are unchanged."""
        def build() -> list[DDPMStepCoefficients]:
            nexts = (*timesteps[1:], -1)
            return [DDPMStepCoefficients.between(self.alphas_cumprod, t, prev) for t, prev in zip(timesteps, nexts)]
        return cached_on_params(self, "_ddpm_plan_cache", [self.alphas_cumprod], timesteps, build)

    def _time_embeddings(self, timesteps: tuple[int, ...], device: torch.device) -> list[Tensor]:
        """``[1, W]`` embedding of each timestep, as one step would compute it; kept between sampling calls while
        the denoiser's weights are unchanged."""
        def build() -> list[Tensor]:
            return [self.net.time_embed(torch.full((1,), t, device=device, dtype=torch.long)) for t in timesteps]
        return cached_on_params(self, "_time_embedding_cache", self.net.parameters(),
                                (timesteps, device), build)

    def _ddpm_table(self, timesteps: tuple[int, ...]) -> Tensor:
        """``[S, 7]``: the fields of each step's :class:`DDPMStepCoefficients` in field order (the compiled step's
        input: one tensor per step, so no step recompiles)."""
        def build() -> Tensor:
            return torch.stack([torch.stack([getattr(step, f.name) for f in fields(DDPMStepCoefficients)])
                                for step in self._ddpm_plan(timesteps)])
        return cached_on_params(self, "_ddpm_table_cache", [self.alphas_cumprod], timesteps, build)

    def ddpm_update(self, x: Tensor, cond: Tensor, t_emb: Tensor, cfg: Tensor, coefficients: Tensor,
                    noise: Tensor | None) -> Tensor:
        """One DDPM denoising step as a pure function of tensors (what ``compile_sampler`` compiles).

        Args:
            x: ``[N, token_dim]`` current noisy tokens.
            cond: ``[N, W]`` or ``[2N, W]`` embedded conditions (with the null rows for guidance).
            t_emb: ``[1, W]`` the step's timestep embedding.
            cfg: ``[]`` guidance scale (a tensor, so a schedule of scales compiles once).
            coefficients: ``[7]`` the step's row of :meth:`_ddpm_table`.
            noise: ``[N, token_dim]`` scaled noise, or ``None`` on the last step.

        Returns:
            ``[N, token_dim]`` the tokens after the step.
        """
        eps, v = self._denoise(x, t_emb, cond, cfg)
        return self._ddpm_step(x, eps, v, DDPMStepCoefficients(*coefficients.unbind()), noise)

    def _compiled_update(self) -> Callable[..., Tensor]:
        """:meth:`ddpm_update` through ``torch.compile`` (``dynamic=True``, over ``sampler_compile_options``), built
        once per module; not state (pickling or copying drops it)."""
        if "_compiled_ddpm" not in self.__dict__:
            options = {"dynamic": True, **self.sampler_compile_options}
            self.__dict__["_compiled_ddpm"] = torch.compile(self.ddpm_update, **options)
        return self.__dict__["_compiled_ddpm"]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled_ddpm", None)
        return state

    def _ddpm_step(self, x: Tensor, eps: Tensor, v: Tensor | None, step: DDPMStepCoefficients,
                   noise: Tensor | None) -> Tensor:
        """One respaced DDPM step from ``t`` to ``prev`` (``-1`` = clean) with the learned-range variance."""
        pred_x0 = (x - step.sqrt_one_minus_ab * eps) / step.sqrt_ab
        mean = (step.coef_x0 * pred_x0 + step.coef_xt * x) / step.one_minus_ab
        if noise is None:
            return mean
        log_var = self._learned_log_var(v, step.min_log, step.max_log) if v is not None else step.min_log
        return mean + torch.exp(0.5 * log_var) * noise

    def _scheduler(self, sampler: str, num_steps: int, device: torch.device):
        """The diffusers scheduler of ``sampler`` with ``num_steps`` timesteps (built once per sampler: building one
        recomputes the 1000-step schedule in Python; ``set_timesteps`` resets its state for every call)."""
        cache = self.__dict__.setdefault("_sampler_cache", {})
        if sampler not in cache:
            cache[sampler] = self._new_scheduler(sampler)
        scheduler = cache[sampler]
        scheduler.set_timesteps(num_steps, device=device)
        return scheduler

    def _new_scheduler(self, sampler: str):
        config = dict(self.scheduler.config)
        if sampler == "ddpm":
            scheduler = DDPMScheduler.from_config(config)
        elif sampler == "ddim":
            scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=True)
        elif sampler == "dpm++":
            scheduler = DPMSolverMultistepScheduler.from_config(
                config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", variance_type=None
            )
        else:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        return scheduler

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        z_null: Tensor | None = None,
        options: SamplingOptions | None = None,
        *,
        cfg: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample one token per condition.

        Args:
            z: ``[N, cond_dim]`` conditions.
            z_null: ``[N, cond_dim]`` null-class conditions for classifier-free guidance, or ``None``.
            options: The sampler, its number of denoising steps (at most ``num_train_timesteps``, spaced by the head's
                ``timestep_spacing``) and the temperature (scale of the injected noise for DDPM, of the initial noise
                for DDIM and DPM-Solver++); default :class:`SamplingOptions`. The default "leading" spacing
                (``990, 980, ..., 0`` for 100 steps) does not start at ``t=999``, where the capped cosine schedule has
                ``sqrt(alpha_bar) ~ 5e-5`` and the predicted clean token amplifies noise-prediction errors;
                "linspace" starts there, as MAR does.
            cfg: Guidance scale of this call (used when ``z_null`` is given; default ``options.cfg``): an AR sampler
                passes the step's scale of its schedule.
            generator: RNG on ``z``'s device for all noise.

        Returns:
            ``[N, token_dim]`` sampled tokens (float32).
        """
        options = SamplingOptions() if options is None else options
        cfg = options.cfg if cfg is None else cfg
        sampler, num_steps, temperature = options.sampler, options.num_sampling_steps, options.temperature
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_sampling_steps must be in [1, {self.num_train_timesteps}], got {num_steps}")
        scheduler = self._scheduler(sampler, num_steps, z.device)
        z_in = torch.cat([z, z_null]) if z_null is not None else z  # (N or 2N, C)
        cond = self.net.cond_embed(z_in)  # (N or 2N, W), embedded once per AR step
        x = torch.randn(z.shape[0], self.token_dim, device=z.device, generator=generator)  # (N, D)
        timesteps = tuple(int(t) for t in scheduler.timesteps)
        t_embs = self._time_embeddings(timesteps, z.device)  # S x (1, W)
        if sampler != "ddpm":
            x = x * temperature
            for t, t_emb in zip(timesteps, t_embs):
                eps, _ = self._denoise(x, t_emb, cond, cfg)
                x = scheduler.step(eps, t, x).prev_sample
            return x
        if options.compile_sampler:
            return self._sample_compiled(x, cond, cfg, timesteps, t_embs, temperature, generator)
        for i, (step, t_emb) in enumerate(zip(self._ddpm_plan(timesteps), t_embs)):
            eps, v = self._denoise(x, t_emb, cond, cfg)
            last = i == len(timesteps) - 1
            noise = None if last else torch.randn(x.shape, device=x.device, generator=generator) * temperature
            x = self._ddpm_step(x, eps, v, step, noise)
        return x

    def _sample_compiled(self, x: Tensor, cond: Tensor, cfg: float, timesteps: tuple[int, ...], t_embs: list[Tensor],
                         temperature: float, generator: torch.Generator | None) -> Tensor:
        """The DDPM loop of :meth:`sample` through the compiled :meth:`ddpm_update` (the same noise draws)."""
        update, table = self._compiled_update(), self._ddpm_table(timesteps)
        cfg_t = torch.tensor(float(cfg), device=x.device)
        for i, t_emb in enumerate(t_embs):
            last = i == len(timesteps) - 1
            noise = None if last else torch.randn(x.shape, device=x.device, generator=generator) * temperature
            x = update(x, cond, t_emb, cfg_t, table[i], noise)
        return x
