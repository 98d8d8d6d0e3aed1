"""Feature extraction for image-quality metrics: torch-fidelity's InceptionV3 and the distributed helpers around it.

``InceptionFeatures`` is torch-fidelity's ``inception-v3-compat``: a port of the TF Inception graph of 2015-12-05 that
ADM's evaluator runs (the same weights, TF1's bilinear resize to 299 inside the network). Its ``2048`` feature is the
2048-d global average pool after ``Mixed_7c``, i.e. the graph's ``pool_3``: the feature whose ``mu``/``sigma`` ADM's
reference batches store, and the one torch-fidelity's FID (MAR's table) uses.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities.distributed import gather_all_tensors

INCEPTION_FEATURES = (64, 192, 768, 2048)


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (the TF FID network, ``inception-v3-compat``), always in eval mode.

    Maps ``uint8`` images ``[B, 3, H, W]`` (resized to 299 inside) to ``(features [B, num_features],
    logits_unbiased [B, 1008])``.

    Args:
        num_features: Pool layer of the features: 64, 192, 768 or 2048 (FID standard).
        weights_path: Local weights file (``pt_inception-2015-12-05-6726825d.pth``) for offline machines; ``None``
            downloads them on first use.
    """

    def __init__(self, num_features: int = 2048, weights_path: str | Path | None = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if num_features not in INCEPTION_FEATURES:
            raise ValueError(f"num_features must be one of {INCEPTION_FEATURES}, got {num_features}")
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"inception_weights: no Inception weights file at {weights_path}")
        self.num_features = num_features
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(num_features), "logits_unbiased"],
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        )
        self.train(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in eval mode (batch-norm statistics are part of the metric's definition)."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``uint8`` ``[B, 3, H, W]`` -> ``(features [B, F], logits [B, 1008])``."""
        features, logits = self.net(images)
        return features, logits


class Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID/IS take features computed once by the evaluator."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def split_output(output: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
    """A feature extractor's output -> ``(features [B, F], logits [B, K] or None)``."""
    if isinstance(output, Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and len(output) in (1, 2) and all(isinstance(t, Tensor) for t in output):
        return output[0], (output[1] if len(output) == 2 else None)
    raise TypeError("feature_extractor must return features [B, F] or a tuple (features [B, F], logits [B, K])")


def dist_active(enabled: bool) -> bool:
    """Whether ``enabled`` and a default process group is initialised."""
    return enabled and dist.is_available() and dist.is_initialized()


def gather_shards(tensor: Tensor, enabled: bool) -> Tensor:
    """Reassemble rows sharded ``rank::world_size`` (this process holds ``tensor`` ``[n_r, ...]``) in their order.

    NCCL gathers CUDA tensors only, so CPU tensors travel via the current CUDA device there.
    """
    if not dist_active(enabled):
        return tensor
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    shards = [t.to(device) for t in gather_all_tensors(tensor.contiguous())]
    out = shards[0].new_empty((sum(len(t) for t in shards), *shards[0].shape[1:]))
    for rank, shard in enumerate(shards):
        out[rank::len(shards)] = shard
    return out


class StableInceptionScore(InceptionScore):
    """torchmetrics' Inception Score, computed in float64 with ``0 log 0 = 0``.

    torchmetrics evaluates ``p (log p - log mean p)`` in the logits' dtype: when a class's probability underflows to
    0 in every image of a split, that term is ``0 * inf = NaN`` and the score is NaN for valid images (seen with
    confident logits). Here the softmax is taken in float64 and terms with ``p = 0`` contribute their limit, 0; the
    value is otherwise the same formula (splits, permutation by the global CPU RNG, mean and std over splits).
    """

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of ``exp(E_x KL(p(y|x) || p(y)))`` over the splits."""
        from torchmetrics.utilities.data import dim_zero_cat

        features = dim_zero_cat(self.features).double()
        features = features[torch.randperm(features.shape[0])]
        scores = []
        for logits in features.chunk(self.splits, dim=0):
            prob, log_prob = logits.softmax(dim=1), logits.log_softmax(dim=1)
            log_mean = prob.mean(dim=0, keepdim=True).log()
            terms = torch.where(prob > 0, prob * (log_prob - log_mean), torch.zeros_like(prob))
            scores.append(terms.sum(dim=1).mean().exp())
        score = torch.stack(scores)
        return score.mean(), score.std()


def seeded_inception_score(metric: InceptionScore, seed: int) -> tuple[float, float]:
    """torchmetrics' IS permutes with the global CPU RNG: fix it to ``seed`` for this call only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def fid_between(a: Tensor, b: Tensor) -> float:
    """Frechet distance between feature sets ``a`` ``[N, F]`` and ``b`` ``[M, F]`` (this process only)."""
    fid = FrechetInceptionDistance(feature=Precomputed(a.shape[1]), sync_on_compute=False).to(a.device)
    fid.update(a, real=True)
    fid.update(b, real=False)
    return max(float(fid.compute()), 0.0)
